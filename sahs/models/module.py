"""The LightningModule that trains a detector on cached head activations."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, BinaryAveragePrecision

from sahs.data.selection import FeatureSelection
from sahs.eval.metrics import attack_success_rate, choose_threshold, fpr_at_tpr, passing_rate
from sahs.models.artifact import CHECKPOINT_KEY, DetectorArtifact, build_detector, detector_spec
from sahs.models.detectors import Detector, LogisticDetector


def _metrics(prefix: str) -> MetricCollection:
    return MetricCollection(
        {"auroc": BinaryAUROC(), "auprc": BinaryAveragePrecision(), "acc": BinaryAccuracy()}, prefix=prefix)


class DetectorModule(L.LightningModule):
    """Binary malicious-prompt detector: BCE on one logit, optional standardization fitted on train.

    Its checkpoints are self-contained (``sahs.models.artifact``): besides the weights, scaler and threshold
    they keep the heads in feature order, the cache fingerprint, the split and the detector's spec, so
    ``load_from_checkpoint`` needs no config, and a restored module hands its heads to the DataModule
    (``datamodule.adopt``), which refuses another selection or another model's cache.
    """

    def __init__(
        self,
        detector: Detector | None = None,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        standardize: bool = True,
        optimizer: Literal["auto", "adam", "sgd"] = "auto",
        threshold_rule: Literal["tpr", "youden"] = "tpr",
        target_tpr: float = 0.95,
    ) -> None:
        """
        Args:
            detector: The network (``class_path``/``init_args``); the paper's logistic detector by default.
            lr: Adam learning rate.
            weight_decay: Adam weight decay (prefer the detector's own penalty, which spares the bias).
            standardize: Scale features by mean and std of the training split before the detector.
            optimizer: ``auto`` is Adam, except plain SGD for L1 / group-lasso detectors: their proximal
                step needs gradient steps of size ``lr``, which Adam's per-weight scaling breaks.
            threshold_rule: How validation chooses the operating threshold: ``tpr`` (the highest one flagging
                ``target_tpr`` of malicious prompts) or ``youden`` (max TPR - FPR).
            target_tpr: The share of malicious validation prompts the ``tpr`` threshold flags.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["detector"])
        self.detector = detector if detector is not None else LogisticDetector()
        self.register_buffer("feature_mean", torch.zeros(0))
        self.register_buffer("feature_std", torch.ones(0))
        # Operating threshold on the malicious probability, chosen on validation (95% TPR), used on test.
        self.register_buffer("threshold", torch.tensor(0.5))
        # The heads, cache fingerprint and split the features come from: taken from the DataModule at setup,
        # or from a checkpoint, and written into every checkpoint.
        self.feature_selection: FeatureSelection | None = None
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self.loss = nn.BCEWithLogitsLoss()
        self.val_metrics = _metrics("val/")
        self.test_metrics = _metrics("test/")

    def setup(self, stage: str) -> None:
        # Shapes come from the data: build once the DataModule knows the selected heads.
        datamodule = self.trainer.datamodule
        if self.feature_selection is not None:  # restored from a checkpoint: score the heads it was trained on
            datamodule.adopt(self.feature_selection)
        if not self.detector.built:
            if getattr(self.detector, "head_dim", 0) is None:  # group lasso needs each head's width
                self.detector.head_dim = datamodule.head_dim
            self.detector.build(datamodule.num_features)
        if stage == "fit" or self.feature_mean.numel() == 0:
            x, _ = datamodule.split_tensors("train")
            self.feature_mean = x.mean(0) if self.hparams.standardize else torch.zeros(x.shape[1])
            self.feature_std = x.std(0).clamp_min(1e-6) if self.hparams.standardize else torch.ones(x.shape[1])
        self.feature_selection = datamodule.selection

    @property
    def threshold_rule(self) -> dict[str, Any]:
        return {"rule": self.hparams.threshold_rule, "target_tpr": self.hparams.target_tpr, "chosen_on": "val"}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.feature_selection is None:
            raise RuntimeError("DetectorModule is saved before setup: it does not know its features yet")
        checkpoint[CHECKPOINT_KEY] = DetectorArtifact.checkpoint_record(
            self.feature_selection, self.detector, self.threshold_rule)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Rebuild the stored detector unless the configured one is the same: a checkpoint scores as trained.
        artifact = DetectorArtifact.from_checkpoint(checkpoint)
        if not self.detector.built or detector_spec(self.detector) != artifact.detector:
            if self.detector.built:
                rank_zero_info(f"[sahs] using the checkpoint's detector {artifact.detector['class_path']} "
                               f"{artifact.detector['init_args']} instead of the configured one")
            self.detector = build_detector(artifact.detector)
        self.feature_selection = artifact.features
        trainer = self._trainer
        if trainer is not None and getattr(trainer, "datamodule", None) is not None:
            trainer.datamodule.adopt(artifact.features)

    def load_state_dict(self, state_dict, *args, **kwargs):  # type: ignore[override]
        # The scaling buffers start empty; take their size from the checkpoint.
        self.feature_mean = torch.empty_like(state_dict["feature_mean"])
        self.feature_std = torch.empty_like(state_dict["feature_std"])
        return super().load_state_dict(state_dict, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch]`` for features ``[batch, features]``."""
        return self.detector((x - self.feature_mean) / self.feature_std)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss(self(x), y)
        if not self.detector.proximal:
            loss = loss + self.detector.penalty()
        self.log("train/loss", loss, prog_bar=True, on_epoch=True, on_step=False)
        return loss

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        if self.detector.proximal:  # L1 / group lasso: exact zeros, so dropped heads are really dropped
            self.detector.proximal_step(self.hparams.lr)

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metrics: MetricCollection) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", self.loss(logits, y), prog_bar=stage == "val")
        metrics.update(torch.sigmoid(logits), y.long())
        self.log_dict(metrics, prog_bar=stage == "val")
        self._scores.append(torch.sigmoid(logits).detach().cpu())
        self._labels.append(y.detach().cpu().long())

    def _log_operating_point(self, stage: str) -> None:
        """FPR at 95% TPR, and the paper's ASR and PR at the threshold chosen on validation."""
        scores, labels = torch.cat(self._scores), torch.cat(self._labels)
        self._scores, self._labels = [], []
        if stage == "val":
            self.threshold.fill_(choose_threshold(scores, labels, rule=self.hparams.threshold_rule,
                                                  target_tpr=self.hparams.target_tpr, part="the validation split"))
        part = f"the {stage} split"
        threshold = float(self.threshold)
        self.log_dict({f"{stage}/fpr95": fpr_at_tpr(scores, labels, part=part),
                       f"{stage}/asr": attack_success_rate(scores, labels, threshold, part=part),
                       f"{stage}/pr": passing_rate(scores, labels, threshold, part=part)})

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_operating_point("val")
        if hasattr(self.detector, "active_heads") and getattr(self.detector, "head_dim", None):
            self.log("val/active_heads", float(self.detector.active_heads()))

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_operating_point("test")

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return torch.sigmoid(self(batch[0]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        choice = hp.optimizer if hp.optimizer != "auto" else ("sgd" if self.detector.proximal else "adam")
        optimizer = torch.optim.SGD if choice == "sgd" else torch.optim.Adam
        return optimizer(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
