"""Sweeps: every definition in sweeps/ maps onto real config keys; offline sweeps run, record and summarize."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
import yaml

from sahs.cli import PARSER_MODE, SahsCLI, main
from sahs.data.datamodule import ActivationDataModule
from sahs.experiments import LoaoSettings
from sahs.experiments.loao import leave_one_attack_out
from sahs.experiments.sweep_spec import cli_text, load_sweep
from sahs.models.detectors import LogisticDetector, SparseL1Detector
from sahs.models.module import DetectorModule
from tests.synthetic import planted_features, write_cache
from tests.wandb_records import offline_run, offline_runs

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
DETECTORS = ROOT / "configs" / "detector"


@pytest.fixture(scope="module")
def parser():
    """The run config's parser (built once; each check below only parses)."""
    cli = SahsCLI(DetectorModule, ActivationDataModule, parser_kwargs={"parser_mode": PARSER_MODE}, run=False,
                  args=["--config", str(ROOT / "configs" / "demo.yaml"), "--trainer.logger=false"])
    return cli.parser


def candidates(parameter) -> list:
    """Every value a grid visits, or a distribution's two ends."""
    if parameter.finite:
        return parameter.grid_values()
    exponents = parameter.distribution in ("log_uniform", "q_log_uniform")  # W&B: min and max are exponents of e
    return [math.exp(bound) if exponents else bound for bound in (parameter.low, parameter.high)]


def expected(value):
    """What the config holds after `--key=value`: a detector YAML file's content, else the value itself."""
    if isinstance(value, str) and value.endswith(".yaml"):
        return yaml.safe_load((ROOT / value).read_text())
    return yaml.safe_load(cli_text(value))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_value_of_every_parameter_lands_in_the_config_key_it_names(path, parser, monkeypatch):
    monkeypatch.chdir(ROOT)  # sweep definitions name configs relative to the repository, as W&B agents run them
    spec = load_sweep(path)
    assert spec.metric in {"loao/auroc_mean", "loao/auroc_min"} and spec.verb == "loao"
    base = spec.run_args
    first = spec.first_point()
    for index, parameter in enumerate(spec.parameters):
        before = spec.overrides({p.name: first[p.name] for p in spec.parameters[:index]})
        for value in candidates(parameter):
            config = parser.parse_args([*base, *before, f"--{parameter.name}={cli_text(value)}"])
            landed = config[parameter.name]
            landed = landed.as_dict() if hasattr(landed, "as_dict") else landed
            want = expected(value)
            if isinstance(want, dict):  # a detector file: its class and every init arg it sets
                assert landed["class_path"] == want["class_path"], parameter.name
                assert {k: landed["init_args"][k] for k in want["init_args"]} == want["init_args"], parameter.name
            else:
                assert landed == pytest.approx(want) if isinstance(want, float) else landed == want, parameter.name


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_value_of_every_parameter_parses_as_one_full_parse_does_when_the_rest_is_read_once(path, parser,
                                                                                               monkeypatch, tmp_path):
    from sahs.commands.run_config import FixedArgs

    monkeypatch.chdir(ROOT)
    spec = load_sweep(path)
    head = [*spec.run_args, f"--trainer.default_root_dir={tmp_path}", "--run.tags=[sweep]",
            "--trainer.logger=lightning.pytorch.loggers.WandbLogger", "--trainer.logger.init_args.offline=true"]
    fixed = FixedArgs(parser, tuple(head))
    assert fixed.resolved == {"trainer.logger.init_args.save_dir": str(tmp_path)}  # demo.yaml's ${...}, resolved once
    first = spec.first_point()
    for index, parameter in enumerate(spec.parameters):
        before = spec.overrides({p.name: first[p.name] for p in spec.parameters[:index]})
        for value in candidates(parameter):
            argv = [*head, *before, f"--{parameter.name}={cli_text(value)}", "--run.name=a"]
            assert fixed.parse(argv) == parser.parse_args(argv), (parameter.name, value)


