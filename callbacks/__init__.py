"""Lightning callbacks of sahs, installed as ``sahs.callbacks``."""

from sahs.callbacks.extraction import ActivationExtraction

__all__ = ["ActivationExtraction"]
