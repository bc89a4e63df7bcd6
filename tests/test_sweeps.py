"""Every sweep in sweeps/ names parameters that the run config it drives accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sahs.cli import SahsCLI
from sahs.data.datamodule import ActivationDataModule
from sahs.models.module import DetectorModule

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


def sample(spec: dict) -> object:
    """One value a W&B sweep could draw for this parameter."""
    if "values" in spec:
        return spec["values"][-1]
    if "value" in spec:
        return spec["value"]
    return spec["min"]


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.name)
def test_sweep_parameters_are_accepted_by_its_run_config(sweep):
    spec = yaml.safe_load(sweep.read_text())
    assert spec["metric"]["name"] in {"loao/auroc_mean", "loao/auroc_min", "val/auroc"}
    command = spec["command"]
    config = ROOT / command[command.index("--config") + 1]
    overrides = [f"--{name}={sample(values)}" for name, values in spec["parameters"].items()]
    cli = SahsCLI(DetectorModule, ActivationDataModule, parser_kwargs={"parser_mode": "omegaconf"}, run=False,
                  args=["--config", str(config), "--trainer.logger=false", *overrides])
    for name, values in spec["parameters"].items():  # each drawn value lands where the sweep means it
        assert cli.config[name] == yaml.safe_load(str(sample(values))), name
    assert isinstance(cli.model, DetectorModule)
