"""Loaders that read published safety benchmarks from their own on-disk layout into the prompt schema."""

from sahs.prompts.benchmarks.base import BenchmarkSource, OnBadImage
from sahs.prompts.benchmarks.contrast import VLGuard, XSTest, MMVet
from sahs.prompts.benchmarks.jailbreaks import HADES, FigStepSafeBench, JailbreakV28K, MMSafetyBench

__all__ = [
    "HADES",
    "BenchmarkSource",
    "FigStepSafeBench",
    "JailbreakV28K",
    "MMSafetyBench",
    "MMVet",
    "OnBadImage",
    "VLGuard",
    "XSTest",
]
