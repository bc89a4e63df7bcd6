"""Activation patching on the model organism: cost per patched head against one plain forward of the same batch.

    OMP_NUM_THREADS=2 python bench/bench_patching.py [--pairs 64] [--batch 16] [--rounds 3]   # a few minutes on 2 cores

Patches every (layer, head) of ``sahs/tiny-llava-refuser`` (4 layers x 4 heads) over ``--pairs`` malicious/benign
pairs of the demo prompt set (same attack family), ``--batch`` pairs per forward, with ``run_patching`` (no
generation), and times one plain forward of each pair batch: ``model(**inputs)`` (logits at every position,
what a plain call computes) and, stricter, with ``logits_to_keep=1`` (the last position only, as patching
reads). Cost per head = the whole patching time (the clean forward, its recording and path patching
included) divided by heads x batches; its ratio to the plain forward is the figure (target <= 1.2). Rounds
interleave the three measurements and the best round of each is kept, in wall and in CPU time (user +
sys) on 2 threads: on a shared machine the minimum is the least disturbed.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from sahs.experiments.patching import PatchSettings, _batches, _encode, make_pairs, run_patching
from sahs.extract.adapters import find_adapter
from sahs.extract.models import ModelConfig, load_model
from sahs.prompts import DemoPrompts


def clock() -> tuple[float, float]:
    times = os.times()
    return time.perf_counter(), times.user + times.system


def timed(work) -> tuple[float, float]:
    start = clock()
    work()
    end = clock()
    return end[0] - start[0], end[1] - start[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, processor = load_model(ModelConfig(name="sahs/tiny-llava-refuser", seed=0))
    prompts = DemoPrompts(attacks=["text", "figstep", "typo", "rephrase"]).load()
    settings = PatchSettings(refusal_tokens=["I'm sorry"], compliance_tokens=["Sure"], max_pairs=args.pairs,
                             batch_size=args.batch, max_new_tokens=0, progress=False)
    pairs = make_pairs(prompts, range(len(prompts)), settings)
    layout = find_adapter(model).layout
    heads = layout.num_layers * layout.num_heads
    batches = [_encode(model, processor, texts, images)[0]
               for _, _, texts, images in _batches(prompts, pairs, settings.batch_size)]

    def plain(**extra) -> None:
        with torch.inference_mode():
            for inputs in batches:
                model(**inputs, use_cache=False, **extra)

    plain()  # warm-up
    plain_times, last_times, patch_times = [], [], []
    for _ in range(args.rounds):
        plain_times.append(timed(plain))
        last_times.append(timed(lambda: plain(logits_to_keep=1)))
        patch_times.append(timed(lambda: run_patching(model, processor, prompts, pairs, settings)))
    best_plain = [min(t[i] for t in plain_times) / len(batches) for i in (0, 1)]
    best_last = [min(t[i] for t in last_times) / len(batches) for i in (0, 1)]
    best_patch = [min(t[i] for t in patch_times) / (heads * len(batches)) for i in (0, 1)]
    print(f"organism: {layout.num_layers} layers x {layout.num_heads} heads; {len(pairs)} pairs in {len(batches)} "
          f"batches of up to {2 * settings.batch_size} prompts; torch threads {torch.get_num_threads()}")
    print(f"{'':<36}{'wall ms':>10}{'CPU ms':>10}")
    print(f"{'plain forward of one pair batch':<36}{1e3 * best_plain[0]:>10.1f}{1e3 * best_plain[1]:>10.1f}")
    print(f"{'plain forward, last position logits':<36}{1e3 * best_last[0]:>10.1f}{1e3 * best_last[1]:>10.1f}")
    print(f"{'patching, per head per pair batch':<36}{1e3 * best_patch[0]:>10.1f}{1e3 * best_patch[1]:>10.1f}")
    print(f"{'ratio to plain (target <= 1.2)':<36}{best_patch[0] / best_plain[0]:>10.3f}{best_patch[1] / best_plain[1]:>10.3f}")
    print(f"{'ratio to plain, last position':<36}{best_patch[0] / best_last[0]:>10.3f}{best_patch[1] / best_last[1]:>10.3f}")
    total = min(t[0] for t in patch_times)
    print(f"all {heads} heads over {len(pairs)} pairs, both directions and path patching: {total:.1f} s wall")


if __name__ == "__main__":
    main()
