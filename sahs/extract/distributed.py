"""Extraction as a Lightning ``predict`` run, so that ``devices``, ``num_nodes`` and ``strategy`` spread it.

Every rank runs prefill batches of the frozen model under ``HeadCapture`` and writes its rows as its
own shards (``shards/r{rank}-*``); after a barrier rank 0 writes the manifest that ties them together.
Each rank takes every ``world_size``-th prompt of the full plan (``ExtractionPlan.batches``), so each prompt goes to exactly one rank: no
padding duplicates as with ``DistributedSampler``, and unlike Lightning's unrepeated predict sampler
it accepts a rank with nothing left to do (a resume with fewer prompts than ranks). The writer also
drops a repeated id. The cache folder must be visible to every node (a shared file system).
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import datasets
import lightning as L
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.strategies import Strategy
from torch.utils.data import DataLoader, Dataset, Sampler

from sahs.data import cache as cache_io
from sahs.extract.adapters import find_adapter
from sahs.extract.hooks import HeadCapture
from sahs.extract.models import ModelConfig, load_model, release
from sahs.prompts.identity import PromptSet
from sahs.prompts.schema import PromptSource, read_image
from sahs.extract.pipeline import (
    CACHE_DTYPES,
    ExtractionPlan,
    ExtractionSettings,
    cache_layout,
    capture_batch,
    check_inputs,
    finish_cache,
    plan_extraction,
    rendered_fingerprint,
    reusable,
    undecoded,
    verified,
)

# Trainer arguments that extraction sets itself (a fit config's values would break it). Precision is
# pinned: the model's dtype is ``ModelConfig.dtype``, recorded in the fingerprint, and no autocast applies.
OWN_TRAINER_ARGS = frozenset({"callbacks", "logger", "precision", "use_distributed_sampler", "inference_mode",
                              "enable_checkpointing", "enable_model_summary", "enable_progress_bar"})
RECORD_COLUMNS = ("id", "text", "image")


class _PromptRows(Dataset):
    """The records of ``prompts`` at ``indices`` (id, text, decoded image)."""

    def __init__(self, prompts: datasets.Dataset, indices: list[int]):
        self.rows = undecoded(prompts)
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[self.indices[i]]
        return {**row, "image": read_image(row["id"], row["image"])}


class _FixedBatches(Sampler[list[int]]):
    """Batches given in advance (positions into the dataset), in order: the extraction plan's batches."""

    def __init__(self, batches: list[list[int]]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _collate(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    # Lists, not tensors: texts and PIL images are encoded by the model's processor in predict_step.
    return {key: [row[key] for row in rows] for key in RECORD_COLUMNS}


class ExtractionData(L.LightningDataModule):
    """The prompts that the cache still lacks; rank 0 readies the folder before any rank reads it."""

    def __init__(self, root: Path, prompts: datasets.Dataset, fingerprint: dict[str, Any],
                 settings: ExtractionSettings, rebuild: bool, repair: bool = False):
        super().__init__()
        self.root, self.prompts, self.fingerprint = Path(root), prompts, fingerprint
        self.settings, self.rebuild, self.repair = settings, rebuild, repair
        self.plan: ExtractionPlan | None = None

    def setup(self, stage: str) -> None:
        self.plan = plan_extraction(self.root, self.fingerprint, self.prompts, rebuild=self.rebuild,
                                    repair=self.repair, rank=self.trainer.global_rank,
                                    barrier=self.trainer.strategy.barrier, lock_timeout=self.settings.lock_timeout)

    def predict_dataloader(self) -> DataLoader:
        assert self.plan is not None, "setup() runs first"
        batches = self.plan.batches(self.trainer.global_rank, self.trainer.world_size, self.settings.shard_size,
                                    self.settings.batch_size)  # may be empty; no batch spans two shards
        share = [index for batch in batches for index in batch]
        positions, start = [], 0
        for batch in batches:
            positions.append(list(range(start, start + len(batch))))
            start += len(batch)
        return DataLoader(_PromptRows(self.prompts, share), batch_sampler=_FixedBatches(positions),
                          collate_fn=_collate)


class FrozenExtractor(L.LightningModule):
    """The frozen model as a predict-only module: a batch of prompt records in, ids and activations out.

    The model is loaded when prediction starts (a rank with no prompts never loads it) straight onto
    this rank's device, and kept outside the module tree: Lightning's precision plugin must not
    recast it (its dtype is part of the cache fingerprint) and its teardown must not copy it to the host.
    """

    def __init__(self, model_cfg: ModelConfig, settings: ExtractionSettings):
        super().__init__()
        if model_cfg.device_map is not None:
            raise ValueError("`device_map` spreads one model over several GPUs, while a Trainer puts one copy on "
                             "each device: unset it, or extract with the fit-time ActivationExtraction callback")
        self.model_cfg, self.settings = model_cfg, settings
        # A resume can leave a rank with no prompt: it runs no batch but still meets the others at barriers.
        self.allow_zero_length_dataloader_with_multiple_devices = True
        self.layout: dict[str, Any] | None = None
        self._frozen: tuple[Any, ...] | None = None  # (model, processor, adapter); a tuple is not registered

    def on_predict_start(self) -> None:
        model, processor = load_model(replace(self.model_cfg, device=str(self.device)))
        adapter = find_adapter(model)
        self._frozen = (model, processor, adapter)
        self.layout = cache_layout(adapter, self.settings.layers)

    def predict_step(self, batch: dict[str, list[Any]], batch_idx: int) -> dict[str, Any]:
        assert self._frozen is not None, "on_predict_start loads the model"
        model, processor, adapter = self._frozen
        # Early exit: the forward stops right after the last kept layer's heads are read.
        with HeadCapture(adapter, self.settings.layers, early_exit=True) as capture:
            activations = capture_batch(model, processor, capture, batch, self.device)
        return {"ids": batch["id"], "activations": activations}  # activations: [batch, layers, heads, head_dim]

    def on_predict_end(self) -> None:
        self._frozen = None
        release()

    def teardown(self, stage: str) -> None:
        self.on_predict_end()


class ShardPredictionWriter(BasePredictionWriter):
    """Writes each rank's rows as its own shards; at teardown, after a barrier, rank 0 writes the manifest
    (unless the cache was found finished once the lock was held) and releases the folder's lock.

    Teardown runs on every rank, also on one that got no prompts (its predict loop is skipped) and
    when nothing was left to extract, so the barriers always match.
    """

    def __init__(self, root: Path, prompts: datasets.Dataset, settings: ExtractionSettings):
        super().__init__(write_interval="batch")
        self.root, self.prompts, self.settings = Path(root), prompts, settings
        self._writer: cache_io.ShardWriter | None = None
        self._seen: set[str] = set()

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: dict[str, Any],
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        if self._writer is None:  # created here: the layout is known once the model is loaded
            self._writer = cache_io.ShardWriter(self.root, pl_module.layout, trainer.global_rank,
                                                self.settings.shard_size, CACHE_DTYPES[self.settings.cache_dtype])
        keep = [i for i, pid in enumerate(prediction["ids"]) if pid not in self._seen]
        ids = [prediction["ids"][i] for i in keep]
        self._seen.update(ids)
        if ids:
            self._writer.add(ids, prediction["activations"][keep])

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        trainer.strategy.barrier("sahs_shards_written")
        plan = trainer.datamodule.plan
        if trainer.is_global_zero and plan is not None and not plan.reused:
            finish_cache(self.root, self.prompts)
        if plan is not None:
            plan.release()
        trainer.strategy.barrier("sahs_manifest_written")


def extract_with_trainer(
    cache_dir: str | Path,
    model_cfg: ModelConfig,
    prompts: PromptSource | datasets.Dataset | PromptSet,
    settings: ExtractionSettings,
    *,
    on_mismatch: Literal["error", "rebuild"] = "error",
    repair: bool = False,
    accelerator: str | Accelerator = "auto",
    devices: int | str | list[int] = "auto",
    num_nodes: int = 1,
    strategy: str | Strategy = "auto",
    progress: bool = True,
    **trainer_kwargs: Any,
) -> str:
    """Fill ``cache_dir`` with a Lightning predict run; returns reused, built, resumed or repaired.

    The same rules as ``ensure_cache``: a finished cache with the same fingerprint is verified and reused
    without loading the model (nor rendering the prompts, when it was made for this prompt source); a damaged
    one is refused unless ``repair``; another one is refused (``on_mismatch="error"``) or rebuilt, and prompts
    in finished shards are skipped. With ``strategy="ddp"`` every process runs this function (Lightning
    relaunches the script); the model's device comes from the Trainer, its dtype from ``model_cfg``.
    ``resumed`` means that finished shards were there before the run. Other keyword arguments go to
    ``lightning.Trainer`` (e.g. ``plugins`` for a cluster environment), except ``OWN_TRAINER_ARGS``.
    """
    clashing = sorted(OWN_TRAINER_ARGS & set(trainer_kwargs))
    if clashing:
        raise ValueError(f"extraction sets the Trainer arguments {clashing} itself; leave them out")
    prompt_set, root = PromptSet.of(prompts), Path(cache_dir)
    if not repair and reusable(root, model_cfg, prompt_set, settings):
        return "reused"  # a cache made for this prompt source: nothing is rendered
    prompts = prompt_set.rows
    check_inputs(prompts, settings)
    fingerprint = rendered_fingerprint(root, model_cfg, prompt_set, settings)
    if not repair and verified(root, fingerprint):
        return "reused"
    rebuild = on_mismatch == "rebuild"
    cache_io.check_folder(root, fingerprint, rebuild)  # refuse a mismatch here, before any process is started
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
        callbacks=[ShardPredictionWriter(root, prompts, settings)], logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=progress, use_distributed_sampler=False,
        inference_mode=True, precision="32-true", **trainer_kwargs,
    )
    data = ExtractionData(root, prompts, fingerprint, settings, rebuild, repair)
    try:
        with warnings.catch_warnings():
            # The loader only decodes images (the work is in predict_step); nothing left is a valid resume.
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*across ranks is zero.*")
            trainer.predict(FrozenExtractor(model_cfg, settings), datamodule=data, return_predictions=False)
    finally:
        if data.plan is not None:
            data.plan.release()
    assert data.plan is not None, "setup() plans the extraction"
    return data.plan.status
