"""``sahs sweep``: run a W&B sweep definition in this process, on W&B or offline; ``sahs sweep report DIR``."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

USAGE = """usage: sahs sweep SWEEP.yaml [--count N] [--offline] [--name NAME] [run-config overrides ...]
       sahs sweep report SWEEP_DIR

Runs every run of the sweep in this process (leave-one-attack-out on one activation cache, read once).
Online it creates the sweep on W&B and runs an agent (other machines join with the `wandb agent` line
it prints); offline (WANDB_MODE=offline or --offline) Optuna runs the same YAML, and running the same
command again resumes the sweep. Overrides such as --trainer.default_root_dir DIR apply to every run.
The sweep's folder is <trainer.default_root_dir>/sweeps/<name>: summary.{csv,md}, auroc_vs_heads.png,
sweep.db, runs/ (records) and loao/<run>/ (each run's folder)."""


@dataclass
class Options:
    """Options of ``sahs sweep`` (given after the sweep file).

    Args:
        count: Most runs for this process; a grid also stops when every point ran, any sweep at its run_cap.
        offline: Use the local search engine (Optuna) even when W&B is online; WANDB_MODE=offline does too.
        name: Name of the sweep: its folder ``<root_dir>/sweeps/<name>`` and W&B group (default: the YAML's
            ``name``, else its file name). A new name starts a new sweep; the same name resumes it.
        sweep_id: Join this existing W&B sweep (``ENTITY/PROJECT/ID``) instead of creating one.
    """

    count: int | None = None
    offline: bool = False
    name: str | None = None
    sweep_id: str | None = None


def _without_sweep_options(args: list[str]) -> list[str]:
    """The command line minus ``--sweep.*`` (this process's options, not the runs')."""
    out, skip = [], False
    for index, arg in enumerate(args):
        if skip:
            skip = False
        elif arg.startswith("--sweep."):
            skip = "=" not in arg and index + 1 < len(args) and not args[index + 1].startswith("--")
        else:
            out.append(arg)
    return out


def _checker(parser, prefix: list[str]):
    """``check(overrides)``: the run config parser's error for these overrides, or None."""
    from jsonargparse import ArgumentError

    parser.exit_on_error = False

    def check(overrides: list[str]) -> str | None:
        printed = io.StringIO()
        try:
            with contextlib.redirect_stderr(printed):
                parser.parse_args([*prefix, *overrides])
        except (ArgumentError, SystemExit) as error:
            return _config_error(error, printed.getvalue())
        return None

    return check


def _config_error(error: BaseException, printed: str = "") -> str:
    """A config error in one line: the key at fault and what it accepts."""
    from sahs.commands.errors import config_error_line

    text = str(error) if not isinstance(error, SystemExit) else printed or str(error)
    return config_error_line(text) or " ".join(text.split())[:300]


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    if argv[0] == "report":
        return report(argv[1:])
    from sahs.commands.run_config import parse
    from sahs.experiments.sweep_spec import check_parameters, load_sweep

    spec = load_sweep(argv[0])  # a SweepError (a UserError) is printed by `sahs` in one line

    options, run = parse("sweep", [*spec.run_args, *argv[1:]], keep_logger=True)
    spec = replace(spec, name=options.name or spec.name)
    sweep_dir = (run.root_dir / "sweeps" / spec.name).resolve()  # records name run folders from anywhere
    run_args = _without_sweep_options(run.argv)
    check_parameters(spec, _checker(run.parser, run_args))
    offline = options.offline or os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled")
    sweep_id = None if offline else (options.sweep_id or _create_on_wandb(spec))  # before the cache is read
    execute = _executor(spec, sweep_dir, run_args, offline, run)
    print(f"[sahs] sweep {spec.name} ({spec.method}, {'offline, Optuna' if offline else 'W&B'}): {sweep_dir}")
    # W&B lists the installed packages for every run (0.3-1 s each); a sweep's runs share one environment.
    preset = "WANDB__SAVE_REQUIREMENTS" in os.environ
    os.environ.setdefault("WANDB__SAVE_REQUIREMENTS", "false")
    try:
        if offline:
            from sahs.experiments.sweep import run_local

            records = run_local(spec, sweep_dir, execute, count=options.count)
        else:
            from sahs.experiments.sweep import run_wandb

            records = run_wandb(spec, sweep_dir, execute, sweep_id, count=options.count)
    except KeyboardInterrupt:
        print(f"\n[sahs] sweep {spec.name} interrupted; its summary in {sweep_dir} lists the runs so far. "
              "Run the same command again to resume it.", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if not preset:
            os.environ.pop("WANDB__SAVE_REQUIREMENTS", None)
    _finish(spec, sweep_dir, records, offline)


def _executor(spec, sweep_dir: Path, run_args: list[str], offline: bool, base=None):
    """``execute(params, name)``: one LOAO run of the sweep, in-process, sharing one read of the cache.

    With ``base`` (the sweep's run config, built) the cache is checked, filled and read here, before
    any run: a cache that does not fit the config stops the sweep instead of failing every run.
    """
    from jsonargparse import ArgumentError

    from sahs.commands import loao
    from sahs.commands.run_config import RunParser
    from sahs.experiments.inputs import InputStore
    from sahs.experiments.report import detector_label
    from sahs.experiments.sweep import RunFailed, RunOutcome

    store, parser = InputStore(every_layer=True), RunParser("loao")
    if base is not None:
        loao.load_inputs(base, store)  # a missing or mismatched cache stops here, before any run
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)  # not "Seed set to 0" and the GPU lines once per run
    identity = [f"--trainer.default_root_dir={sweep_dir}", f"--run.group={spec.name}", "--run.tags=[sweep]",
                "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
                f"--trainer.logger.init_args.project={spec.project}"]
    identity += [f"--trainer.logger.init_args.entity={spec.entity}"] if spec.entity else []
    identity += ["--trainer.logger.init_args.offline=true"] if offline else []

    def execute(params: dict, name: str) -> RunOutcome:
        argv = [*run_args, *spec.overrides(params), *identity, f"--run.name={name}"]
        try:
            result = loao.run(argv, store=store, parser=parser, quiet=True)
        except (ArgumentError, SystemExit) as error:  # the run config rejected this run's values
            raise RunFailed(f"the run config rejected this run: {_config_error(error)}") from error
        return RunOutcome(result.dir, result.metrics, detector_label(result.config))

    return execute


def _create_on_wandb(spec) -> str:
    from sahs.errors import UserError
    from sahs.experiments.sweep import create_wandb_sweep

    try:
        return create_wandb_sweep(spec)
    except Exception as error:
        if "api_key" in str(error).lower() or "api key" in str(error).lower():
            raise UserError("W&B is online but has no API key: run `wandb login`, or sweep offline with --offline "
                            "(or WANDB_MODE=offline) and `wandb sync` the runs later") from None
        raise


def _finish(spec, sweep_dir: Path, records, offline: bool) -> None:
    from sahs.experiments.report import SUMMARY_MD, best_row, log_summary, summary_rows

    log_summary(sweep_dir, spec, offline=offline)
    rows = summary_rows(sweep_dir, spec.metric)
    best = best_row(rows, spec.metric, spec.goal)
    failed = sum(record.status == "failed" for record in records)
    print(f"[sahs] sweep {spec.name}: {len(records)} runs ({failed} failed); summary: {sweep_dir / SUMMARY_MD}")
    if best is not None:
        print(f"[sahs] best: {best['run']}  {spec.metric}={best[spec.metric]:.4f}  ({best['dir']})")


def report(argv: list[str]) -> None:
    """``sahs sweep report SWEEP_DIR``: rebuild the summary table and plot from the sweep's finished runs."""
    from jsonargparse import ArgumentParser

    from sahs.experiments.report import write_summary

    parser = ArgumentParser(prog="sahs sweep report", description=report.__doc__)
    parser.add_argument("sweep_dir", type=str, help="the sweep's folder, <root_dir>/sweeps/<name>")
    sweep_dir = Path(parser.parse_args(argv).sweep_dir)
    written = write_summary(sweep_dir, from_folders=True)
    print("[sahs] wrote " + ", ".join(str(path) for path in written))
