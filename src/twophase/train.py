"""The one training loop: the phase's optimizer and LR schedule on the trainable parameters,
early stopping on validation loss, the best epoch's weights kept.

Both phases call `fit`; they differ only in the model handed in (head alone, or the unfrozen blocks
plus head), in the batches (cached embeddings, cached activations, or streamed images) and in
their `PhaseParams`. One process or N (DDP) run the same lines.
Training batches with a `set_epoch(epoch)` method (as torch's DistributedSampler has) are told
each epoch's number before it runs: augmented views are drawn per epoch from it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from twophase.batches import Batches, slice_start
from twophase.distributed import SINGLE, World
from twophase.dropout import keyed, keyed_dropouts
from twophase.ema import WeightAverage
from twophase.errors import TwophaseError
from twophase.mixing import Mix, Mixing
from twophase.network import ParamGroups, trainable_parameters
from twophase.optim import Optimizer, decay_exempt, make_optimizer, set_epoch_lr
from twophase.params import ParamsError, PhaseParams
from twophase.runtime import autocast, to_device


class NonFiniteLossError(TwophaseError):
    """The loss became NaN or infinite: the learning rate is almost always too high."""


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float = 0.0  # the head's learning rate in this epoch (0: no training step, epoch 0)


@dataclass
class FitResult:
    history: list[EpochStats] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = math.inf
    best_val_acc: float = 0.0
    stopped_early: bool = False
    wall_seconds: float = 0.0
    l2: float | None = None  # the linear probe's chosen penalty
    start_epoch: int | None = None  # set when the starting weights were validated as a candidate

    @property
    def kept_starting_weights(self) -> bool:
        """No epoch beat the starting weights on val loss: the model holds them unchanged."""
        return self.start_epoch is not None and self.best_epoch == self.start_epoch

    @property
    def epochs_run(self) -> int:
        """Epochs trained: the scoring of the starting weights (phase 2's first row) is none."""
        return len(self.history) - (self.start_epoch is not None)

    def summary(self) -> dict[str, float | int | bool]:
        return {
            "best_epoch": self.best_epoch,
            "best_val_loss": round(self.best_val_loss, 6),
            "best_val_acc": round(self.best_val_acc, 6),
            "epochs_run": self.epochs_run,
            "stopped_early": self.stopped_early,
            "wall_seconds": round(self.wall_seconds, 2),
            **({"l2": self.l2} if self.l2 is not None else {}),
        }

    def checkpoint_summary(self, last_epoch: int) -> dict[str, float | int]:
        """What a checkpoint records of its training: the best epoch, unrounded, and the last."""
        return {
            "best_epoch": self.best_epoch,
            "best_val_loss": self.best_val_loss,
            "best_val_acc": self.best_val_acc,
            "last_epoch": last_epoch,
        }

    def history_rows(self) -> list[dict[str, float | int]]:
        return [asdict(stats) for stats in self.history]


def balanced_class_weights(
    labels: np.ndarray, class_names: list[str], key: str = "class_weights"
) -> torch.Tensor:
    """scikit-learn's "balanced" class weights, n_samples / (n_classes * count of the class),
    from a phase's whole training label array (every DDP rank passes all of it, so every rank
    weighs the classes alike). A class without training rows has no such weight: an error."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
    for name, count in zip(class_names, counts, strict=True):
        if count == 0:
            raise ParamsError(
                f"{key}: balanced weighs each class by its training rows, but class {name!r} "
                "has none; set it to none"
            )
    return torch.as_tensor(len(labels) / (len(class_names) * counts), dtype=torch.float32)


def training_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    smoothing: float = 0.0,
    class_weights: torch.Tensor | None = None,
    mix: Mix | None = None,
) -> torch.Tensor:
    """A batch's training loss: sum_i sum_c w_c t_ic (-log p_ic) / sum_i w_(y_i), where t is a
    row's target (its label smoothed, and with `mix`, mixed with its partner's) and w the class
    weights (all 1 without). Without `mix` this is F.cross_entropy(weight=, label_smoothing=)
    itself; with it, torch's denominator still holds: the partners are a permutation of the
    batch's own rows, so sum_i (lam w_(y_i) + (1 - lam) w_(y_perm(i))) = sum_i w_(y_i)."""
    if mix is None:
        return nn.functional.cross_entropy(
            logits, labels, weight=class_weights, label_smoothing=smoothing
        )
    targets = mix.targets(labels, logits.shape[1], smoothing)
    total = nn.functional.cross_entropy(logits, targets, weight=class_weights, reduction="sum")
    return total / (len(labels) if class_weights is None else class_weights[labels].sum())


