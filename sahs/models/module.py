"""The LightningModule that trains a detector on cached head activations."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from sahs.data.selection import FeatureSelection
from sahs.errors import UserError
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


RANK_FIGURES = ("auroc", "auprc", "fpr95")  # figures of the scores' order alone, the same on logits


class TrainingConfigError(UserError, ValueError):
    """A ``model:`` training setting that cannot do what it says, named with its fix."""


def own_penalty(detector: Detector) -> str | None:
    """The detector's own regularization setting that is on (``l2=0.001``), or None."""
    for name in ("l2", "l1"):
        if getattr(detector, name, 0):
            return f"{name}={getattr(detector, name)}"
    return None


class DetectorModule(L.LightningModule):
    """Binary malicious-prompt detector: BCE on one logit, optional standardization fitted on train.

    When evaluation batches carry each prompt's attack family (``(x, y, family index)``, names in
    the DataModule's ``families``), validation and test also log AUROC, ASR and PR per family.

    Its checkpoints are self-contained (``sahs.models.artifact``): besides the weights, scaler and threshold
    they keep the heads in feature order, the cache fingerprint, the split and the detector's spec, so
    ``load_from_checkpoint`` needs no config, and a restored module hands its heads to the DataModule
    (``datamodule.adopt``), which refuses another selection or another model's cache.

    With ``warm_start`` the detector starts from its full-batch optimum on the (standardized) training
    split, ``Detector.fit``, which is what leave-one-attack-out fits; epoch 0 then takes its steps at
    learning rate 0, so its validation scores and checkpoints that solution as it is, and later epochs
    continue by minibatch at a cosine-decaying rate.
    """

    def __init__(
        self,
        detector: Detector | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        standardize: bool = True,
        optimizer: Literal["auto", "adam", "sgd"] = "auto",
        schedule: Literal["cosine", "constant"] = "cosine",
        warm_start: bool = True,
        threshold_rule: Literal["tpr", "youden"] = "tpr",
        target_tpr: float = 0.95,
    ) -> None:
        """
        Args:
            detector: The network (``class_path``/``init_args``); the paper's logistic detector by default.
            lr: Peak learning rate of the minibatch steps.
            weight_decay: The optimizer's weight decay, for detectors without a penalty of their own; refused
                beside the detector's ``l2``/``l1`` (one regularizer, not two) and with ``warm_start`` (the
                full-batch fit knows only the detector's penalty).
            standardize: Scale features by mean and std of the training split before the detector.
            optimizer: ``auto`` is plain SGD, whose steps shrink with the gradient, so that a warm start stays
                at its optimum, and so that the proximal step of L1 / group-lasso detectors, taken after each
                SGD step at that step's learning rate, is exact (Adam's per-weight scaling breaks it and is
                refused for them); Adam only for a smooth detector trained from scratch.
            schedule: ``cosine`` decays the learning rate per epoch from ``lr`` towards 0 at ``max_epochs``;
                ``constant`` keeps it.
            warm_start: Start from the detector's full-batch optimum on the training split (``Detector.fit``)
                and score it as epoch 0 (learning rate 0), so the best checkpoint is at least as good on
                validation; off, the detector starts from its random initialization.
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
        self.checkpoint_epoch: int | None = None  # the epoch a loaded checkpoint was saved at
        self.loss = nn.BCEWithLogitsLoss()

    def setup(self, stage: str) -> None:
        # Shapes come from the data: build once the DataModule knows the selected heads.
        datamodule = self.trainer.datamodule
        if self.feature_selection is not None:  # restored from a checkpoint: score the heads it was trained on
            datamodule.adopt(self.feature_selection)
        self.family_names = list(getattr(datamodule, "families", []))
        if getattr(self.detector, "head_dim", 0) is None:  # group lasso needs each head's width
            self.detector.head_dim = datamodule.head_dim
        if stage == "fit" or self.feature_mean.numel() == 0:
            x, _ = datamodule.split_tensors("train")
            self.feature_mean = x.mean(0) if self.hparams.standardize else torch.zeros(x.shape[1])
            self.feature_std = x.std(0).clamp_min(1e-6) if self.hparams.standardize else torch.ones(x.shape[1])
        self.feature_selection = datamodule.selection
        if stage == "fit" and self.hparams.warm_start and self.trainer.ckpt_path is None:
            self._warm_start(datamodule)  # builds the detector, as ``Detector.fit`` does
        elif not self.detector.built:
            self.detector.build(datamodule.num_features)

    def _warm_start(self, datamodule: Any) -> None:
        """Fit the detector full-batch on the standardized training split: the optimum minibatch steps aim at."""
        self._check_regularization()
        x, y = datamodule.split_tensors("train")
        device = self.trainer.strategy.root_device
        x = ((x - self.feature_mean) / self.feature_std).to(device)
        self.detector.fit(x, y.to(device))
        converged = getattr(self.detector, "converged_", None)
        rank_zero_info(f"[sahs] warm start: {type(self.detector).__name__}.fit on {len(y)} training rows, "
                       f"{self.detector.n_iter_} iterations, objective {self.detector.loss_:.4g}"
                       + ("" if converged is None else f", converged={converged}"))

    def _check_regularization(self) -> None:
        """One regularizer, chosen on purpose: the detector's own penalty or the optimizer's weight decay."""
        if not self.hparams.weight_decay:
            return
        penalty = own_penalty(self.detector)
        if penalty is not None:
            raise TrainingConfigError(
                f"model.weight_decay={self.hparams.weight_decay} and the detector's {penalty} both regularize: "
                "keep one (the detector's penalty spares the bias and is what full-batch fits use), set the other to 0")
        if self.hparams.warm_start:
            raise TrainingConfigError(
                f"model.weight_decay={self.hparams.weight_decay} is not part of the objective the warm start fits: "
                "use the detector's own penalty (e.g. model.detector.l2), or set model.warm_start: false")

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
        self.checkpoint_epoch = checkpoint.get("epoch")
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
        self._check_regularization()
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
        # Rank figures from the logits: float32 probabilities tie at 1.0 beyond a logit of about 17.
        metrics.update({name: value for name, value in detection_report(logits, labels, 0.0, part).items()
                        if name in RANK_FIGURES})
        if families is not None:  # auroc/<family>, asr/<family>, pr/<family>
            metrics.update(family_report(scores, labels, families, self.family_names, float(self.threshold)))
            metrics.update({name: value for name, value in
                            family_report(logits, labels, families, self.family_names, 0.0).items()
                            if name.startswith("auroc/")})
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

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        smooth_from_scratch = not (self.detector.proximal or hp.warm_start)
        choice = hp.optimizer if hp.optimizer != "auto" else ("adam" if smooth_from_scratch else "sgd")
        optimizer = (torch.optim.SGD if choice == "sgd" else torch.optim.Adam)(
            self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}

    def lr_factor(self, epoch: int) -> float:
        """The share of ``lr`` that epoch ``epoch`` steps at: 0 for the warm start's epoch 0, then the schedule."""
        first = 1 if self.hparams.warm_start else 0
        if epoch < first:
            return 0.0
        epochs = self.trainer.max_epochs if self._trainer is not None else None
        if self.hparams.schedule == "constant" or epochs is None or epochs < 0:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (epoch - first) / max(epochs - first, 1)))