# ----------------------------------------------------------------------------------------------------------------
# Offline sweeps of real LOAO runs on a tiny synthetic cache (3 attack families, two planted heads).

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sweep")
    features, labels, attacks = planted_features(n=150, layers=3, heads=4, signal_heads=[(2, 1), (1, 3)],
                                                 strength=1.2)
    write_cache(root / "cache", features, labels, attacks)
    config = {"seed_everything": 0,
              "trainer": {"default_root_dir": str(root / "outputs"),
                          "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                     "init_args": {"save_dir": "${trainer.default_root_dir}", "name": "logs"}}},
              "model": {"detector": {"class_path": "sahs.models.detectors.LogisticDetector", "init_args": {"l2": 0.01}}},
              "data": {"cache_dir": str(root / "cache")}}
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return {"root": root, "features": features, "labels": labels, "attacks": attacks}


def sweep_file(tiny: dict, name: str, parameters: dict, method: str = "grid") -> Path:
    spec = {"name": name, "project": "sahs-test", "program": "sahs", "method": method,
            "metric": {"name": "loao/auroc_mean", "goal": "maximize"}, "parameters": parameters,
            "command": ["${program}", "loao", "--config", str(tiny["root"] / "run.yaml"), "${args}"]}
    path = tiny["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def read_summary(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_offline_grid_sweep_records_every_run_and_its_best_row_is_what_the_run_logged(tiny, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    detectors = [str(DETECTORS / "logistic.yaml"), str(DETECTORS / "group_lasso.yaml")]
    path = sweep_file(tiny, "grid", {"model.detector": {"values": detectors},
                                     "loao.top_k": {"values": [1, 4, 100]}})  # 100 > 12 heads: those runs fail
    main(["sweep", str(path), "--trainer.default_root_dir", str(tiny["root"] / "elsewhere")])
    printed = capsys.readouterr()
    sweep_dir = tiny["root"] / "elsewhere" / "sweeps" / "grid"
    # One console line per run, in grid order; each run's own output (fold progress) lies in its folder.
    lines = [line for line in printed.out.splitlines() if line.startswith("[sahs] grid ")]
    assert [line.split()[2:4] for line in lines] == [[f"{i}/6", f"grid-{i - 1:03d}"] for i in range(1, 7)]
    assert "fold 1/3" not in printed.out and printed.err == ""  # no W&B banner, no warnings

    rows = read_summary(sweep_dir)
    assert sorted((row["model.detector"], row["loao.top_k"]) for row in rows) == sorted(
        (d, str(k)) for d in detectors for k in (1, 4, 100))  # one row per run, each grid point once
    failed = [row for row in rows if row["status"] == "failed"]
    assert sorted(row["loao.top_k"] for row in failed) == ["100", "100"]
    assert all("loao.top_k must be in [1, 12], got 100" in row["error"] for row in failed)  # recorded with its error
    assert (sweep_dir / "auroc_vs_heads.png").stat().st_size > 0 and (sweep_dir / "summary.md").is_file()

    best = max((row for row in rows if row["status"] == "finished"), key=lambda row: float(row["loao/auroc_mean"]))
    run_dir = Path(best["dir"])
    assert "fold 3/3" in (run_dir / "sweep_run.log").read_text()
    logged = offline_run(run_dir)  # what the run itself logged to W&B (offline files)
    assert float(best["loao/auroc_mean"]) == pytest.approx(logged["logged"]["loao/auroc_mean"], abs=1e-12)
    assert float(best["loao/auroc_min"]) == pytest.approx(logged["logged"]["loao/auroc_min"], abs=1e-12)
    assert logged["name"] == best["run"] and logged["group"] == "grid" and logged["job_type"] == "loao"
    assert "sweep" in logged["tags"] and "loao" in logged["tags"]
    detector, chosen = logged["config"]["model"]["detector"], yaml.safe_load(Path(best["model.detector"]).read_text())
    assert detector["class_path"] == chosen["class_path"]  # the detector class and its init args
    assert {key: detector["init_args"][key] for key in chosen["init_args"]} == chosen["init_args"]
    assert logged["config"]["loao"]["top_k"] == int(best["loao.top_k"])
    assert isinstance(logged["config"]["loao"]["top_k"], int)  # an integer parameter stays an integer
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["loao"]["top_k"] == int(best["loao.top_k"])

    # Independently: the same LOAO called directly on the cache's features gives the same figure.
    spec = yaml.safe_load(Path(best["model.detector"]).read_text())["init_args"]
    detector = LogisticDetector(**spec) if "l2" in spec else SparseL1Detector(**spec, head_dim=8)
    direct = leave_one_attack_out(tiny["features"], tiny["labels"], tiny["attacks"],
                                  LoaoSettings(top_k=int(best["loao.top_k"]), detector=detector, seed=0))
    assert float(best["loao/auroc_mean"]) == pytest.approx(direct.auroc_mean, abs=1e-6)

    # The run's saved config re-runs it exactly, into a folder of its own.
    main(["loao", "--config", str(run_dir / "config.yaml")])
    again = json.loads((run_dir.parent / f"{run_dir.name}-2" / "metrics.json").read_text())
    assert again["loao/auroc_mean"] == pytest.approx(float(best["loao/auroc_mean"]), abs=1e-9)
    assert not (tiny["root"] / "outputs").exists()  # the command line's root took every output


@pytest.mark.parametrize("parameters", [
    {"model.detector": {"values": [str(DETECTORS / "group_lasso.yaml"), str(DETECTORS / "logistic.yaml")]},
     "loao.top_k": {"values": [2, 0.5]}, "loao.max_iter": {"values": [50]}},
    # A parameter below the logger (an identity key, and next to the interpolated save_dir): another order.
    {"trainer.logger.init_args.name": {"values": ["a", "b"]}, "seed_everything": {"values": [3]},
     "loao.top_k": {"values": [4]}},
], ids=["detector-top_k-max_iter", "logger-key"])
def test_each_sweep_run_saves_the_config_that_loao_resolves_from_the_same_arguments(tiny, parser, parameters,
                                                                                    monkeypatch):
    from sahs.experiments.records import read_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    name = "same-config-" + "-".join(sorted(parameters))[:40].replace(".", "_")
    path = sweep_file(tiny, name, parameters)
    main(["sweep", str(path), "--trainer.default_root_dir", str(tiny["root"] / "configs"), "--loao.n_boot=50"])
    spec, sweep_dir = load_sweep(path), (tiny["root"] / "configs" / "sweeps" / name).resolve()
    records = read_records(sweep_dir)
    assert len(records) == math.prod(len(p["values"]) for p in parameters.values())
    assert all(record.status == "finished" for record in records)
    for record in records:
        # What `sahs loao --config C <overrides> <the sweep's identity>` parses, in one full parse, as YAML.
        argv = [*spec.run_args, "--trainer.default_root_dir", str(tiny["root"] / "configs"), "--loao.n_boot=50",
                *spec.overrides(record.params), f"--trainer.default_root_dir={sweep_dir}", f"--run.group={name}",
                "--run.tags=[sweep]", "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
                f"--trainer.logger.init_args.project={spec.project}", "--trainer.logger.init_args.offline=true",
                f"--run.name={record.name}"]
        want = yaml.safe_load(parser.dump(parser.parse_args(argv), skip_none=False))
        saved = yaml.safe_load((Path(record.dir) / "config.yaml").read_text())
        assert saved == want, record.name
        for key, value in record.params.items():  # and each parameter's value is in it
            node = saved
            for part in key.split("."):
                node = node[part]
            if not str(value).endswith(".yaml"):
                assert node == value, key


def test_a_saved_config_goes_through_json_only_where_it_reads_back_as_yaml_would():
    from sahs.commands.run_config import _plain_json

    plain = {"a": [1, 2.5, None, True, "1e-3", {"b": "x: y"}], "c": float("inf"), "d": 10**20}
    assert json.loads(_plain_json(plain)) == yaml.safe_load(yaml.safe_dump(plain))
    for other in ({1: "integer key"}, {"a": (1, 2)}, {"a": {3}}, {"a": b"bytes"}):  # JSON would change these
        with pytest.raises(TypeError):
            _plain_json(other)


def test_a_parameter_that_names_no_config_key_fails_before_any_run(tiny, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    path = sweep_file(tiny, "typo", {"loao.top_k": {"values": [1, 2]},
                                     "model.detector.init_args.l22": {"values": [0.1]}})
    with pytest.raises(SystemExit):
        main(["sweep", str(path)])
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "sweep parameter 'model.detector.init_args.l22'" in error[0]
    assert "did you mean l2" in error[0]
    assert not (tiny["root"] / "outputs" / "sweeps" / "typo").exists()  # nothing ran, nothing written


def test_an_offline_sweep_needs_no_w_and_b_login_for_a_run_config_that_logs_online(tiny, tmp_path, monkeypatch,
                                                                                   capsys):
    """`--offline` alone (no WANDB_MODE, no credentials): the runs log offline, so no login is asked for."""
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no credentials on this machine, whatever it holds
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = yaml.safe_load((tiny["root"] / "run.yaml").read_text())
    config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.WandbLogger",
                                   "init_args": {"project": "sahs-test"}}  # online, as the shipped configs log
    online_config = tmp_path / "online.yaml"  # the shared run.yaml stays as the other tests read it
    online_config.write_text(yaml.safe_dump(config))
    path = sweep_file(tiny, "nologin", {"loao.top_k": {"values": [1, 2]}})
    spec = yaml.safe_load(path.read_text())
    spec["command"] = ["${program}", "loao", "--config", str(online_config), "${args}"]
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(SystemExit) as online:  # online, the sweep itself needs W&B: one line saying so
        main(["sweep", str(path)])
    assert online.value.code == 2 and "W&B has no login" in capsys.readouterr().err
    main(["sweep", str(path), "--offline"])
    sweep_dir = tiny["root"] / "outputs" / "sweeps" / "nologin"
    rows = read_summary(sweep_dir)
    assert sorted(row["run"] for row in rows) == ["nologin-000", "nologin-001"]
    assert {row["status"] for row in rows} == {"finished"}
    for row in rows:  # each run logged to W&B, offline
        assert offline_run(Path(row["dir"]))["logged"]["loao/auroc_mean"] == pytest.approx(
            float(row["loao/auroc_mean"]), abs=1e-12)


def test_a_w_and_b_sweep_runs_the_agents_draws_in_process(tiny, monkeypatch, capsys):
    """Online: the sweep is created on W&B and an agent runs here (W&B's server is replaced by a stand-in)."""
    import wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    created = {}

    def sweep(config, project=None, entity=None):
        created.update(config=config, project=project, entity=entity)
        return "abc123"

    def agent(sweep_id, function, count=None, project=None, entity=None):
        """Like W&B's agent (wandb/agents/pyagent.py): each draw reaches wandb.init through WANDB_SWEEP_PARAM_PATH."""
        created.update(agent=(sweep_id, count, project, entity))
        monkeypatch.setenv("WANDB_MODE", "offline")  # no server here: the runs are written offline
        for index, top_k in enumerate([1, 2][:count]):
            draw = tiny["root"] / f"draw-{index}.yaml"
            draw.write_text(yaml.safe_dump({"loao.top_k": {"value": top_k}}))
            monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(draw))
            wandb.teardown()  # as W&B's agent does before each run: settings are read from the environment again
            function()
            monkeypatch.delenv("WANDB_SWEEP_PARAM_PATH")

    monkeypatch.setattr(wandb, "sweep", sweep)
    monkeypatch.setattr(wandb, "agent", agent)
    path = sweep_file(tiny, "online", {"loao.top_k": {"values": [1, 2, 4]}}, method="random")
    spec = yaml.safe_load(path.read_text())
    spec["entity"] = "team"
    path.write_text(yaml.safe_dump(spec))
    main(["sweep", str(path), "--count", "2"])
    assert "wandb agent team/sahs-test/abc123" in capsys.readouterr().out
    assert created["config"]["parameters"] == spec["parameters"] and created["agent"] == ("abc123", 2, "sahs-test", "team")
    sweep_dir = tiny["root"] / "outputs" / "sweeps" / "online"
    rows = read_summary(sweep_dir)
    assert sorted(row["loao.top_k"] for row in rows) == ["1", "2"] and {row["status"] for row in rows} == {"finished"}
    agent_runs = offline_runs(sweep_dir / "wandb")  # the agent's runs: the W&B files live with the sweep
    for row in rows:
        logged = agent_runs[row["run"]]
        assert logged["group"] == "online" and logged["job_type"] == "loao"
        assert logged["config"]["loao"]["top_k"] == float(row["loao.top_k"])
        assert float(row["loao/auroc_mean"]) == pytest.approx(logged["logged"]["loao/auroc_mean"], abs=1e-12)


@pytest.mark.slow
def test_sahs_sweep_with_two_workers_runs_each_grid_point_once(tiny, monkeypatch, capfd):
    """`sahs sweep --workers 2`: two real `sahs` processes, each reading the cache once, share the grid."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(ROOT)
    path = sweep_file(tiny, "two", {"model.detector": {"values": [str(DETECTORS / "logistic.yaml")]},
                                    "loao.top_k": {"values": [1, 2, 3, 4]}, "loao.max_iter": {"values": [50, 100]}})
    main(["sweep", str(path), "--workers", "2", "--trainer.default_root_dir", str(tiny["root"] / "workers")])
    out = capfd.readouterr().out  # the workers write to this process's stdout file
    sweep_dir = tiny["root"] / "workers" / "sweeps" / "two"
    rows = read_summary(sweep_dir)
    assert sorted(row["run"] for row in rows) == [f"two-{index:03d}" for index in range(8)]
    assert {row["status"] for row in rows} == {"finished"}
    lines = [line for line in out.splitlines() if line.startswith("[sahs w") and " two-0" in line]  # run lines
    assert len(lines) == 8 and {line.split("]")[0] for line in lines} <= {"[sahs w1/2", "[sahs w2/2"}
    pids = {json.loads(path.read_text())["pid"] for path in (sweep_dir / "runs").glob("*.json")}
    assert len(pids) >= 1 and os.getpid() not in pids  # the runs ran in the workers, not in this process
    for row in rows:  # each run's figure is what LOAO gives on the cache for its point
        direct = leave_one_attack_out(tiny["features"], tiny["labels"], tiny["attacks"], LoaoSettings(
            top_k=int(row["loao.top_k"]), detector=LogisticDetector(**yaml.safe_load(
                (DETECTORS / "logistic.yaml").read_text())["init_args"]), seed=0, max_iter=int(row["loao.max_iter"])))
        assert float(row["loao/auroc_mean"]) == pytest.approx(direct.auroc_mean, abs=1e-6)


def test_the_same_sweep_with_other_overrides_is_refused_in_one_line_before_any_run(tiny, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    path = sweep_file(tiny, "seeded", {"loao.top_k": {"values": [1, 2]}})
    main(["sweep", str(path), "--count", "1"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["sweep", str(path), "--seed_everything", "1"])
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "'--seed_everything=1'" in error[0] and "--name" in error[0]
    sweep_dir = tiny["root"] / "outputs" / "sweeps" / "seeded"
    assert [r["run"] for r in read_summary(sweep_dir)] == ["seeded-000"]  # nothing ran
    main(["sweep", str(path), "--seed_everything", "1", "--name", "seeded1"])  # a new sweep, all its points
    assert [r["status"] for r in read_summary(tiny["root"] / "outputs" / "sweeps" / "seeded1")] == ["finished"] * 2
