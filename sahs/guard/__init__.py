"""The guard: a live model plus an exported detector, refusing risky prompts at their first token.

Beside it, ``sahs.guard.ablation`` ablates chosen heads of the live model (zero or mean).
"""

from sahs.guard.guard import DEFAULT_REFUSAL, DetectorMismatchError, GuardResult, SafetyGuard, model_config_for

__all__ = ["DEFAULT_REFUSAL", "DetectorMismatchError", "GuardResult", "SafetyGuard", "model_config_for"]