def run_epoch(
    model: nn.Module,
    batches: Batches,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    optimizer: Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    label_smoothing: float = 0.0,
    world: World = SINGLE,
    seed: int = 0,
    epoch: int = 0,
    *,
    class_weights: torch.Tensor | None = None,
    mixing: Mixing | None = None,
) -> tuple[float, float]:
    """One pass over `batches`; trains when an optimizer is given. Returns (mean loss, accuracy)
    over every rank's batches. Dropout masks are drawn from (seed, epoch, step, global row).

    Training only, like `label_smoothing`: `class_weights` (one per class, on `device`) weigh
    the loss, `mixing` mixes each batch (mixing.py) from (seed, epoch, step); the accuracy of
    a mixed batch counts each prediction against its target's larger share."""
    training = optimizer is not None
    model.train(training)
    loss_sum, correct, seen = 0.0, 0, 0
    smoothing = label_smoothing if training else 0.0
    weights = class_weights if training else None
    mixes = mixing if training and mixing is not None and mixing.active else None
    with torch.set_grad_enabled(training):
        for step, (inputs, labels) in enumerate(batches):
            inputs = to_device(inputs, device)
            labels = labels.to(device, non_blocking=True)
            # the global batch: every rank's slice of it (validation needs no count: its
            # loss takes no step and draws no dropout); with class weights, also the sum of
            # the weights of its labels, the denominator of its weighted mean loss
            if weights is not None:
                own_weight = float(weights[labels].sum())
                count, global_weight = world.sum(len(labels), own_weight)
                rows = int(count)
            else:
                rows = int(world.sum(len(labels))[0]) if training else len(labels) * world.size
            offset = slice_start(rows, world.rank, world.size)
            mix = None
            if mixes is not None and len(labels):
                shape = tuple(inputs.shape[1:])
                mix = mixes.draw(len(labels), shape, seed, epoch, step, world.rank, device)
                inputs = mix.inputs(inputs)
            with autocast(device, amp_dtype), keyed(seed, epoch, step, offset):
                logits = model(inputs)
            # This rank's mean loss, weighted by its share of the global batch: DDP averages the
            # ranks' gradients, which makes the step the global batch's mean loss's, as in one
            # process, where the weight is exactly 1. A rank's empty slice weighs nothing.
            # With class weights the mean is weighted (divided by the sum of its labels'
            # weights), and so is the share: the rank's sum of weights over the global one.
            if len(labels):
                if weights is not None:
                    share = own_weight * world.size / global_weight
                else:
                    share = len(labels) * world.size / rows
                mean = training_loss(logits.float(), labels, smoothing, weights, mix)
                loss = mean * share
            else:
                loss = logits.sum() * 0.0
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
                    scaler.step(optimizer)  # type: ignore[arg-type]  # reads param_groups, calls step
                    scaler.update()
                else:
                    loss.backward()  # type: ignore[no-untyped-call]
                    optimizer.step()
            loss_sum += loss.item() * rows / world.size
            truth = labels if mix is None else mix.dominant(labels)
            correct += int((logits.argmax(dim=1) == truth).sum())
            seen += len(labels)
    loss_sum, total_correct, total_seen = world.sum(loss_sum, correct, seen)
    correct, seen = int(total_correct), int(total_seen)
    if seen == 0:
        raise ValueError("no batches to run: the split is empty")
    return loss_sum / seen, correct / seen


