"""Write ``sahs predict``'s scores as one row per prompt, CSV or Parquet, in the run folder (and W&B)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import pandas as pd
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import WandbLogger

COLUMNS = ("id", "score", "flagged", "label", "attack", "source", "split")


class PredictionWriter(BasePredictionWriter):
    """Collects each predict batch's scores with its cache rows and writes them once, rank 0, in cache order.

    A prompt is ``flagged`` when its score reaches the detector's threshold (chosen on validation and
    kept in the checkpoint). ``split`` says which part of the training split the prompt was in.
    """

    def __init__(self, format: Literal["csv", "parquet"] = "csv", output: str | None = None,  # noqa: A002
                 wandb_table: bool = True) -> None:
        """
        Args:
            format: File format of the predictions.
            output: File to write; by default ``predictions.<format>`` in the run folder (the logger's folder).
            wandb_table: Also log the rows as a W&B table (``predict/predictions``) when logging to W&B.
        """
        super().__init__(write_interval="batch")
        self.format = format
        self.output = output
        self.wandb_table = wandb_table
        self.path: Path | None = None
        self._rows: list[torch.Tensor] = []
        self._scores: list[torch.Tensor] = []

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows, self._scores = [], []

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if len(batch) < 3:
            raise TypeError("PredictionWriter needs predict batches of (features, labels, cache rows), "
                            "as ActivationDataModule.predict_dataloader gives")
        self._rows.append(batch[2].detach().cpu())
        self._scores.append(prediction.detach().float().cpu())

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows, scores = _gather(torch.cat(self._rows), torch.cat(self._scores))
        self._rows, self._scores = [], []
        if not trainer.is_global_zero:
            return
        table = self.table(trainer.datamodule, rows, scores, float(pl_module.threshold))
        self.path = self._path(trainer)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.format == "parquet":
            table.to_parquet(self.path, index=False)
        else:
            table.to_csv(self.path, index=False)
        for logger in trainer.loggers:
            if self.wandb_table and isinstance(logger, WandbLogger):
                logger.log_table(key="predict/predictions", dataframe=table)
        print(f"[sahs] {len(table)} predictions written to {self.path}")

    @staticmethod
    def table(datamodule: Any, rows: torch.Tensor, scores: torch.Tensor, threshold: float) -> pd.DataFrame:
        """One row per prompt, in cache order; each prompt once even if a distributed sampler repeated it."""
        order = rows.argsort(stable=True)
        rows, scores = rows[order], scores[order]
        keep = torch.ones_like(rows, dtype=torch.bool)
        keep[1:] = rows[1:] != rows[:-1]
        rows, scores = rows[keep].tolist(), scores[keep]
        cache = datamodule.cache
        split_of = {int(row): name for name, index in datamodule.splits.items() for row in index.tolist()}
        columns = {name: cache.column(name) for name in ("id", "label", "attack", "source")}
        return pd.DataFrame({
            "id": [columns["id"][row] for row in rows],
            "score": scores.numpy(),
            "flagged": (scores >= threshold).numpy(),
            "label": [int(columns["label"][row]) for row in rows],
            "attack": [columns["attack"][row] for row in rows],
            "source": [columns["source"][row] for row in rows],
            "split": [split_of.get(row, "") for row in rows],
        }, columns=list(COLUMNS))

    def _path(self, trainer: L.Trainer) -> Path:
        if self.output is not None:
            return Path(self.output)
        return Path(trainer.log_dir or trainer.default_root_dir) / f"predictions.{self.format}"


def _gather(rows: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's rows and scores, concatenated (a no-op in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows, scores
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (rows, scores))
    return torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts])
