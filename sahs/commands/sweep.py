"""``sahs sweep``: run a W&B sweep definition in this process, on W&B or offline; ``sahs sweep report DIR``."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

USAGE = """usage: sahs sweep SWEEP.yaml [--count N] [--offline] [--name NAME] [--storage URL] [--workers N]
                  [--heartbeat S] [run-config overrides ...]
       sahs sweep report SWEEP_DIR [--storage URL] [--name NAME]

Runs the sweep's runs in this process (leave-one-attack-out on one activation cache, read once), or in
N worker processes (--workers N). Online it creates the sweep on W&B and runs an agent (other machines
join with the `wandb agent` line it prints); offline (WANDB_MODE=offline or --offline) it is one Optuna
study: in <sweep folder>/sweep.db, or in --storage (postgresql://..., mysql://..., sqlite:///...,
journal:PATH), which the same command started on other machines joins. Running it again resumes it.
Overrides such as --trainer.default_root_dir DIR apply to every run (and, but for the root folder, are
part of the sweep: other overrides need another --name). The sweep's folder is
<trainer.default_root_dir>/sweeps/<name>: summary.{csv,md}, auroc_vs_heads.png, sweep.db, runs/ (records)
and loao/<run>/ (each run's folder)."""
WORKER = "SAHS_SWEEP_WORKER"  # set in each worker process that `--workers N` starts: "INDEX/N"


@dataclass
class Options:
    """Options of ``sahs sweep`` (given after the sweep file).

    Args:
        count: Most runs for this process; a grid also stops when every point ran, any sweep at its run_cap.
        offline: Use the local search engine (Optuna) even when W&B is online; WANDB_MODE=offline does too.
        name: Name of the sweep: its folder ``<root_dir>/sweeps/<name>`` and W&B group (default: the YAML's
            ``name``, else its file name). A new name starts a new sweep; the same name resumes it.
        sweep_id: Join this existing W&B sweep (``ENTITY/PROJECT/ID``) instead of creating one.
        storage: Where the offline sweep's Optuna study lives: an RDB URL (``postgresql://user@host/db``,
            ``mysql://...``, ``sqlite:///path``) or ``journal:PATH`` (a file on a shared file system); by
            default ``<sweep folder>/sweep.db``. Every process given the same storage and name joins the sweep.
        workers: Worker processes on this machine, each reading the cache once (one per GPU, round robin;
            on CPU the threads are split between them).
        heartbeat: Seconds between a running run's heartbeats; a run silent for three is lost and runs again.
    """

    count: int | None = None
    offline: bool = False
    name: str | None = None
    sweep_id: str | None = None
    storage: str | None = None
    workers: int = 1
    heartbeat: int = 20


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
    from sahs.experiments.sweep_spec import SweepError, check_parameters, load_sweep

    spec = load_sweep(argv[0])  # a SweepError (a UserError) is printed by `sahs` in one line
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)  # not "Seed set to 0" and the GPU lines per process

    options, run = parse("sweep", [*spec.run_args, *argv[1:]], keep_logger=True)
    if options.workers < 1 or options.heartbeat < 1:
        raise SweepError(f"--workers and --heartbeat must be at least 1, got {options.workers} and {options.heartbeat}")
    spec = replace(spec, name=options.name or spec.name)
    sweep_dir = (run.root_dir / "sweeps" / spec.name).resolve()  # records name run folders from anywhere
    run_args = _without_sweep_options(run.argv)
    overrides = run_args[len(spec.run_args):] if run_args[:len(spec.run_args)] == spec.run_args else run_args
    check_parameters(spec, _checker(run.parser, run_args))
    offline = options.offline or os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled")
    worker = os.environ.get(WORKER)
    sweep_id = None if offline else (options.sweep_id or _create_on_wandb(spec))  # before the cache is read
    where = f"Optuna, {redact(options.storage) if options.storage else 'sweep.db'}" if offline else "W&B"
    if options.workers > 1 and worker is None:
        return _run_workers(argv, options, spec, sweep_dir, overrides, offline, sweep_id, where)
    if worker is None:
        print(f"[sahs] sweep {spec.name} ({spec.method}, {'offline, ' if offline else ''}{where}): {sweep_dir}")
    execute = _executor(spec, sweep_dir, run_args, offline, run)
    say = print if worker is None else (lambda line: print(line.replace("[sahs]", f"[sahs w{worker}]", 1),
                                                           flush=True))
    with _quiet_wandb():
        try:
            if offline:
                from sahs.experiments.sweep import run_local

                records = run_local(spec, sweep_dir, execute, count=options.count, say=say, storage=options.storage,
                                    overrides=overrides, heartbeat=options.heartbeat)
            else:
                from sahs.experiments.sweep import run_wandb

                records = run_wandb(spec, sweep_dir, execute, sweep_id, count=options.count, say=say)
        except (KeyboardInterrupt, BrokenPipeError):
            _stopped(spec, sweep_dir)
        if worker is None:
            _finish(spec, sweep_dir, records, offline)


