"""Fill an activation cache from a frozen model and a prompt set, or reuse the one that is there.

One extraction at a time writes into a cache folder (``CacheLock``, held by rank 0 for a whole DDP
job); a second one waits, then reuses what the first one built. A finished cache is verified before
it is reused, and a damaged one is refused unless asked to repair it, which redoes only its bad rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from sahs.data import cache as cache_io
from sahs.data.lock import CacheLock
from sahs.errors import UserError
from sahs.extract.adapters import ModelAdapter, find_adapter
from sahs.extract.formatting import encode_batch
from sahs.extract.hooks import HeadCapture, last_real_position
from sahs.extract.models import ModelConfig, load_model, model_identity, release
from sahs.prompts.identity import PromptSet
from sahs.prompts.schema import PromptSource, read_image

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
    lock_timeout: float | None = None
    """Seconds to wait while another extraction writes into the same cache folder, then refuse;
    None waits as long as it takes (and then reuses what it built), 0 refuses at once."""


class ExtractionInputError(UserError, ValueError):
    """A prompt set or extraction setting that cannot give a cache."""


def expected_fingerprint(model: ModelConfig, prompts: PromptSource | datasets.Dataset | PromptSet,
                         settings: ExtractionSettings, *, prompts_field: dict[str, Any] | None = None
                         ) -> dict[str, Any]:
    """Everything that changes the cache's content; batch size, shard size and the lock timeout do not.

    The ``prompts`` field is ``PromptSet.field`` (which renders the set) unless ``prompts_field`` is given:
    the field recorded by a cache whose prompt set is known to be this one.
    """
    return {
        "format_version": cache_io.FORMAT_VERSION,
        "model": model_identity(model),
        "prompts": prompts_field if prompts_field is not None else PromptSet.of(prompts).field,
        "extraction": {"hook": "o_proj_input", "position": "last_prompt_token",
                       "layers": sorted(set(settings.layers)) if settings.layers is not None else None,
                       "cache_dtype": settings.cache_dtype},
    }


def _recorded_prompts(root: Path) -> Any:
    """The ``prompts`` field of the fingerprint already in ``root`` (None if absent or unreadable)."""
    try:
        return (cache_io.read_fingerprint(root) or {}).get("prompts")
    except cache_io.CacheDamagedError:
        return None  # reported when the cache is opened


def reusable(root: Path, model: ModelConfig, prompts: PromptSet, settings: ExtractionSettings) -> bool:
    """A finished, intact cache whose fingerprint names this prompt source's identity: reused unrendered."""
    field = prompts.same_source(_recorded_prompts(root))
    return field is not None and verified(root, expected_fingerprint(model, prompts, settings, prompts_field=field))


def rendered_fingerprint(root: Path, model: ModelConfig, prompts: PromptSet, settings: ExtractionSettings,
                         note: bool = True) -> dict[str, Any]:
    """The fingerprint of the rendered set. A cache in ``root`` whose rows hash the same keeps its recorded
    field (made before identities were recorded, or by an edit that renders the same rows), with a note."""
    recorded = _recorded_prompts(root)
    if prompts.same_source(recorded) is None and prompts.same_rows(recorded):
        if note and prompts.digest is not None:
            print(f"[sahs] {root}: the prompt set was rendered to check this cache (same rows, but the cache "
                  "does not record this prompt source's definition); re-extract into a new cache_dir to reuse "
                  "it without rendering")
        return expected_fingerprint(model, prompts, settings, prompts_field=recorded)
    return expected_fingerprint(model, prompts, settings)


def check_inputs(prompts: datasets.Dataset, settings: ExtractionSettings) -> None:
    """Refuse what would fail deep inside the extraction, with the setting to change."""
    if len(prompts) == 0:
        raise ExtractionInputError(
            "the prompt set is empty, so there is nothing to extract: check `prompts` (a Mixture's "
            "`attacks` filter, a benchmark's root folder, a saved set's path)")
    if settings.layers is not None and len(settings.layers) == 0:
        raise ExtractionInputError("extraction.layers is empty: list the layers to keep, or leave it unset "
                                   "(null) to keep every layer")
    for name in ("batch_size", "shard_size"):
        if getattr(settings, name) < 1:
            raise ExtractionInputError(f"extraction.{name} must be at least 1, got {getattr(settings, name)}")


def cache_layout(adapter: ModelAdapter, layers: list[int] | None) -> dict[str, Any]:
    """What each shard records about its rows' shape: ``[rows, len(layers), heads, head_dim]``."""
    try:
        kept = HeadCapture(adapter, layers).layers  # validated and sorted, no hooks registered
    except ValueError as error:
        raise ExtractionInputError(f"extraction.layers: {error} (this model has "
                                   f"{adapter.layout.num_layers} layers)") from None
    return {**adapter.layout.as_dict(), "layers": kept, "family": adapter.family}