def phase_optimizer(
    model: nn.Module,
    phase: PhaseParams,
    groups: ParamGroups | None,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> tuple[Optimizer, torch.amp.GradScaler | None]:
    """The phase's optimizer over `groups` (default: every trainable parameter of `model` at
    `phase.lr`), and the loss scaler fp16 autocast needs on CUDA: what `fit` and the LR finder
    (lr_find.py) train with."""
    params, scales = groups or ([trainable_parameters(model)], None)
    optimizer = make_optimizer(params, phase, scales, decay_exempt(model))
    use_scaler = amp_dtype == torch.float16 and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    return optimizer, scaler


def fit(
    model: nn.Module,
    batches: tuple[Batches, Batches],
    phase: PhaseParams,
    groups: ParamGroups | None = None,
    world: World = SINGLE,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    seed: int = 0,
    start_epoch: int | None = None,
    val_model: nn.Module | None = None,
    desc: str = "train",
    class_weights: torch.Tensor | None = None,
    mixing: Mixing | None = None,
) -> FitResult:
    """Train on `batches` (training, validation) as `phase` says: its optimizer, LR schedule and
    label smoothing, for `phase.epochs` or until `phase.patience` epochs bring no better val
    loss. On return the model holds the weights of the best epoch (a copy taken then).

    With `phase.ema` (a decay > 0), a moving average of the trained parameters follows every
    optimizer step (ema.py); validation, hence early stopping, and the weights kept as the best
    epoch's (so the checkpoint and the export) are the average's, with the model's buffers.
    The training loss and accuracy stay those of the weights being trained.

    `groups`: parameter lists with their LR scales (phase 2's discriminative LRs); default, every
    trainable parameter at `phase.lr`. With `start_epoch`, the starting weights are scored first
    as that epoch (both losses in eval mode) and are a candidate like any epoch; training epochs
    are numbered on from it. `val_model` scores the validation batches when they need another
    module than `model`, sharing its weights (streamed images train, cached activations
    validate). Under DDP (`world` of several ranks) each rank passes its slice of every batch;
    the statistics, hence early stopping, are the same on every rank; only rank 0 reports.
    Dropout layers are made keyed (dropout.py): their masks are functions of (`seed`, epoch,
    step, global row), so one process and N processes train the same network.
    `class_weights` (one per class) weigh the training loss and `mixing` mixes the training
    batches (`run_epoch`); the validation loss, which early stopping reads, stays plain.
    """
    train_batches, val_batches = batches
    val_model = val_model or model
    keyed_dropouts(model)
    set_epoch = getattr(train_batches, "set_epoch", lambda epoch: None)
    model.to(device).to(memory_format=torch.channels_last)
    trained = model
    if world.distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        trained = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    optimizer, scaler = phase_optimizer(model, phase, groups, device, amp_dtype)
    weights = None if class_weights is None else class_weights.to(device)
    # the weight EMA, a copy of the starting weights to begin with: validation scores it in the
    # trained weights' place; ema: 0 adds nothing, not even a copy
    scored: Callable[[], AbstractContextManager[object]] = nullcontext
    if phase.ema:
        stepped = [param for group in optimizer.param_groups for param in group["params"]]
        average = WeightAverage(stepped, phase.ema)
        optimizer.register_step_post_hook(average.update)
        scored = average.in_place
    result = FitResult()
    best_state: dict[str, torch.Tensor] | None = None
    start = time.perf_counter()

    def record(stats: EpochStats) -> bool:
        """Log one epoch; keep a copy of the weights if it is the best so far."""
        nonlocal best_state
        for name, value in (("training", stats.train_loss), ("validation", stats.val_loss)):
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"{desc}: {name} loss became {value} in epoch {stats.epoch} with "
                    f"lr={phase.lr:g}; lower the learning rate"
                )
        result.history.append(stats)
        if world.is_main:
            tqdm.write(
                f"{desc} epoch {stats.epoch}: train loss {stats.train_loss:.4f} acc "
                f"{stats.train_acc:.4f} | val loss {stats.val_loss:.4f} acc {stats.val_acc:.4f}"
            )
        if stats.val_loss >= result.best_val_loss:
            return False
        result.best_epoch, result.best_val_loss = stats.epoch, stats.val_loss
        result.best_val_acc = stats.val_acc
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return True

    first_epoch = 1
    if start_epoch is not None:
        result.start_epoch, first_epoch = start_epoch, start_epoch + 1
        set_epoch(start_epoch)
        train_scores = run_epoch(trained, train_batches, device, amp_dtype, world=world)
        val_scores = run_epoch(val_model, val_batches, device, amp_dtype, world=world)
        record(EpochStats(start_epoch, *train_scores, *val_scores))  # the EMA starts as these
    # disable=None: no bar when stderr is no terminal (a log, DVC's pipe), as DVC does
    epochs = range(first_epoch, first_epoch + phase.epochs)
    bar = tqdm(
        epochs, desc=desc, unit="epoch", leave=False, disable=None if world.is_main else True
    )
    for epoch in bar:
        lr = set_epoch_lr(optimizer, phase, epoch - first_epoch, phase.epochs)
        set_epoch(epoch)
        train_loss, train_acc = run_epoch(
            trained,
            train_batches,
            device,
            amp_dtype,
            optimizer,
            scaler,
            phase.label_smoothing,
            world,
            seed,
            epoch,
            class_weights=weights,
            mixing=mixing,
        )
        with scored():  # the EMA's weights, when there is one, scored and kept if best
            val_loss, val_acc = run_epoch(val_model, val_batches, device, amp_dtype, world=world)
            improved = record(EpochStats(epoch, train_loss, train_acc, val_loss, val_acc, lr))
        if not improved and epoch - result.best_epoch >= phase.patience:
            result.stopped_early = True
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    result.wall_seconds = time.perf_counter() - start
    return result


