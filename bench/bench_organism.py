"""Building the model organism: wall and CPU seconds of each stage, against the one-minute target.

    OMP_NUM_THREADS=1 python bench/bench_organism.py     # about a minute on 2 cores

Builds ``sahs/tiny-llava-refuser`` (the default recipe, seed 0) into a fresh temporary folder, stage by
stage as ``build_organism`` runs them, and prints each stage's wall time and this process's CPU time
(user + sys; on a shared machine the steadier of the two, since the build runs on one thread).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from sahs.extract.organism import card_rates, ensure_organism, read_meta
from sahs.extract.refusal_tuning import (
    TuningRecipe, init_model, organism_config, tokenizer_corpus, train_tokenizer, tune, tuning_rows,
)
from sahs.extract.tiny import tiny_llava_processor


def clock() -> tuple[float, float]:
    times = os.times()
    return time.perf_counter(), times.user + times.system


def main() -> None:
    recipe = TuningRecipe()
    torch.set_num_threads(1)
    stages: list[tuple[str, float, float]] = []
    last = clock()

    def stage(name: str) -> None:
        nonlocal last
        now = clock()
        stages.append((name, now[0] - last[0], now[1] - last[1]))
        last = now

    rows = tuning_rows(recipe)
    stage(f"tuning rows ({len(rows)})")
    tokenizer = train_tokenizer(tokenizer_corpus(rows), recipe.vocab_size)
    stage(f"tokenizer ({len(tokenizer)} tokens)")
    model = init_model(organism_config(recipe, tokenizer), recipe.seed)
    tune(model, tokenizer, rows, recipe)
    stage(f"tuning ({recipe.steps} steps of {recipe.batch_size})")
    card_rates(model, tiny_llava_processor(model.config, tokenizer), recipe)
    stage(f"card ({recipe.card_requests} requests per label, 5 families)")
    with tempfile.TemporaryDirectory() as root:
        start = clock()
        folder = ensure_organism(recipe, Path(root), log=lambda line: None)
        end = clock()
        meta = read_meta(folder)
    print(f"{'stage':<44}{'wall s':>9}{'CPU s':>9}")
    for name, wall, cpu in stages:
        print(f"{name:<44}{wall:>9.1f}{cpu:>9.1f}")
    total_wall, total_cpu = sum(s[1] for s in stages), sum(s[2] for s in stages)
    print(f"{'sum of stages':<44}{total_wall:>9.1f}{total_cpu:>9.1f}")
    print(f"{'ensure_organism end to end (files included)':<44}{end[0] - start[0]:>9.1f}{end[1] - start[1]:>9.1f}")
    print(f"CPU time / 60 s target: {(end[1] - start[1]) / 60:.2f}")
    rates = meta["refusal_rates"]
    print("held-out refusal (malicious / benign): " + ", ".join(
        f"{family} {r['malicious_refusal']:.2f} / {r['benign_refusal']:.2f}" for family, r in rates.items()))


if __name__ == "__main__":
    main()
