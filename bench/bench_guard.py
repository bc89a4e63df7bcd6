"""What the guard costs on the random 251M LLaVA of bench_extraction.py, on CPU: time to first token and a
short generation, SafetyGuard against plain ``generate`` on the same prompts, and the detector's own cost.

    OMP_NUM_THREADS=1 python bench/bench_guard.py        # about 4 minutes on a 2-core machine

Each prompt is generated alone (batch of one, as a chat server's first token). Plain means encode,
``generate``, decode; the guard's ``generate`` does the same plus its hooks and its decision. The detector
is a logistic regression on 16 heads of 8 layers, with a threshold no prompt reaches, so every prompt is
generated in full (the guard's costliest case: a refused prompt stops after the prefill).
After a warm-up, modes alternate prompt by prompt (the first one rotating) for ``--rounds`` rounds; ratios
are taken within a round and the median printed. Because a 1% difference is within the noise of a
shared machine, the guard's own work is also clocked directly: the time spent inside its hooks (armed
during the prefill, idle during decoding), registering and removing them, and in its decision. Process
CPU time is the steadier clock on a busy machine: wall time also counts the moments another process
held the core.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from bench_extraction import build_model, prompt_set

from sahs.data.selection import FeatureSelection
from sahs.extract.adapters import find_adapter
from sahs.extract.formatting import encode_batch
from sahs.extract.hooks import HeadCapture
from sahs.guard import SafetyGuard
from sahs.guard import guard as guard_module
from sahs.models.artifact import DetectorArtifact, detector_spec
from sahs.models.detectors import LogisticDetector

HEADS = [(layer, head) for layer in range(4, 12) for head in (3, 7)]  # 16 heads, 8 hooked layers
IDENTITY = {"name": "bench/random-llava-251m", "dtype": "float32"}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class GuardClock:
    """Seconds (wall, CPU) the guard itself spends: its hooks, their registration and removal, its decision."""

    spent = dict.fromkeys(CLOCKS, 0.0)

    @classmethod
    def timed(cls, call: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = {name: clock() for name, clock in CLOCKS.items()}
            try:
                return call(*args, **kwargs)
            finally:
                for name, clock in CLOCKS.items():
                    cls.spent[name] += clock() - start[name]
        return wrapper


class TimedCapture(HeadCapture):
    def _hook(self, layer: int) -> Any:
        return GuardClock.timed(super()._hook(layer))

    __enter__ = GuardClock.timed(HeadCapture.__enter__)
    __exit__ = GuardClock.timed(HeadCapture.__exit__)


class TimedDecision(guard_module._FirstTokenDecision):
    __call__ = GuardClock.timed(guard_module._FirstTokenDecision.__call__)


def bench_detector(model: Any) -> DetectorArtifact:
    layout = find_adapter(model).layout
    torch.manual_seed(0)
    detector = LogisticDetector()
    detector.build(len(HEADS) * layout.head_dim)
    selection = FeatureSelection(HEADS, {**layout.as_dict(), "family": "llava"}, {"model": IDENTITY}, {})
    features = selection.num_features
    return DetectorArtifact(selection, detector_spec(detector), 2.0, {"rule": "fixed"}, torch.zeros(features),
                            torch.ones(features), detector.state_dict())


def plain_generate(model: Any, processor: Any, prompt: dict[str, Any], tokens: int) -> str:
    inputs = encode_batch(processor, [prompt["text"]], [prompt["image"]])
    output = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def timed_rounds(model: Any, processor: Any, guard: SafetyGuard, prompts: list[dict[str, Any]], tokens: int,
                 rounds: int) -> dict[str, dict[str, list[float]]]:
    """Per mode and round: seconds (wall, CPU) over all prompts, and the guard's own seconds."""
    def run(mode: str, prompt: dict[str, Any]) -> None:
        if mode == "plain":
            plain_generate(model, processor, prompt, tokens)
        else:
            (result,) = guard.generate([prompt], max_new_tokens=tokens, min_new_tokens=tokens)
            assert not result.flagged

    modes = ("plain", "guard")
    samples = {mode: {key: [] for key in (*CLOCKS, *(f"own_{name}" for name in CLOCKS))} for mode in modes}
    with torch.inference_mode():
        for mode in modes:  # warm-up
            run(mode, prompts[0])
        for r in range(rounds):
            totals = {mode: dict.fromkeys(samples[mode], 0.0) for mode in modes}
            for p, prompt in enumerate(prompts):
                first = (r + p) % 2
                for mode in modes[first:] + modes[:first]:
                    GuardClock.spent = dict.fromkeys(CLOCKS, 0.0)
                    start = {name: clock() for name, clock in CLOCKS.items()}
                    run(mode, prompt)
                    for name, clock in CLOCKS.items():
                        totals[mode][name] += clock() - start[name]
                        totals[mode][f"own_{name}"] += GuardClock.spent[name]
            for mode in modes:
                for key, value in totals[mode].items():
                    samples[mode][key].append(value)
    return samples


