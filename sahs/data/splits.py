"""One seeded split helper for every split in sahs: group-aware, stratified by label and attack family.

A *group* is the underlying request (the same question rendered as text, FigStep and typography
shares one group). No group ever lands on two sides of a split, so no request is trained on and
tested on in another form. Within that constraint every (label, attack) stratum keeps its share in
every part as closely as whole groups allow. Without groups every row is its own group and the
shares are exact to rounding, as a plain stratified split gives them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# This module imports nothing of sahs: the DataModule, the head ranking and LOAO all split with it.
CLASS_NAMES = {0: "benign prompts (label 0)", 1: "malicious prompts (label 1)"}


def _codes(values: Sequence | np.ndarray | torch.Tensor) -> np.ndarray:
    """Integer codes of ``values`` in sorted order of their string form (stable across processes)."""
    as_text = np.asarray([str(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)])
    return np.unique(as_text, return_inverse=True)[1].reshape(-1)


def split_rows(
    labels: Sequence[int] | torch.Tensor,
    fractions: Sequence[float],
    seed: int,
    *,
    attacks: Sequence[str] | np.ndarray | None = None,
    groups: Sequence | np.ndarray | None = None,
    part: str = "data",
    both_classes: bool = False,
) -> list[torch.Tensor]:
    """Split rows into ``[rest, part_1, ..., part_m]`` with ``part_i`` about ``fractions[i]`` of each stratum.

    Args:
        labels: ``[n]`` class of each row (0 benign, 1 malicious).
        fractions: Share of the rows for each held-out part; the rest (``1 - sum``) is the first part.
        seed: Seeds the order in which groups are dealt out.
        attacks: Attack family of each row; strata are (label, attack). Only the label when None.
        groups: Request id of each row; rows of one group always stay together. One group per row when None.
        part: Name of the rows in error messages.
        both_classes: Require both classes in every part (e.g. to fit on one and score AUROC on another).

    Returns:
        Sorted ``long`` row indices, one tensor per part, together covering every row once.
    """
    labels = torch.as_tensor(labels).cpu().long()
    n = len(labels)
    fractions = [float(f) for f in fractions]
    if any(f < 0 for f in fractions) or sum(fractions) >= 1:
        raise ValueError(f"split fractions of {part} must be >= 0 and sum to less than 1, got {fractions}")
    shares = np.array([1 - sum(fractions), *fractions])
    strata = _codes([f"{int(y)}/{a}" for y, a in zip(labels, attacks)] if attacks is not None else labels)
    group_ids = _codes(groups) if groups is not None else np.arange(n)
    if len(strata) != n or len(group_ids) != n:
        raise ValueError(f"{part}: labels, attacks and groups disagree on the number of rows")
    n_groups, n_strata = int(group_ids.max(initial=-1)) + 1, int(strata.max(initial=-1)) + 1
    counts = np.zeros((n_groups, n_strata))  # [groups, strata]: rows of each stratum in each group
    np.add.at(counts, (group_ids, strata), 1)
    # Deal groups out largest first (ties in seeded random order), each to the part that most lacks
    # its strata relative to that part's target; singleton groups give the exact stratified shares.
    order = np.random.default_rng(seed).permutation(n_groups)
    order = order[np.argsort(-counts[order].sum(1), kind="stable")]
    assignment = _deal(order, counts, shares)
    if both_classes:
        _give_every_part_both_classes(assignment, order, group_ids, labels.numpy(), fractions, part)
    row_part = assignment[group_ids]
    return [torch.from_numpy(np.flatnonzero(row_part == p)) for p in range(len(shares))]


def _deal(order: np.ndarray, counts: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Part of each group, dealt in ``order``; plain Python over each group's few strata (hot in sweeps)."""
    parts = [p for p in range(len(shares)) if shares[p] > 0]
    totals = counts.sum(0)
    deficit = [[float(shares[p] * t) for t in totals] for p in range(len(shares))]  # target - filled
    nonzero = [np.flatnonzero(row).tolist() for row in counts]
    assignment = np.empty(len(counts), dtype=np.int64)
    for group in order.tolist():
        strata, sizes = nonzero[group], counts[group]
        members = [float(sizes[s]) for s in strata]
        best, best_need = parts[0], None
        for p in parts:  # the first part wins ties, so the rest fills before held-out parts
            need = sum(deficit[p][s] * m for s, m in zip(strata, members))
            if best_need is None or need > best_need:
                best, best_need = p, need
        assignment[group] = best
        for s, m in zip(strata, members):
            deficit[best][s] -= m
    return assignment


def _give_every_part_both_classes(assignment: np.ndarray, order: np.ndarray, group_ids: np.ndarray,
                                  labels: np.ndarray, fractions: list[float], part: str) -> None:
    """Move single groups so that every part holds both classes (small strata can round to zero)."""
    n_parts = len(fractions) + 1
    for cls in (0, 1):
        holders = np.unique(group_ids[labels == cls])  # groups with a row of this class
        for p in range(n_parts):
            if (assignment[holders] == p).any():
                continue
            # Take a group of this class from the part that has the most of them, smallest first.
            per_part = np.bincount(assignment[holders], minlength=n_parts)
            donor = int(np.argmax(per_part))
            holder_set = set(holders.tolist())
            movable = [g for g in order.tolist() if g in holder_set and assignment[g] == donor]
            if per_part[donor] < 2 or not movable:
                name = "the rest" if p == 0 else f"held-out part {p} ({fractions[p - 1]:g})"
                raise ValueError(
                    f"{part}: {name} of the split gets no {CLASS_NAMES[cls]}: there are only "
                    f"{len(holders)} request group(s) of that class; add prompts of that class or "
                    f"lower the split fraction")
            sizes = np.bincount(group_ids)[movable]
            assignment[movable[int(np.argmin(sizes))]] = p
