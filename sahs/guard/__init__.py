"""Working on the live model: head ablation (and, beside it, guarding generation)."""
