"""The frozen-model callback: fill (or refresh) the activation cache before the detector trains."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import lightning as L

from sahs.extract.models import ModelConfig
from sahs.extract.pipeline import ExtractionSettings, ensure_cache
from sahs.prompts import DemoPrompts, PromptSource


class ActivationExtraction(L.Callback):
    """Runs the frozen model over the prompt set once, writing the DataModule's cache.

    The model is loaded, and the prompt set rendered, only when the cache is missing or stale (a cache made
    for the same prompt source is recognised by its identity, without rendering); the model is kept in eval
    mode with no grads and released before training starts. With several devices every rank extracts its
    share. A cache that is reused is verified first; a damaged one stops the run, naming ``sahs cache
    repair``.
    """

    def __init__(
        self,
        model: ModelConfig | None = None,
        prompts: PromptSource | None = None,
        extraction: ExtractionSettings | None = None,
        on_mismatch: Literal["error", "rebuild"] = "error",
        progress: bool = True,
    ) -> None:
        """
        Args:
            model: The frozen model to read heads from (the embedded tiny LLaVA by default).
            prompts: The prompt set (``class_path``/``init_args``); the built-in demo set by default.
            extraction: Batch size, layers, storage dtype and shard size.
            on_mismatch: What to do with a cache made by another model, prompt set or setting.
            progress: Show a progress bar while extracting.
        """
        self.model = model or ModelConfig()
        self.prompts = prompts or DemoPrompts()
        self.extraction = extraction or ExtractionSettings()
        self.on_mismatch = on_mismatch
        self.progress = progress
        self.status: str | None = None

    def fill(self, cache_dir: str, rank: int = 0, world_size: int = 1,
             barrier: Callable[[], None] = lambda: None) -> str:
        """Make ``cache_dir`` hold this model's activations for the prompt set; usable without a Trainer."""
        self.status = ensure_cache(
            cache_dir, self.model, self.prompts, self.extraction, on_mismatch=self.on_mismatch,
            rank=rank, world_size=world_size, barrier=barrier, progress=self.progress and rank == 0,
        )
        if rank == 0:
            print(f"[sahs] activation cache {self.status}: {cache_dir}")
        return self.status

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "cache_dir"):
            raise TypeError("ActivationExtraction fills the cache of an ActivationDataModule; pass one as `data`")
        if self.status is not None and datamodule.cache is not None:
            return  # checked for an earlier stage of this run (fit, then validate and test)
        status = self.fill(datamodule.cache_dir, trainer.global_rank, trainer.world_size, trainer.strategy.barrier)
        if status != "reused" or datamodule.cache is None:  # what DataModule.setup read may be stale or absent
            datamodule.load()
