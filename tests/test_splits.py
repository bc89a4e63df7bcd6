"""The one split helper: disjoint, whole requests on one side, strata kept in their shares."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from sahs.data.splits import split_rows


def test_without_groups_every_stratum_keeps_its_share_and_the_seed_fixes_the_split() -> None:
    labels = torch.tensor([0] * 70 + [1] * 30)
    attacks = np.array(["text", "typo"] * 50)
    rest, val, test = split_rows(labels, [0.2, 0.1], seed=1, attacks=attacks)
    assert sorted(torch.cat([rest, val, test]).tolist()) == list(range(100))
    for rows, share in ((rest, 0.7), (val, 0.2), (test, 0.1)):
        counts = Counter((int(labels[i]), attacks[i]) for i in rows.tolist())
        for stratum, total in Counter(zip(labels.tolist(), attacks)).items():
            assert abs(counts[stratum] - share * total) <= 1  # exact to rounding
    again = split_rows(labels, [0.2, 0.1], seed=1, attacks=attacks)
    assert all(torch.equal(a, b) for a, b in zip((rest, val, test), again))
    other = split_rows(labels, [0.2, 0.1], seed=2, attacks=attacks)
    assert not torch.equal(other[1], val)


def test_no_request_lands_on_two_sides_and_shares_hold_as_far_as_groups_allow() -> None:
    # MM-SafetyBench-shaped: every question rendered by four families, both labels.
    rng = np.random.default_rng(0)
    questions = 120
    groups = np.repeat(np.arange(questions), 4).astype(str)
    attacks = np.tile(["sd", "sd_typo", "typo", "text"], questions)
    labels = torch.as_tensor(np.repeat(rng.integers(0, 2, questions), 4))
    rest, val, test = split_rows(labels, [0.15, 0.15], seed=0, attacks=attacks, groups=groups)
    sides = [set(groups[rows.numpy()]) for rows in (rest, val, test)]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    assert sum(map(len, sides)) == questions
    for rows, share in ((val, 0.15), (test, 0.15)):
        for cls in (0, 1):
            total = int((labels == cls).sum())
            assert abs(int((labels[rows] == cls).sum()) - share * total) <= 4  # one question's four forms


def test_both_classes_moves_a_request_into_an_empty_part_or_names_the_problem() -> None:
    labels = torch.tensor([0] * 40 + [1] * 2)
    rest, held_out = split_rows(labels, [0.1], seed=0, both_classes=True)
    assert (labels[held_out] == 1).any() and (labels[rest] == 1).any()
    with pytest.raises(ValueError, match="only 1 request group"):
        split_rows(torch.tensor([0] * 40 + [1]), [0.1], seed=0, part="the rows", both_classes=True)
    with pytest.raises(ValueError, match="sum to less than 1"):
        split_rows(labels, [0.6, 0.5], seed=0)