def undecoded(prompts: datasets.Dataset) -> datasets.Dataset:
    """The id, text and image columns, images left as stored, so that each is decoded by ``read_image``
    (an unreadable image is then reported with its prompt id)."""
    return prompts.select_columns(["id", "text", "image"]).cast_column("image", datasets.Image(decode=False))


def capture_batch(model: PreTrainedModel, processor: Any, capture: HeadCapture, batch: dict[str, list[Any]],
                  device: torch.device) -> torch.Tensor:
    """One prefill pass (no generation) over a batch of prompt records -> ``[batch, layers, heads, head_dim]``."""
    inputs = encode_batch(processor, batch["text"], batch["image"]).to(device)
    positions = last_real_position(inputs["attention_mask"])
    return capture.run(lambda: model(**inputs, use_cache=False), positions)


def _batches(prompts: datasets.Dataset, batches: list[list[int]]) -> Iterator[dict[str, list[Any]]]:
    rows = undecoded(prompts)
    for indices in batches:
        batch = rows.select(indices)[:]
        batch["image"] = [read_image(pid, value) for pid, value in zip(batch["id"], batch["image"])]
        yield batch


def extract_into(root: Path, model_cfg: ModelConfig, prompts: datasets.Dataset, batches: list[list[int]],
                 settings: ExtractionSettings, rank: int = 0, progress: bool = True) -> None:
    """Load the model, write the rows of ``batches`` (row indices, one list a prefill) as this rank's shards,
    release the model."""
    model, processor = load_model(model_cfg)
    try:
        write_activations(model, processor, root, prompts, batches, settings, rank, progress)
    finally:
        del model
        release()


@torch.inference_mode()
def write_activations(model: PreTrainedModel, processor: Any, root: Path, prompts: datasets.Dataset,
                      batches: list[list[int]], settings: ExtractionSettings, rank: int = 0,
                      progress: bool = True) -> None:
    """The extraction loop over a loaded model; each forward stops after the last kept layer."""
    adapter = find_adapter(model)
    device = next(model.parameters()).device
    writer = cache_io.ShardWriter(root, cache_layout(adapter, settings.layers), rank, settings.shard_size,
                                  CACHE_DTYPES[settings.cache_dtype])
    bar = tqdm(total=sum(map(len, batches)), desc="extracting activations", unit="prompt", disable=not progress)
    with HeadCapture(adapter, settings.layers, early_exit=True) as capture:
        for batch in _batches(prompts, batches):
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
    order: list[int] = field(default_factory=list)
    """Every prompt's row index, shortest text first: the order that fixes each shard's and batch's prompts."""
    reused: bool = False
    """The cache was finished and intact once the lock was held (another run built it meanwhile)."""
    repair: bool = False
    lock: CacheLock | None = field(default=None, repr=False)
    """Held by rank 0 until the manifest is written."""

    @property
    def status(self) -> Literal["reused", "built", "resumed", "repaired"]:
        if self.reused:
            return "reused"
        return "repaired" if self.repair else "resumed" if self.done else "built"

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def batches(self, rank: int, world_size: int, shard_size: int, batch_size: int) -> list[list[int]]:
        """This rank's prefill batches of missing prompts; each lies within one shard of the full plan.

        The full plan is fixed by ``order`` alone: rank ``r`` takes every ``world_size``-th prompt, cut into
        shards of ``shard_size``, each cut into batches. A resume keeps it, so a prompt meets the same
        neighbours (the same left padding, the same numerics) as in an uninterrupted run, whatever the
        two sizes; shards already finished are skipped whole.
        """
        missing = set(self.missing)
        share = self.order[rank::world_size]
        batches = []
        for start in range(0, len(share), shard_size):
            left = [i for i in share[start:start + shard_size] if i in missing]
            batches += [left[b:b + batch_size] for b in range(0, len(left), batch_size)]
        return batches


def verified(root: Path, fingerprint: dict[str, Any]) -> bool:
    """True for a finished cache of ``fingerprint`` whose shards pass the cheap checks and the checksums
    (each file hashed once per process); a damaged one raises ``CacheDamagedError``, naming the shard."""
    if not cache_io.is_complete(root, fingerprint):
        return False
    cache_io.ActivationCache(root).verify()
    return True