L2_GRID = tuple(10.0**k for k in range(-6, 3))  # 1e-6 ... 1e2


def fit_linear_probe(
    head: nn.Sequential,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    device: torch.device,
    seed: int = 0,
    max_iter: int = 200,
    class_weights: torch.Tensor | None = None,
) -> FitResult:
    """A linear head by full-batch L-BFGS on the cached embeddings, for each L2 penalty in
    `L2_GRID`; the one with the lowest validation loss is kept (Kornblith et al.'s protocol).
    `class_weights` weigh the training loss (a weighted mean, as F.cross_entropy's `weight`);
    the validation loss that picks the penalty stays plain."""
    linear = head[-1]
    if len(head) != 1 or not isinstance(linear, nn.Linear):
        raise TwophaseError(
            "train_transfer.solver: 'lbfgs' fits a linear head; set model.dense_units: []"
        )
    x, y = (torch.as_tensor(np.asarray(a)).to(device) for a in train)
    vx, vy = (torch.as_tensor(np.asarray(a)).to(device) for a in val)
    weights = None if class_weights is None else class_weights.to(device)
    start = time.perf_counter()
    result = FitResult()
    best_state: dict[str, torch.Tensor] | None = None
    head.to(device)
    for l2 in L2_GRID:
        torch.manual_seed(seed)
        linear.reset_parameters()
        optimizer = torch.optim.LBFGS(
            linear.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe"
        )

        def closure(optimizer: torch.optim.Optimizer = optimizer, l2: float = l2) -> torch.Tensor:
            optimizer.zero_grad()
            penalty = 0.5 * l2 * linear.weight.square().sum()
            loss = nn.functional.cross_entropy(linear(x), y, weight=weights) + penalty
            loss.backward()  # type: ignore[no-untyped-call]
            return loss

        optimizer.step(closure)  # type: ignore[no-untyped-call]
        with torch.no_grad():
            logits, val_logits = linear(x), linear(vx)
            val_loss = float(nn.functional.cross_entropy(val_logits, vy))
        if math.isfinite(val_loss) and val_loss < result.best_val_loss:
            result.best_val_loss, result.l2, result.best_epoch = val_loss, l2, 1
            result.best_val_acc = float((val_logits.argmax(1) == vy).float().mean())
            train_loss = float(nn.functional.cross_entropy(logits, y, weight=weights))
            train_acc = float((logits.argmax(1) == y).float().mean())
            best_state = {k: v.detach().clone() for k, v in linear.state_dict().items()}
    if best_state is None:
        raise NonFiniteLossError("train_transfer: L-BFGS diverged for every L2 penalty")
    linear.load_state_dict(best_state)
    result.history = [
        EpochStats(1, train_loss, train_acc, result.best_val_loss, result.best_val_acc, 0.0)
    ]
    result.wall_seconds = time.perf_counter() - start
    tqdm.write(
        f"train_transfer: linear probe, L2 {result.l2:g}, val loss {result.best_val_loss:.4f}"
    )
    return result
