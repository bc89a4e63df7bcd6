"""``sahs`` verbs beyond fit/validate/test/predict; each reads the same run config as ``sahs fit``."""
