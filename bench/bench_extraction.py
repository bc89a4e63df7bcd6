"""What extraction costs on a mid-size random LLaVA on CPU: hooks, early exit, peak memory, cache I/O.

    OMP_NUM_THREADS=1 python bench/bench_extraction.py        # about 3 minutes on a 2-core machine

The model has the real LLaVA classes and random weights: a CLIP ViT-B/32-sized vision tower (width
768, 12 layers, 12 heads, patch 32, 224 px) and a 12-layer Llama of width 768 with 12 heads. Timings
are medians over rounds in which the modes alternate, after a warm-up, on the same encoded batches.
Peak memory is measured in a fresh subprocess per mode: the kernel's high-water mark of resident
memory (``VmHWM``), reset once the model is built (``/proc/self/clear_refs``), minus the resident
memory at that point. ``tracemalloc`` would miss it: torch allocates tensors outside Python's allocator.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from sahs.data import cache as cache_io
from sahs.data.cache import ActivationCache
from sahs.extract.adapters import find_adapter
from sahs.extract.formatting import encode_batch
from sahs.extract.hooks import HeadCapture, last_real_position
from sahs.extract.pipeline import ExtractionSettings, write_activations
from sahs.extract.tiny import SPECIAL_TOKENS, tiny_llava_processor
from sahs.prompts.schema import make_dataset

N_PROMPTS, BATCH_SIZE, LAYERS = 8, 4, 12
MIDDLE = 5  # early exit after layer 5: layers 0-5 run, half of the language model
MODES = ("plain forward", "hooks, no early exit", "extraction, all layers", f"early exit, layers=[{MIDDLE}]")


def bench_config() -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=32, projection_dim=512)
    text = LlamaConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=LAYERS, num_attention_heads=12,
                       num_key_value_heads=12, vocab_size=32000, max_position_embeddings=2048,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=256 + SPECIAL_TOKENS.index("<image>"),
                       image_seq_length=(224 // 32) ** 2, vision_feature_layer=-2,
                       vision_feature_select_strategy="default")


def build_model() -> tuple[LlavaForConditionalGeneration, Any]:
    """Random weights, the same in every process; the embedded model's byte tokenizer and CLIP processor."""
    config = bench_config()
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval().requires_grad_(False), tiny_llava_processor(config)


def prompt_set():
    """Half of the prompts carry a noise image (the typographic-attack case); texts of ~40-120 bytes."""
    rng = random.Random(0)
    words = "how do i make a safe plan for the picnic explain each step with care and detail".split()
    records = []
    for i in range(N_PROMPTS):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(8, 24)))
        image = None
        if i % 2 == 0:
            image = Image.frombytes("RGB", (256, 256), bytes(rng.getrandbits(8) for _ in range(256 * 256 * 3)))
        records.append({"id": f"b{i:02d}", "text": text, "image": image, "label": i % 2, "attack": "text",
                        "source": "bench", "category": "misc"})
    return make_dataset(records)


def encoded_batches(processor: Any, prompts) -> list[tuple[Any, torch.Tensor]]:
    batches = []
    for start in range(0, len(prompts), BATCH_SIZE):
        rows = prompts[start:start + BATCH_SIZE]
        inputs = encode_batch(processor, rows["text"], rows["image"])
        batches.append((inputs, last_real_position(inputs["attention_mask"])))
    return batches


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # CPU time: robust to a busy machine


class DecoderClock:
    """Adds up the time each forward spends before it enters the language model (vision tower, merge)."""

    def __init__(self, model: Any):
        self.model = model
        self.before_decoder = dict.fromkeys(CLOCKS, 0.0)
        self._start = dict.fromkeys(CLOCKS, 0.0)
        model.get_decoder().register_forward_pre_hook(self._entered)

    def _entered(self, *_: Any) -> None:
        for name, clock in CLOCKS.items():
            self.before_decoder[name] += clock() - self._start[name]

    def forward(self, inputs: Any) -> Any:
        self._start = {name: clock() for name, clock in CLOCKS.items()}
        return self.model(**inputs, use_cache=False)


