"""Fill an activation cache from a frozen model and a prompt set, or reuse the one that is there."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from sahs.data import cache as cache_io
from sahs.extract.adapters import ModelAdapter, find_adapter
from sahs.extract.formatting import encode_batch
from sahs.extract.hooks import HeadCapture, last_real_position
from sahs.extract.models import ModelConfig, load_model, model_identity, release
from sahs.prompts.schema import prompt_set_hash

CACHE_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ExtractionSettings:
    """How activations are read and stored."""

    batch_size: int = 8
    """Prompts per prefill pass (padded on the left)."""
    layers: list[int] | None = None
    """Language-model layers to keep (all by default); the forward stops after the last one."""
    cache_dtype: Literal["float16", "float32", "bfloat16"] = "float16"
    """Storage dtype: float16 halves disk and reads; the detector upcasts to float32."""
    shard_size: int = 256
    """Prompts per shard file: the unit that an interrupted extraction resumes from."""


def expected_fingerprint(model: ModelConfig, prompts: datasets.Dataset, settings: ExtractionSettings) -> dict[str, Any]:
    """Everything that changes the cache's content; batch size and shard size do not."""
    return {
        "format_version": cache_io.FORMAT_VERSION,
        "model": model_identity(model),
        "prompts": {"sha256": prompt_set_hash(prompts), "count": len(prompts)},
        "extraction": {"hook": "o_proj_input", "position": "last_prompt_token",
                       "layers": sorted(set(settings.layers)) if settings.layers is not None else None,
                       "cache_dtype": settings.cache_dtype},
    }


def cache_layout(adapter: ModelAdapter, layers: list[int] | None) -> dict[str, Any]:
    """What each shard records about its rows' shape: ``[rows, len(layers), heads, head_dim]``."""
    kept = HeadCapture(adapter, layers).layers  # validated and sorted, no hooks registered
    return {**adapter.layout.as_dict(), "layers": kept, "family": adapter.family}


def capture_batch(model: PreTrainedModel, processor: Any, capture: HeadCapture, batch: dict[str, list[Any]],
                  device: torch.device) -> torch.Tensor:
    """One prefill pass (no generation) over a batch of prompt records -> ``[batch, layers, heads, head_dim]``."""
    inputs = encode_batch(processor, batch["text"], batch["image"]).to(device)
    positions = last_real_position(inputs["attention_mask"])
    return capture.run(lambda: model(**inputs, use_cache=False), positions)


def _batches(prompts: datasets.Dataset, indices: list[int], size: int) -> Iterator[dict[str, list[Any]]]:
    for start in range(0, len(indices), size):
        yield prompts.select(indices[start:start + size])[:]


def extract_into(root: Path, model_cfg: ModelConfig, prompts: datasets.Dataset, indices: list[int],
                 settings: ExtractionSettings, rank: int = 0, progress: bool = True) -> None:
    """Load the model, write the rows of ``indices`` as this rank's shards, release the model."""
    model, processor = load_model(model_cfg)
    try:
        write_activations(model, processor, root, prompts, indices, settings, rank, progress)
    finally:
        del model
        release()


@torch.inference_mode()
def write_activations(model: PreTrainedModel, processor: Any, root: Path, prompts: datasets.Dataset,
                      indices: list[int], settings: ExtractionSettings, rank: int = 0, progress: bool = True) -> None:
    """The extraction loop over a loaded model; each forward stops after the last kept layer."""
    adapter = find_adapter(model)
    device = next(model.parameters()).device
    writer = cache_io.ShardWriter(root, cache_layout(adapter, settings.layers), rank, settings.shard_size,
                                  CACHE_DTYPES[settings.cache_dtype])
    bar = tqdm(total=len(indices), desc="extracting activations", unit="prompt", disable=not progress)
    with HeadCapture(adapter, settings.layers, early_exit=True) as capture:
        for batch in _batches(prompts, indices, settings.batch_size):
            writer.add(batch["id"], capture_batch(model, processor, capture, batch, device))
            bar.update(len(batch["id"]))
    bar.close()
    writer.close()


@dataclass
class ExtractionPlan:
    """What is left to do in a cache folder that has been checked and cleaned."""

    done: set[str]
    """Ids of the prompts already in finished shards."""
    missing: list[int]
    """Row indices of the prompts still to extract, shortest text first (the order batches are made in)."""

    @property
    def status(self) -> Literal["built", "resumed"]:
        return "resumed" if self.done else "built"


def plan_extraction(root: Path, fingerprint: dict[str, Any], prompts: datasets.Dataset, *, rebuild: bool,
                    rank: int = 0, barrier: Callable[[], None] = lambda: None) -> ExtractionPlan:
    """Rank 0 readies the folder (clear a mismatch, drop unfinished shards); then every rank reads which
    prompts are left. All ranks must call it, since it waits at ``barrier``."""
    root = Path(root)
    # Every rank refuses a mismatch itself (read-only), so that none waits at a barrier for a failed rank 0.
    cache_io.check_folder(root, fingerprint, rebuild)
    barrier()
    if rank == 0:
        cache_io.prepare_folder(root, fingerprint, rebuild=rebuild)
        (root / "manifest.json").unlink(missing_ok=True)
        cache_io.finished_shards(root, verify=True)  # drops unfinished or corrupt shards
    barrier()
    done = cache_io.recorded_ids(root)  # read-only: a fast rank may already be writing its first shard
    missing = [i for i, pid in enumerate(prompts["id"]) if pid not in done]
    # Similar lengths share a batch, so left padding stays short (long jailbreak templates together).
    lengths = [len(text) for text in prompts["text"]]
    return ExtractionPlan(done, sorted(missing, key=lambda i: (lengths[i], i)))


def finish_cache(root: Path, prompts: datasets.Dataset) -> None:
    """Write the manifest once every rank's shards are on disk (rank 0 only)."""
    cache_io.write_manifest(root, prompts.select_columns(
        [c for c in cache_io.META_COLUMNS if c in prompts.column_names]))


def ensure_cache(root: str | Path, model_cfg: ModelConfig, prompts: datasets.Dataset, settings: ExtractionSettings,
                 *, on_mismatch: Literal["error", "rebuild"] = "error", rank: int = 0, world_size: int = 1,
                 barrier: Callable[[], None] = lambda: None, progress: bool = True) -> str:
    """Make ``root`` hold this model's activations for ``prompts``; returns reused, built or resumed.

    A finished cache with the same fingerprint is reused without loading the model. With several
    ranks (inside an already launched job, e.g. a fit-time callback), each extracts every
    ``world_size``-th missing prompt and rank 0 writes the manifest.
    """
    root = Path(root)
    fingerprint = expected_fingerprint(model_cfg, prompts, settings)
    if cache_io.is_complete(root, fingerprint):
        return "reused"
    plan = plan_extraction(root, fingerprint, prompts, rebuild=on_mismatch == "rebuild", rank=rank, barrier=barrier)
    if plan.missing[rank::world_size]:
        extract_into(root, model_cfg, prompts, plan.missing[rank::world_size], settings, rank, progress)
    barrier()
    if rank == 0:
        finish_cache(root, prompts)
    barrier()
    return plan.status