def detector_cost(guard: SafetyGuard, layout: Any, batch: int, repeats: int = 2000) -> float:
    """Seconds per prompt of the decision alone: pick the heads from a capture and score them."""
    activations = torch.randn(batch, len(guard.selection.layers), layout.num_heads, layout.head_dim)
    for _ in range(50):
        guard.score_activations(activations)
    start = time.perf_counter()
    for _ in range(repeats):
        guard.score_activations(activations)
    return (time.perf_counter() - start) / repeats / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per mode (after one warm-up)")
    parser.add_argument("--tokens", type=int, default=16, help="length of the short generation")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per round (half with an image)")
    args = parser.parse_args()

    model, processor = build_model()
    guard_module.HeadCapture, guard_module._FirstTokenDecision = TimedCapture, TimedDecision  # clock the guard
    guard = SafetyGuard(model, processor, bench_detector(model), IDENTITY, batch_size=1)
    dataset = prompt_set()
    prompts = [{"text": dataset[i]["text"], "image": dataset[i]["image"]} for i in range(args.prompts)]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: random LLaVA, {params:.0f}M parameters; {len(prompts)} prompts alone (half with an image); "
          f"detector on {len(HEADS)} heads of {len(guard.selection.layers)} layers; torch threads: "
          f"{torch.get_num_threads()}")

    median = statistics.median
    for label, tokens in (("time to first token", 1), (f"{args.tokens}-token generation", args.tokens)):
        samples = timed_rounds(model, processor, guard, prompts, tokens, args.rounds)
        n = len(prompts)
        plain, guarded = samples["plain"], samples["guard"]
        print(f"{label}, median seconds per prompt: plain {median(plain['wall']) / n:.4f} wall / "
              f"{median(plain['cpu']) / n:.4f} CPU; guard {median(guarded['wall']) / n:.4f} / "
              f"{median(guarded['cpu']) / n:.4f}")
        target = " (target <= 1%)" if tokens == 1 else ""
        for clock in CLOCKS:
            ratio = median(g / p for g, p in zip(guarded[clock], plain[clock]))
            own = median(o / p for o, p in zip(guarded[f"own_{clock}"], plain[clock]))
            print(f"  [{clock}] guard / plain {ratio:.4f} (overhead {100 * (ratio - 1):+.2f}%); guard's own work, "
                  f"clocked: {1e3 * median(guarded[f'own_{clock}']) / n:.3f} ms per prompt = {100 * own:.3f}% "
                  f"of plain{target}")

    layout = find_adapter(model).layout
    for batch in (1, 8):
        print(f"detector decision (pick {len(HEADS)} heads, scale, logistic) with a batch of {batch}: "
              f"{1e6 * detector_cost(guard, layout, batch):.1f} us per prompt")


if __name__ == "__main__":
    main()
