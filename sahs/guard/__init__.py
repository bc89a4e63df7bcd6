"""The guard: a live model plus an exported detector, refusing risky prompts at their first token.

Head ablation and patching hooks live beside the capture hooks, in ``sahs.extract.interventions``.
"""

from sahs.guard.guard import DEFAULT_REFUSAL, DetectorMismatchError, GuardResult, SafetyGuard, model_config_for

__all__ = ["DEFAULT_REFUSAL", "DetectorMismatchError", "GuardResult", "SafetyGuard", "model_config_for"]
