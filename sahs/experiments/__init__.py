"""Experiments above the detectors and metrics: leave-one-attack-out, transfer, sweeps."""

from sahs.experiments.settings import LoaoSettings

__all__ = ["LoaoSettings"]
