"""The LightningModule that trains a detector on cached head activations."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from sahs.data.selection import FeatureSelection
from sahs.eval.metrics import accuracy, choose_threshold, detection_report, family_report
from sahs.models.artifact import CHECKPOINT_KEY, DetectorArtifact, build_detector, detector_spec
from sahs.models.detectors import Detector, LogisticDetector


def check_proximal_optimizer(optimizer: torch.optim.Optimizer, detector: Detector, precision: str) -> None:
    """Refuse training where a proximal step of size ``lr`` after each optimizer step is not exact."""
    name = type(detector).__name__
    fix = "use model.optimizer: sgd (or auto) with no momentum, or a detector without an L1 penalty"
    if not isinstance(optimizer, torch.optim.SGD):
        raise ValueError(f"{name}'s proximal step needs plain SGD, got {type(optimizer).__name__} (per-weight steps "
                         f"break the soft-thresholding); {fix}")
    for group in optimizer.param_groups:
        if group.get("momentum", 0) or group.get("nesterov", False):
            raise ValueError(f"{name}'s proximal step needs SGD without momentum, got momentum={group['momentum']}; "
                             f"{fix}")
    if str(precision).startswith("16"):
        raise ValueError(f"{name}'s proximal step cannot see the steps that fp16 loss scaling skips "
                         f"(trainer.precision={precision}); use trainer.precision: 32 or bf16-mixed")


def step_size(optimizer: torch.optim.Optimizer, detector: Detector) -> float:
    """The learning rate of the optimizer step just taken on the detector's weights (after any scheduler)."""
    mine = {id(p) for p in detector.parameters()}
    rates = {group["lr"] for group in optimizer.param_groups if any(id(p) in mine for p in group["params"])}
    if len(rates) != 1:
        raise ValueError(f"the detector's parameters must share one learning rate for its proximal step, got {rates}")
    return float(rates.pop())


class DetectorModule(L.LightningModule):
    """Binary malicious-prompt detector: BCE on one logit, optional standardization fitted on train.

    When evaluation batches carry each prompt's attack family (``(x, y, family index)``, names in
    the DataModule's ``families``), validation and test also log AUROC, ASR and PR per family.

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
                step follows each SGD step with the step's own learning rate (so LR schedulers and gradient
                accumulation stay exact); Adam's per-weight scaling breaks it and is refused for them.
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
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._families: list[torch.Tensor] = []
        self.family_names: list[str] = []  # the DataModule's attack families, for per-family figures
        self.loss = nn.BCEWithLogitsLoss()

    def setup(self, stage: str) -> None:
        # Shapes come from the data: build once the DataModule knows the selected heads.
        datamodule = self.trainer.datamodule
        if self.feature_selection is not None:  # restored from a checkpoint: score the heads it was trained on
            datamodule.adopt(self.feature_selection)
        self.family_names = list(getattr(datamodule, "families", []))
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

    def on_fit_start(self) -> None:
        if self.detector.proximal:
            for optimizer in self.trainer.optimizers:
                check_proximal_optimizer(optimizer, self.detector, self.trainer.precision)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # L1 / group lasso: exact zeros, so dropped heads are really dropped. Here, not after every batch,
        # so that accumulated gradients get one shrinkage per step, at the rate that step used.
        if self.detector.proximal:
            self.detector.proximal_step(step_size(optimizer, self.detector))

    def _evaluate(self, batch: tuple[torch.Tensor, ...]) -> None:
        x, y = batch[0], batch[1]
        self._logits.append(self(x).detach())
        self._labels.append(y.detach().long())
        if len(batch) > 2:  # each prompt's attack family, as an index into ``family_names``
            self._families.append(batch[2].detach().long())

    def _whole_split(self, local: torch.Tensor) -> torch.Tensor:
        """Every row of the split, once and in order, from this rank's share ``local`` [n_local]."""
        if self.trainer.world_size == 1:
            return local
        loader = self.trainer.test_dataloaders if self.trainer.testing else self.trainer.val_dataloaders
        sampler = loader.sampler
        if isinstance(sampler, DistributedSampler) and not sampler.shuffle and not sampler.drop_last:
            # Lightning's evaluation sampler deals row i to rank i % world_size, padding the last round
            # with the first rows: interleave the shares and drop the padding.
            gathered = self.all_gather(local)  # [world_size, n_local]
            return gathered.transpose(0, 1).reshape(-1)[: len(sampler.dataset)]
        if len(local) == len(loader.dataset):  # no distributed sampler: each rank saw the whole split
            return local
        raise ValueError(f"cannot gather the evaluation rows from a {type(sampler).__name__}: keep Lightning's "
                         "default sampler (trainer.use_distributed_sampler: true) or evaluate on one device")

    def _log_split(self, stage: str) -> None:
        """Metrics of the whole split, the same on every rank; on validation, choose the threshold (95% TPR)."""
        logits = self._whole_split(torch.cat(self._logits)).float().cpu()
        labels = self._whole_split(torch.cat(self._labels)).cpu()
        families = None
        if self.family_names and len(self._families) == len(self._logits):
            families = self._whole_split(torch.cat(self._families)).cpu()
        self._logits, self._labels, self._families = [], [], []
        scores, part = torch.sigmoid(logits), f"the {stage} split"
        if stage == "val":
            self.threshold.fill_(choose_threshold(scores, labels, rule=self.hparams.threshold_rule,
                                                  target_tpr=self.hparams.target_tpr, part=part))
        metrics = {"loss": float(F.binary_cross_entropy_with_logits(logits, labels.float())),
                   "acc@0.5": accuracy(scores, labels, 0.5, part),
                   **detection_report(scores, labels, float(self.threshold), part)}
        if families is not None:  # auroc/<family>, asr/<family>, pr/<family>
            metrics.update(family_report(scores, labels, families, self.family_names, float(self.threshold)))
        # Every rank holds the same numbers: "max" keeps them exact while syncing.
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value, prog_bar=stage == "val" and name in ("loss", "auroc"),
                     sync_dist=True, reduce_fx="max")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_split("val")
        if hasattr(self.detector, "active_heads") and getattr(self.detector, "head_dim", None):
            self.log("val/active_heads", float(self.detector.active_heads()), sync_dist=True, reduce_fx="max")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch)

    def on_test_epoch_end(self) -> None:
        self._log_split("test")

    def predict_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return torch.sigmoid(self(batch[0]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        choice = hp.optimizer if hp.optimizer != "auto" else ("sgd" if self.detector.proximal else "adam")
        optimizer = torch.optim.SGD if choice == "sgd" else torch.optim.Adam
        return optimizer(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