def _ready_folder(root: Path, fingerprint: dict[str, Any], rebuild: bool, repair: bool) -> None:
    """Rank 0, holding the lock: leave a finished, intact cache as it is (another run may have built it
    while this one waited); else clear a mismatch (``rebuild``) and keep only whole, distinct shards."""
    try:
        if verified(root, fingerprint):
            return
    except cache_io.CacheDamagedError as damage:
        if not repair:
            raise
        print(f"[sahs] repairing {root}: {'; '.join(damage.problems)}")
    cache_io.prepare_folder(root, fingerprint, rebuild=rebuild)
    (root / "manifest.json").unlink(missing_ok=True)
    for tmp in root.glob(".*.json.*.tmp"):  # a manifest or fingerprint.json half written
        tmp.unlink()
    # Drops unfinished, truncated and corrupt shards, and shards that only repeat other shards' prompts.
    cache_io.drop_duplicate_shards(root, cache_io.finished_shards(root, verify=True))


def plan_extraction(root: Path, fingerprint: dict[str, Any], prompts: datasets.Dataset, *, rebuild: bool,
                    repair: bool = False, rank: int = 0, barrier: Callable[[], None] = lambda: None,
                    lock_timeout: float | None = None) -> ExtractionPlan:
    """Rank 0 takes the folder's lock and readies it (clear a mismatch, drop bad shards); then every rank
    reads which prompts are left. All ranks must call it, since it waits at ``barrier``."""
    root = Path(root)
    # Every rank refuses a mismatch itself (read-only), so that none waits at a barrier for a failed rank 0.
    cache_io.check_folder(root, fingerprint, rebuild)
    barrier()
    lock = None
    if rank == 0:
        lock = CacheLock(root, lock_timeout).acquire()  # the other ranks wait at the barrier below
        try:
            _ready_folder(root, fingerprint, rebuild, repair)
        except BaseException:
            lock.release()
            raise
    barrier()
    if cache_io.is_complete(root, fingerprint):  # rank 0 found it finished and intact: nothing to do
        return ExtractionPlan(set(prompts["id"]), [], reused=True, lock=lock)
    done = cache_io.recorded_ids(root)  # read-only: a fast rank may already be writing its first shard
    missing = [i for i, pid in enumerate(prompts["id"]) if pid not in done]
    if rank == 0 and done:
        print(f"[sahs] {len(prompts) - len(missing)} of {len(prompts)} prompts are in finished shards; "
              f"extracting the other {len(missing)}")
    # Similar lengths share a batch, so left padding stays short (long jailbreak templates together).
    lengths = [len(text) for text in prompts["text"]]
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
    return ExtractionPlan(done, sorted(missing, key=lambda i: (lengths[i], i)), order, repair=repair, lock=lock)


def finish_cache(root: Path, prompts: datasets.Dataset) -> None:
    """Write the manifest once every rank's shards are on disk (rank 0 only, holding the lock)."""
    cache_io.write_manifest(root, prompts.select_columns(
        [c for c in cache_io.META_COLUMNS if c in prompts.column_names]))


def ensure_cache(root: str | Path, model_cfg: ModelConfig, prompts: PromptSource | datasets.Dataset | PromptSet,
                 settings: ExtractionSettings, *, on_mismatch: Literal["error", "rebuild"] = "error",
                 repair: bool = False, rank: int = 0, world_size: int = 1, barrier: Callable[[], None] = lambda: None,
                 progress: bool = True) -> str:
    """Make ``root`` hold this model's activations for ``prompts``; returns reused, built, resumed or repaired.

    A finished cache made for the same prompt source (its identity, stated without rendering) is verified
    and reused without loading the model or rendering the prompts; a damaged one is refused
    (``CacheDamagedError``) unless ``repair``, which re-extracts only the rows of bad or missing shards.
    Otherwise the prompts are rendered. With several ranks (inside an already launched job, e.g. a fit-time
    callback), each extracts every ``world_size``-th missing prompt and rank 0 writes the manifest.
    """
    prompt_set, root = PromptSet.of(prompts), Path(root)
    if not repair and reusable(root, model_cfg, prompt_set, settings):
        return "reused"
    rows = prompt_set.rows
    check_inputs(rows, settings)
    fingerprint = rendered_fingerprint(root, model_cfg, prompt_set, settings, note=rank == 0)
    if not repair and verified(root, fingerprint):
        return "reused"
    plan = plan_extraction(root, fingerprint, rows, rebuild=on_mismatch == "rebuild", repair=repair, rank=rank,
                           barrier=barrier, lock_timeout=settings.lock_timeout)
    try:
        batches = plan.batches(rank, world_size, settings.shard_size, settings.batch_size)
        if batches:
            extract_into(root, model_cfg, rows, batches, settings, rank, progress)
        barrier()
        if rank == 0 and not plan.reused:
            finish_cache(root, rows)
        barrier()
    finally:
        plan.release()
    return plan.status