def redact(url: str) -> str:
    from sahs.experiments.sweep_storage import redact

    return redact(url)


def _stopped(spec, sweep_dir: Path) -> None:
    try:
        print(f"\n[sahs] sweep {spec.name} interrupted; its summary in {sweep_dir} lists the runs so far. "
              "Run the same command again to resume it.", file=sys.stderr)
    except OSError:  # the console itself is gone (`| tee` ended)
        pass
    raise SystemExit(130) from None


@contextlib.contextmanager
def _quiet_wandb():
    """W&B runs of a sweep: no banner on the console (its logs stay in each run's folder), and none of what
    is the same for every run or meaningless for a run of seconds (package list, machine metadata, git
    state, system metrics sampled every few seconds); each of these costs W&B work per run."""
    settings = {"WANDB_SILENT": "true", "WANDB__SAVE_REQUIREMENTS": "false", "WANDB_CONSOLE": "off",
                "WANDB__DISABLE_META": "true", "WANDB__DISABLE_STATS": "true", "WANDB__DISABLE_MACHINE_INFO": "true",
                "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true"}
    preset = {key: os.environ[key] for key in settings if key in os.environ}
    for key, value in settings.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key in settings:
            if key not in preset:
                os.environ.pop(key, None)


def worker_environment(index: int, count: int, environ: dict | None = None) -> dict[str, str]:
    """Worker ``index`` of ``count``: one visible GPU each (round robin), else its share of the CPU threads."""
    env = dict(os.environ if environ is None else environ)
    env[WORKER] = f"{index + 1}/{count}"
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [device for device in visible.split(",") if device.strip() not in ("", "-1")]
    else:
        import torch

        devices = [str(device) for device in range(torch.cuda.device_count())]
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = devices[index % len(devices)]
    threads = int(env.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    share = str(max(1, threads // count))
    env.update(OMP_NUM_THREADS=share, MKL_NUM_THREADS=share)
    return env


def start_workers(command: list[str], count: int) -> list[int]:
    """Run ``command`` in ``count`` processes at once (environments from ``worker_environment``); their exit codes.

    Ctrl-C reaches the workers too (one process group): each records its run as interrupted and stops.
    """
    import subprocess

    processes = [subprocess.Popen(command, env=worker_environment(index, count)) for index in range(count)]
    try:
        return [process.wait() for process in processes]
    except KeyboardInterrupt:
        for process in processes:
            process.wait()
        raise


def _run_workers(argv, options, spec, sweep_dir: Path, overrides, offline: bool, sweep_id, where: str) -> None:
    """``--workers N``: the study is set up here once (identity checked, grid queued), then N workers join it."""
    from sahs.experiments.records import read_records

    command = [sys.executable, "-m", "sahs.cli", "sweep", *_without_workers(argv)]
    if offline:
        from sahs.experiments.sweep import LocalSweep

        LocalSweep(spec, sweep_dir, options.storage, overrides, options.heartbeat)
    elif options.sweep_id is None:
        command += ["--sweep_id", sweep_id]
    print(f"[sahs] sweep {spec.name} ({spec.method}, {'offline, ' if offline else ''}{where}): {sweep_dir}; "
          f"{options.workers} workers")
    try:
        codes = start_workers(command, options.workers)
    except KeyboardInterrupt:
        _stopped(spec, sweep_dir)
    lost = [f"worker {index + 1} ({'signal ' + str(-code) if code < 0 else 'exit ' + str(code)})"
            for index, code in enumerate(codes) if code != 0]
    if lost:
        print(f"[sahs] sweep {spec.name}: {', '.join(lost)} ended early; a run it left is queued again: run the "
              "same command to finish the sweep", file=sys.stderr)
    from sahs.experiments.report import write_summary

    write_summary(sweep_dir, spec)
    with _quiet_wandb():
        _finish(spec, sweep_dir, read_records(sweep_dir), offline)
    if lost:
        raise SystemExit(1)


def _without_workers(argv: list[str]) -> list[str]:
    """The command line minus ``--workers N`` (each worker is one process)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--workers", "--sweep.workers"):
            skip = True
        elif not arg.startswith(("--workers=", "--sweep.workers=")):
            out.append(arg)
    return out


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

    # The run's identity goes before its parameters where no parameter sets an identity key (the order of
    # disjoint keys does not matter), so that the parser reads the run config and identity once per sweep.
    keys = [arg[2:].split("=", 1)[0] for arg in identity]
    first = not any(k == p or k.startswith(p + ".") or p.startswith(k + ".")
                    for k in keys for p in (q.name for q in spec.parameters))

    def execute(params: dict, name: str) -> RunOutcome:
        overrides = spec.overrides(params)
        argv = [*run_args, *identity, *overrides] if first else [*run_args, *overrides, *identity]
        argv.append(f"--run.name={name}")
        try:
            result = loao.run(argv, store=store, parser=parser, quiet=True,
                              fixed=len(run_args) + (len(identity) if first else 0))
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
    from sahs.experiments.report import SUMMARY_MD, log_summary

    log_summary(sweep_dir, spec, offline=offline)
    failed = sum(record.status == "failed" for record in records)
    print(f"[sahs] sweep {spec.name}: {len(records)} runs ({failed} failed); summary: {sweep_dir / SUMMARY_MD}")
    _say_best(sweep_dir, spec.metric)


def _say_best(sweep_dir: Path, metric: str) -> None:
    """The best run of the summary just written and the runs its paired comparison cannot tell from it."""
    import csv

    from sahs.experiments.report import SUMMARY_CSV

    if not (sweep_dir / SUMMARY_CSV).is_file():
        return
    with open(sweep_dir / SUMMARY_CSV, newline="") as handle:
        rows = list(csv.DictReader(handle))
    best = next((row for row in rows if row.get("vs_best") == "best"), None)
    if best is None:
        return
    tied = [row["run"] for row in rows if row.get("vs_best") == "not distinguishable"]
    print(f"[sahs] best: {best['run']}  {metric}={float(best[metric]):.4f}  ({best.get('dir')})")
    print(f"[sahs] not distinguishable from it (paired bootstrap, 95%): {', '.join(tied) if tied else 'none'}")


def report(argv: list[str]) -> None:
    """``sahs sweep report SWEEP_DIR``: rebuild the summary table and plot from the sweep's runs.

    The runs' records come from ``--storage`` (or the storage the sweep folder names) when there is one, so
    workers whose folders are not shared all appear; each run's metrics from its folder where it is here.
    """
    import json

    from jsonargparse import ArgumentParser

    from sahs.experiments.records import DEFINITION, SWEEP_FILE, write_atomic
    from sahs.experiments.report import write_summary
    from sahs.experiments.sweep_spec import SweepError, load_sweep

    parser = ArgumentParser(prog="sahs sweep report", description=report.__doc__)
    parser.add_argument("sweep_dir", type=str, help="the sweep's folder, <root_dir>/sweeps/<name>")
    parser.add_argument("--storage", type=str | None, default=None, help="the sweep's storage URL (or journal:PATH)")
    parser.add_argument("--name", type=str | None, default=None, help="the sweep's name (default: its folder's)")
    args = parser.parse_args(argv)
    sweep_dir = Path(args.sweep_dir)
    kept = json.loads((sweep_dir / SWEEP_FILE).read_text()) if (sweep_dir / SWEEP_FILE).is_file() else {}
    name = args.name or kept.get("name") or sweep_dir.name
    storage = args.storage or (kept.get("storage") if "***" not in (kept.get("storage") or "***") else None)
    records = None
    if storage is not None:
        from sahs.experiments.records import records_from_trials
        from sahs.experiments.sweep import HEARTBEAT, open_study

        study = open_study(storage, name, HEARTBEAT)
        records = records_from_trials(study.get_trials(deepcopy=False))
        if not (sweep_dir / DEFINITION).is_file() and "definition_yaml" in study.user_attrs:
            write_atomic(sweep_dir / DEFINITION, study.user_attrs["definition_yaml"])
    if not (sweep_dir / DEFINITION).is_file():
        hint = "; its storage lies elsewhere: pass --storage URL" if "***" in (kept.get("storage") or "") else ""
        raise SweepError(f"{sweep_dir} is not a sweep folder (no {DEFINITION}); pass the folder that `sahs sweep` "
                         f"printed, e.g. outputs/demo/sweeps/demo_capacity, or --storage URL --name NAME{hint}")
    spec = replace(load_sweep(sweep_dir / DEFINITION), name=name)  # a --name sweep keeps its name
    written = write_summary(sweep_dir, spec, from_folders=True, records=records)
    print("[sahs] wrote " + ", ".join(str(path) for path in written))
    _say_best(sweep_dir, spec.metric)