def timed_modes(model: Any, batches: list[Any], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Per mode and round, seconds (wall and CPU) of one pass over ``batches``, and of its part before the decoder.

    Modes alternate batch by batch, the first one rotating, so that a busy neighbour slows all modes alike
    and ratios can be taken round by round.
    """
    adapter, clock = find_adapter(model), DecoderClock(model)
    captures = {MODES[1]: HeadCapture(adapter, None, early_exit=False),
                MODES[2]: HeadCapture(adapter, None, early_exit=True),
                MODES[3]: HeadCapture(adapter, [MIDDLE], early_exit=True)}

    def run(mode: str, inputs: Any, positions: torch.Tensor) -> None:
        if mode == MODES[0]:
            clock.forward(inputs)
            return
        with captures[mode] as hooks:
            hooks.run(lambda: clock.forward(inputs), positions)

    samples: dict[str, dict[str, list[float]]] = {m: {k: [] for k in (*CLOCKS, *(f"{c}_before_decoder" for c in CLOCKS))}
                                                  for m in MODES}
    with torch.inference_mode():
        for mode in MODES:  # warm-up: allocator, thread pool, lazy inits
            for inputs, positions in batches:
                run(mode, inputs, positions)
        for r in range(rounds):
            totals = {m: dict.fromkeys(samples[m], 0.0) for m in MODES}
            for b, (inputs, positions) in enumerate(batches):
                first = (r * len(batches) + b) % len(MODES)
                for mode in MODES[first:] + MODES[:first]:
                    clock.before_decoder = dict.fromkeys(CLOCKS, 0.0)
                    start = {c: f() for c, f in CLOCKS.items()}
                    run(mode, inputs, positions)
                    for c, f in CLOCKS.items():
                        totals[mode][c] += f() - start[c]
                        totals[mode][f"{c}_before_decoder"] += clock.before_decoder[c]
            for mode in MODES:
                for key, value in totals[mode].items():
                    samples[mode][key].append(value)
    return samples


# ---------------------------------------------------------------- peak memory, one fresh process per mode


def status_kib(field: str) -> int:
    """A KiB figure of this process from ``/proc/self/status`` (VmRSS: now, VmHWM: peak)."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


PROBES = ("plain", "hooks", "extraction")


def memory_probe(mode: str) -> dict[str, float]:
    """Build the model, reset the high-water mark, run every batch once; resident-memory figures in MiB.

    ``plain``: encode and forward. ``hooks``: the same plus captures of all layers (no early exit) written
    with a ShardWriter. ``extraction``: the pipeline's own loop (``write_activations``, early exit).
    """
    model, processor = build_model()
    prompts = prompt_set()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
        reset = True
    except OSError:
        reset = False
    base = status_kib("VmRSS")
    with tempfile.TemporaryDirectory() as root, torch.inference_mode():
        if mode == "extraction":
            write_activations(model, processor, Path(root), prompts, list(range(len(prompts))),
                              ExtractionSettings(batch_size=BATCH_SIZE, shard_size=4), progress=False)
        else:
            adapter = find_adapter(model)
            writer = cache_io.ShardWriter(Path(root), {"layers": list(range(LAYERS))}, shard_size=4)
            for start in range(0, len(prompts), BATCH_SIZE):
                rows = prompts[start:start + BATCH_SIZE]
                inputs = encode_batch(processor, rows["text"], rows["image"])
                if mode == "plain":
                    model(**inputs, use_cache=False)
                    continue
                with HeadCapture(adapter, None, early_exit=False) as hooks:
                    rows_out = hooks.run(lambda: model(**inputs, use_cache=False),
                                         last_real_position(inputs["attention_mask"]))
                writer.add(rows["id"], rows_out)
            writer.close()
    return {"base": base / 1024, "peak": status_kib("VmHWM") / 1024, "reset": reset}


def peak_memory() -> dict[str, dict[str, float]]:
    figures = {}
    for mode in PROBES:
        done = subprocess.run([sys.executable, __file__, "--memory-probe", mode], capture_output=True, text=True,
                              check=True)
        figures[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


# ---------------------------------------------------------------- cache I/O


def cache_io_rates(rows: int = 2048, shard_size: int = 256, batch: int = 16) -> dict[str, float]:
    """Rows per second through ShardWriter (float16, with checksums) and back through ActivationCache."""
    layout = {"num_layers": LAYERS, "num_heads": 12, "head_dim": 64, "layers": list(range(LAYERS)), "family": "llava"}
    block = torch.randn(batch, LAYERS, 12, 64)  # [batch, layers, heads, head_dim]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        writer = cache_io.ShardWriter(root, layout, shard_size=shard_size)
        for first in range(0, rows, batch):
            writer.add([f"r{i:06d}" for i in range(first, first + batch)], block)
        writer.close()
        write = rows / (time.perf_counter() - start)
        cache_io.write_manifest(root, ({"id": f"r{i:06d}", "label": i % 2} for i in range(rows)))
        cache = ActivationCache(root)
        start = time.perf_counter()
        everything = cache.read()
        read_all = rows / (time.perf_counter() - start)
        start = time.perf_counter()
        cache.read([(layer, head) for layer in range(0, LAYERS, 3) for head in (0, 5)])
        read_few = rows / (time.perf_counter() - start)
        mib = sum(p.stat().st_size for p in (root / "shards").glob("*.safetensors")) / 2**20
    assert everything.shape == (rows, LAYERS * 12, 64)
    return {"write": write, "read_all": read_all, "read_8_heads": read_few, "mib": mib, "rows": rows}


# ---------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per mode (after one warm-up)")
    parser.add_argument("--memory-probe", choices=PROBES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe)))
        return

    model, processor = build_model()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    batches = encoded_batches(processor, prompt_set())
    tokens = sum(int(inputs["attention_mask"].sum()) for inputs, _ in batches)
    print(f"model: random LLaVA, {params:.0f}M parameters; {N_PROMPTS} prompts ({tokens} tokens, half with an "
          f"image) in batches of {BATCH_SIZE}; torch threads: {torch.get_num_threads()}")

    samples = timed_modes(model, batches, args.rounds)
    median = statistics.median
    print(f"median seconds per pass over the {len(batches)} batches (wall / CPU; the part before the LM in brackets):")
    for name in MODES:
        t = {key: median(values) for key, values in samples[name].items()}
        print(f"  {name:<24} {t['wall']:6.3f} / {t['cpu']:6.3f} s   [{t['wall_before_decoder']:.3f} / "
              f"{t['cpu_before_decoder']:.3f} s]")
    def ratio(a: list[float], b: list[float]) -> float:  # within each round, then the median over rounds
        return median(x / y for x, y in zip(a, b))

    for c in CLOCKS:
        plain, hooks, full, middle = (samples[name][c] for name in MODES)
        full_lm, middle_lm = ([t - v for t, v in zip(samples[name][c], samples[name][f"{c}_before_decoder"])]
                              for name in MODES[2:])
        print(f"[{c}] throughput with hooks / plain forward {ratio(plain, hooks):.3f} (target >= 0.97); "
              f"pipeline extraction / plain forward {ratio(plain, full):.3f}")
        print(f"[{c}] early exit at layer {MIDDLE}: {ratio(full, middle):.2f}x faster than extracting all layers "
              f"({ratio(hooks, middle):.2f}x than a full forward); language part {ratio(full_lm, middle_lm):.2f}x "
              f"(layer ratio {LAYERS}/{MIDDLE + 1} = {LAYERS / (MIDDLE + 1):.2f})")

    mem = peak_memory()
    note = "" if mem["plain"]["reset"] else " (VmHWM could not be reset: peaks include building the model)"
    print(f"peak resident memory{note}, MiB (above the loaded model):")
    for mode in PROBES:
        m = mem[mode]
        print(f"  {mode:<11} {m['peak']:6.0f} (+{m['peak'] - m['base']:4.0f})  ratio to plain "
              f"{m['peak'] / mem['plain']['peak']:.3f} (target <= 1.1)")

    io = cache_io_rates()
    print(f"cache ({io['rows']} rows of [{LAYERS}, 12, 64] float16, {io['mib']:.0f} MiB): write {io['write']:.0f} "
          f"rows/s, read all heads {io['read_all']:.0f} rows/s, read 8 heads {io['read_8_heads']:.0f} rows/s")


if __name__ == "__main__":
    main()
