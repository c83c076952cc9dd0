"""Training methods: one small class each, one contract (DomainBed style).

A method is complete when constructed: ``Method(student, criterion, n_groups, train_counts, hparams, teacher,
runtime)`` (the :class:`~groupdistil.runtime.Runtime` brings device, autocast, all-reduce, optimizer and scheduler).
``update(batch) -> dict`` takes one optimizer step and returns detached tensors to log (no host sync). A method is the
pair (per-sample loss, aggregation):

========== ================================ =========================================
method     per-sample loss                  aggregation over the batch
========== ================================ =========================================
erm        labels only                      mean
kd         labels + KD term (teacher)       mean
groupdro   labels only                      EG group weights (group DRO)
groupdistil labels + KD term (teacher)      EG group weights (GroupDistil)
========== ================================ =========================================

Adding a method means adding a class here with ``@_register(name)``, its hyperparameters declared in
``hparams_spec`` (type from the default, range, doc); the trainer and the config layer never change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from .losses import TaskLoss
from .registry import Registry
from .runtime import Runtime
from .teacher import in_order
from .weighting import GroupWeights, group_sums, reduced_group_means

METHODS: Registry[type["Method"]] = Registry("method")

TeacherFn = Callable[[dict[str, Tensor]], dict[str, Tensor]]


@dataclass(frozen=True)
class HParam:
    """A method hyperparameter (a key of ``method_args``): its default (which also fixes its type) and its range."""

    default: Any
    low: float | None = None  # inclusive bounds of a number
    high: float | None = None
    doc: str = ""
    choices: tuple[str, ...] = ()  # the allowed values of a string

    def problem(self, value: Any) -> str:
        """Why ``value`` is not allowed ("" when it is)."""
        if self.choices:
            return "" if value in self.choices else f"must be one of {', '.join(self.choices)}"
        if isinstance(self.default, bool):
            return "" if isinstance(value, bool) else "must be true or false"
        if isinstance(self.default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return "must be a number"
            if self.low is not None and value < self.low:
                return f"must be >= {self.low}"
            if self.high is not None and value > self.high:
                return f"must be <= {self.high}"
        return ""


class Method(nn.Module):
    """Base class. Subclasses set ``needs_teacher``, ``hparams_spec`` and override ``aggregate``."""

    needs_teacher: ClassVar[bool] = False
    #: True when the method keeps one weight per group (then groups without training samples matter to it)
    weights_groups: ClassVar[bool] = False
    #: the method's hyperparameters (``method_args`` in a config), declared with their defaults and ranges
    hparams_spec: ClassVar[dict[str, HParam]] = {}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {k: p.default for k, p in cls.hparams_spec.items()}

    @classmethod
    def hparams_problem(cls, hparams: dict[str, Any]) -> str:
        """Why this combination of (individually valid) hyperparameters cannot work ("" when it can)."""
        return ""

    def __init__(self, student: nn.Module, criterion: TaskLoss, n_groups: int, train_counts: list[int],
                 hparams: dict[str, Any], teacher: TeacherFn | None = None, runtime: Runtime | None = None,
                 heldout: list[dict[str, Tensor]] | None = None) -> None:
        """Args:
            student: the model trained (already on ``runtime.device``).
            criterion: per-sample losses of every head (:class:`~groupdistil.losses.TaskLoss`).
            n_groups, train_counts: the number of groups and the training samples of each.
            hparams: this method's ``method_args`` (keys of ``hparams_spec``; missing ones take their default).
            teacher: ``batch -> {head: logits}`` (frozen), for the methods that distil.
            runtime: device, autocast, all-reduce, gradient scale and clipping, optimizer and scheduler factories,
                DDP wrapper (:class:`~groupdistil.runtime.Runtime`; default: one CPU process, SGD lr 1e-3).
            heldout: batches (on the device) of labelled training samples the sampler never draws, for the
                ``heldout`` signal (:meth:`needs_heldout`).
        """
        super().__init__()
        if self.needs_teacher and teacher is None:
            raise ValueError(f"method '{self.name}' needs a teacher (--teacher RUN_DIR)")
        unknown = sorted(set(hparams) - set(self.hparams_spec))
        if unknown:
            raise ValueError(f"method '{self.name}' has no hyperparameter {unknown}; valid: "
                             f"{sorted(self.hparams_spec) or '(none)'}")
        self.runtime = runtime or Runtime()
        self.student = student
        self.criterion = criterion
        self.n_groups = n_groups
        self.train_counts = list(train_counts)
        self.hparams = {**self.defaults(), **hparams}
        self.teacher = teacher if self.needs_teacher else None
        self.heldout = heldout or []
        # the forward pass goes through the (DDP-)wrapped student; kept out of the module tree so that the student's
        # weights appear once in state_dict()
        self.__dict__["forward_model"] = self.runtime.wrap(student)
        self.optimizer = self.runtime.optimizer(student.parameters())
        self.scheduler = self.runtime.scheduler(self.optimizer) if self.runtime.scheduler is not None else None

    @property
    def name(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)

    def per_sample(self, batch: dict[str, Tensor], outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        teacher_out = self.teacher(batch) if self.teacher is not None else None
        return self.criterion(outputs, batch, teacher_out)

    @classmethod
    def needs_heldout(cls, hparams: dict[str, Any]) -> bool:
        """True when the method wants held-out batches (the trainer then keeps them out of the sampler)."""
        return False

    def prepare(self, dataset: Any, groups: Tensor, batch_size: int) -> str:
        """Called once by the trainer before the first step, with the training set (keys ``(index, 0)``) and its
        groups: for methods with static per-sample weights. Returns a line to print ("" for none)."""
        return ""

    def aggregate(self, terms: dict[str, Tensor], batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Plain mean over the batch. Logs the global-batch mean and per-group means (no host sync).

        ``terms`` are :meth:`per_sample`'s per-sample losses (``total`` is the training loss)."""
        losses, groups = terms["total"], batch["group"]
        _, means, counts = reduced_group_means(losses.detach().float(), groups, self.n_groups, self.runtime.reduce)
        logs = {"loss": (means * counts).sum() / counts.sum(), "group_loss": means, "group_count": counts}
        return losses.mean(), logs

    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """One optimizer step on ``batch``; returns detached tensors to log (no host synchronisation)."""
        self.forward_model.train()
        with self.runtime.autocast():
            outputs = self.forward_model(batch["x"])
            terms = self.per_sample(batch, outputs)
            loss, logs = self.aggregate(terms, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.runtime.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.runtime.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        out = {"loss": logs.pop("loss")}
        out.update({k: v.detach().float().mean() for k, v in terms.items() if "/" in k})
        out.update(logs)
        return out

SIGNALS = ("train", "heldout", "excess")


class _GroupWeighted(Method):
    """Aggregation by exponentiated-gradient group weights (see :mod:`groupdistil.weighting`).

    The signal the EG step ascends (``method_args.signal``), per group ``g``:

    - ``train`` (the paper): the minibatch mean training loss ``l_g``;
    - ``heldout``: the mean training loss (same per-sample loss, no gradient) of the current student on held-out
      labelled training cases of ``g`` that the sampler never draws, refreshed every ``heldout_every`` steps;
    - ``excess``: ``max(0, mean_g(label loss of the student) - mean_g(label loss of the teacher))`` on the minibatch,
      the label loss being the loss without the KD term (DoReMi's excess loss, the teacher as reference model).

    The objective is always ``sum_g q_g * l_g`` on the minibatch.
    """

    weights_groups = True

    hparams_spec: ClassVar[dict[str, HParam]] = {
        "eta": HParam(0.01, low=0.0, doc="EG step size"),
        "adj_c": HParam(0.0, low=0.0, doc="generalisation adjustment C / sqrt(n_g), in the update only"),
        "normalize_loss": HParam(False, doc="divide the (adjusted) group signals by their sum before the step"),
        "signal": HParam("train", choices=SIGNALS, doc="what EG ascends: train | heldout | excess"),
        "heldout_every": HParam(25, low=1, doc="heldout: refresh the held-out losses every N steps"),
        "heldout_fraction": HParam(0.1, low=0.0, high=0.5,
                                   doc="heldout: share of each group's training cases held out (at least one)"),
    }

    @classmethod
    def hparams_problem(cls, hparams: dict[str, Any]) -> str:
        if hparams.get("signal") == "excess" and not cls.needs_teacher:
            return "signal 'excess' needs a teacher as the reference model (use groupdistil)"
        return ""

    @classmethod
    def needs_heldout(cls, hparams: dict[str, Any]) -> bool:
        return hparams.get("signal") == "heldout"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        h = self.hparams
        self.weights = GroupWeights(self.n_groups, eta=h["eta"], adj_c=h["adj_c"], train_counts=self.train_counts,
                                    normalize_loss=h["normalize_loss"])
        if h["signal"] == "heldout" and not self.heldout:
            raise ValueError("signal 'heldout' needs held-out batches")
        # the held-out signal, its counts and the number of updates so far: buffers, so a resume is exact
        self.register_buffer("heldout_signal", torch.zeros(self.n_groups))
        self.register_buffer("heldout_counts", torch.zeros(self.n_groups))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self._updates: int | None = 0
        self._heldout_teacher: list[Any] | None = None  # the teacher's outputs on the (fixed) held-out batches

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        out = super().load_state_dict(*args, **kwargs)
        self._updates = None  # read from the restored buffer at the next update
        return out

    def per_sample(self, batch: dict[str, Tensor], outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.hparams["signal"] != "excess":
            return super().per_sample(batch, outputs)
        teacher_out = self.teacher(batch)
        terms = self.criterion(outputs, batch, teacher_out)
        with torch.no_grad():
            terms["excess"] = terms["label"].detach().float() - self.criterion(teacher_out, batch)["label"].float()
        return terms

    @torch.no_grad()
    def refresh_heldout(self) -> None:
        """Mean per-group training loss of the current student on the held-out batches (no gradient). The held-out
        batches are fixed tensors, so the teacher's outputs on them are computed at the first refresh and kept."""
        self.forward_model.eval()
        if self._heldout_teacher is None:
            with self.runtime.autocast():
                self._heldout_teacher = [None if self.teacher is None else self.teacher(b) for b in self.heldout]
        sums = torch.zeros(self.n_groups, device=self.heldout_signal.device)
        counts = torch.zeros_like(sums)
        for b, teacher_out in zip(self.heldout, self._heldout_teacher):
            with self.runtime.autocast():
                loss = self.criterion(self.forward_model(b["x"]), b, teacher_out)["total"].float()
            s, c = group_sums(loss, b["group"], self.n_groups)
            sums, counts = sums + s, counts + c
        stats = self.runtime.reduce(torch.stack([sums, counts]))
        self.heldout_signal.copy_(stats[0] / stats[1].clamp_min(1))
        self.heldout_counts.copy_(stats[1])
        self.forward_model.train()

    def aggregate(self, terms: dict[str, Tensor], batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        signal = counts = None
        kind = self.hparams["signal"]
        if self._updates is None:  # the step count as a Python int: one host read after construction or resume
            self._updates = int(self.updates)
        if kind == "heldout":
            if self._updates % self.hparams["heldout_every"] == 0:
                self.refresh_heldout()
            signal, counts = self.heldout_signal, self.heldout_counts
        elif kind == "excess":
            _, means, counts = reduced_group_means(terms["excess"], batch["group"], self.n_groups,
                                                   self.runtime.reduce)
            signal = means.clamp_min(0.0)
        self.updates += 1
        self._updates += 1
        objective, logs = self.weights(terms["total"], batch["group"], reduce=self.runtime.reduce,
                                       scale=self.runtime.grad_scale, signal=signal, signal_counts=counts)
        logs["loss"] = (logs["group_weight"] * logs["group_loss"]).sum()  # the objective on the global batch
        return objective, logs


class _SampleWeighted(Method):
    """Static per-sample weights ``w_i`` (set in :meth:`prepare`): objective ``sum_i w_i l_i / sum_i w_i`` over the
    global batch. Subclasses define :meth:`weights_for`."""

    needs_teacher = True

    def weights_for(self, dataset: Any, groups: Tensor, batch_size: int) -> tuple[Tensor, str]:
        raise NotImplementedError

    def prepare(self, dataset: Any, groups: Tensor, batch_size: int) -> str:
        w, note = self.weights_for(dataset, groups, batch_size)
        self.sample_w = w.float().to(self.runtime.device)
        return note

    def aggregate(self, terms: dict[str, Tensor], batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        losses = terms["total"]
        _, logs = super().aggregate(terms, batch)  # per-group statistics
        w = self.sample_w[batch["index"]]
        tot = self.runtime.reduce(torch.stack([(w * losses.detach().float()).sum(), w.sum()]))
        logs["loss"] = tot[0] / tot[1]
        return self.runtime.grad_scale * (w * losses).sum() / tot[1], logs


@torch.no_grad()
def _teacher_pass(method: Method, dataset: Any, batch_size: int) -> tuple[Tensor, Tensor]:
    """The teacher's per-sample label loss and error indicator over the training set
    (:func:`~groupdistil.teacher.in_order`): for classification, wrong argmax; for segmentation, a soft Dice score
    (1 - Dice loss), returned as the loss."""
    n = len(dataset)
    loss, wrong = torch.zeros(n), torch.zeros(n, dtype=torch.bool)
    for b in in_order(dataset, batch_size, method.runtime.device):
        out = method.teacher(b)
        idx = b["index"].cpu()
        loss[idx] = method.criterion(out, b)["label"].float().cpu()
        if "cls" in out and "seg" not in out:
            wrong[idx] = (out["cls"].argmax(1) != b["cls"]).cpu()
    return loss, wrong


def _register(name: str) -> Callable[[type[Method]], type[Method]]:
    def deco(cls: type[Method]) -> type[Method]:
        cls.registry_name = name  # type: ignore[attr-defined]
        return METHODS.register(name)(cls)

    return deco


@_register("erm")
class ERM(Method):
    """Labels only, mean over samples (also how a teacher is trained)."""


@_register("kd")
class KD(Method):
    """Plain knowledge distillation: labels + KD term, uniform over samples."""

    needs_teacher = True


@_register("groupdro")
class GroupDRO(_GroupWeighted):
    """Group DRO from scratch (Sagawa et al. 2020): labels only, EG group weights."""


@_register("groupdistil")
class GroupDistil(_GroupWeighted):
    """GroupDistil: the distillation loss with EG group weights."""

    needs_teacher = True


def method_arg_defaults() -> dict[str, Any]:
    """Union of every registered method's hyperparameters (the keys a config file's ``method_args`` may hold)."""
    out: dict[str, Any] = {}
    for name in METHODS.names():
        out.update(METHODS.get(name).defaults())
    return out


@_register("kd_reweighted")
class KDReweighted(_SampleWeighted):
    """KD with static inverse-frequency sample weights ``w_i = 1 / n_{g_i}``: every training group weighs the same
    in the objective (importance weighting; no weights to learn)."""

    def weights_for(self, dataset: Any, groups: Tensor, batch_size: int) -> tuple[Tensor, str]:
        counts = torch.bincount(groups, minlength=self.n_groups).float()
        return 1.0 / counts.clamp_min(1)[groups], ""


@_register("jtt_kd")
class JTTKD(_SampleWeighted):
    """JTT-style KD (Liu et al. 2021, "Just Train Twice"), the teacher as the first pass: the training samples the
    teacher gets wrong (classification) or segments worst (segmentation: the ``quantile`` of lowest teacher soft
    Dice / highest label loss) are upweighted by ``lambda_up`` in the distillation objective."""

    hparams_spec: ClassVar[dict[str, HParam]] = {
        "lambda_up": HParam(6.0, low=1.0, doc="weight of the samples the teacher gets wrong"),
        "quantile": HParam(0.2, low=0.0, high=1.0, doc="segmentation: share of worst-segmented samples upweighted"),
    }

    def weights_for(self, dataset: Any, groups: Tensor, batch_size: int) -> tuple[Tensor, str]:
        loss, wrong = _teacher_pass(self, dataset, batch_size)
        if not wrong.any():  # segmentation, or a teacher without errors: the worst-loss quantile
            k = int(round(self.hparams["quantile"] * len(loss)))
            wrong = torch.zeros_like(wrong)
            if k:
                wrong[torch.topk(loss, k).indices] = True
        self.error_set = wrong
        per_group = torch.bincount(groups[wrong], minlength=self.n_groups).tolist()
        w = torch.where(wrong, torch.tensor(float(self.hparams["lambda_up"])), torch.tensor(1.0))
        return w, (f"jtt_kd: {int(wrong.sum())} of {len(wrong)} training samples upweighted x"
                   f"{self.hparams['lambda_up']:g} (per group {per_group})")
