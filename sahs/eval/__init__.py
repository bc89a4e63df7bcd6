"""Evaluation: detection metrics, per-head probes that locate safety heads, leave-one-attack-out."""
