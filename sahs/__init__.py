"""sahs: find the safety attention heads of vision-language models and train detectors on them."""

__version__ = "0.1.0"
