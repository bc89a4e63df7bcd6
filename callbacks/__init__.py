"""Lightning callbacks of sahs, installed as ``sahs.callbacks``."""

from sahs.callbacks.extraction import ActivationExtraction
from sahs.callbacks.predictions import PredictionWriter

__all__ = ["ActivationExtraction", "PredictionWriter"]
