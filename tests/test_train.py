"""The training loop does what the notebook did not: each test fails on the notebook's code."""

from __future__ import annotations

import copy
import math
import threading

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers import make_imagefolder
from twophase import cache
from twophase.backbones import describe
from twophase.batches import ArrayBatches, BatchOrder, array_batches, slice_start
from twophase.distributed import SINGLE
from twophase.features import extract
from twophase.images import ImageBatches, ImageDataset
from twophase.mixing import Mixing
from twophase.model import Preprocessing, build_head, build_model, classifier_in_features
from twophase.network import FrozenTrunk, Streamed, Tail, set_trainable
from twophase.params import ParamsError, PhaseParams
from twophase.train import (
    NonFiniteLossError,
    balanced_class_weights,
    fit,
    fit_linear_probe,
    run_epoch,
    training_loss,
)

CPU = torch.device("cpu")


def separable_embeddings(n: int, dim: int = 8, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    centers = rng.normal(size=(classes, dim)) * 3
    x = (centers[labels] + rng.normal(size=(n, dim))).astype(np.float32)
    return x, labels.astype(np.int64)


def noise_embeddings(n: int, dim: int = 8, classes: int = 3, seed: int = 0):
    """No signal at all: training memorises, so validation loss rises after the first epochs."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)).astype(np.float32), rng.integers(0, classes, n)


def test_one_process_steps_on_torchs_mean_cross_entropy_bit_for_bit() -> None:
    """The loss of one process is F.cross_entropy's mean itself, with label smoothing too: the
    weight that DDP's ranks apply is exactly 1 here, so the gradients are torch's own."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    twin = copy.deepcopy(model)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))

    class Capture:
        def __init__(self) -> None:
            self.grads: list[torch.Tensor] = []

        def zero_grad(self, set_to_none: bool = True) -> None:
            model.zero_grad(set_to_none=set_to_none)

        def step(self) -> None:
            self.grads = [p.grad.clone() for p in model.parameters()]

    capture = Capture()
    loss, _ = run_epoch(model, [(x, y)], CPU, optimizer=capture, label_smoothing=0.1)
    expected = nn.functional.cross_entropy(twin(x), y, label_smoothing=0.1)
    expected.backward()
    assert loss == expected.item() * 10 / 10
    for got, want in zip(capture.grads, [p.grad for p in twin.parameters()], strict=True):
        assert torch.equal(got, want)


class Capture:
    """An optimizer that keeps the gradients of its step and takes none."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.grads = model, []

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.grads = [p.grad.clone() for p in self.model.parameters()]


def test_one_process_steps_on_torchs_class_weighted_cross_entropy_bit_for_bit() -> None:
    """With class weights the loss of one process is F.cross_entropy(weight=, label_smoothing=)
    itself: the weighted mean, divided by the sum of the weights of the batch's labels."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    twin = copy.deepcopy(model)
    x, y = torch.randn(10, 4), torch.tensor([0, 1, 2, 2, 2, 1, 0, 2, 2, 1])
    weights = torch.tensor([1.75, 0.5, 3.0])
    capture = Capture(model)
    loss, _ = run_epoch(
        model, [(x, y)], CPU, optimizer=capture, label_smoothing=0.1, class_weights=weights
    )
    expected = nn.functional.cross_entropy(twin(x), y, weight=weights, label_smoothing=0.1)
    expected.backward()
    assert loss == expected.item() * 10 / 10
    for got, want in zip(capture.grads, [p.grad for p in twin.parameters()], strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_class_weights_give_the_loss_computed_by_hand(eps: float) -> None:
    """sum_i [(1 - eps) w_y(i) (-log p_i,y(i)) + eps / C sum_c w_c (-log p_ic)] / sum_i w_y(i)."""
    logits = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0]]
    labels, w = [0, 2, 2], [1.0, 2.0, 4.0]
    total = 0.0
    for row, y in zip(logits, labels, strict=True):
        nll = [math.log(sum(math.exp(v) for v in row)) - v for v in row]
        smooth = sum(wc * n for wc, n in zip(w, nll, strict=True))
        total += (1 - eps) * w[y] * nll[y] + eps / 3 * smooth
    expected = total / (w[0] + w[2] + w[2])
    got = training_loss(torch.tensor(logits), torch.tensor(labels), eps, torch.tensor(w))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    unweighted = training_loss(torch.tensor(logits), torch.tensor(labels), eps)
    assert unweighted.item() != pytest.approx(expected, rel=1e-3), "the weights change it"
    model = nn.Linear(3, 3)  # run_epoch reports the same loss for a batch passed through
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
        model.bias.zero_()
    loss, _ = run_epoch(
        model,
        [(torch.tensor(logits), torch.tensor(labels))],
        CPU,
        optimizer=Capture(model),
        label_smoothing=eps,
        class_weights=torch.tensor(w),
    )
    assert loss == pytest.approx(expected, rel=1e-6)
    validation, _ = run_epoch(
        model, [(torch.tensor(logits), torch.tensor(labels))], CPU, class_weights=torch.tensor(w)
    )
    assert validation == pytest.approx(training_loss(torch.tensor(logits), torch.tensor(labels)))


def test_balanced_class_weights_are_scikit_learns() -> None:
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([0, 0, 0, 1, 2, 2, 2, 2, 2, 1, 0, 3])
    names = ["a", "b", "c", "d"]
    expected = compute_class_weight("balanced", classes=np.arange(4), y=labels)
    got = balanced_class_weights(labels, names)
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx(expected.tolist(), rel=1e-7)
    assert got.tolist() == pytest.approx([12 / (4 * 4), 12 / (4 * 2), 12 / (4 * 5), 12 / 4])
    with pytest.raises(ParamsError, match=r"^finetune.class_weights: balanced .* class 'd' has"):
        balanced_class_weights(labels[labels < 3], names, "finetune.class_weights")


class ThreadRank:
    """A rank of an in-process world: `sum` adds every rank's values, as all_reduce does."""

    def __init__(self, rank: int, size: int, barrier: threading.Barrier, slots: list) -> None:
        self.rank, self.size, self.barrier, self.slots = rank, size, barrier, slots

    def sum(self, *values: float) -> list[float]:
        self.slots[self.rank] = values
        self.barrier.wait()
        total = [sum(v[i] for v in self.slots) for i in range(len(values))]
        self.barrier.wait()
        return total


@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_with_class_weights_step_on_the_global_batchs_weighted_mean(ranks: int) -> None:
    """DDP averages the ranks' gradients: with each rank's weighted mean scaled by its share of
    the global batch's weights, the average is one process's step on the whole batch. Seven
    rows, then two (one rank's slice empty with three ranks)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(9, 4), torch.tensor([0, 2, 2, 1, 2, 0, 2, 1, 2])
    weights = torch.tensor([1.75, 0.5, 3.0])
    batches = [(x[:7], y[:7]), (x[7:], y[7:])]

    def steps_of(rank: int, size: int, world: object) -> tuple[list[list[torch.Tensor]], float]:
        """The gradients of each step of `rank` and the epoch's loss it reports."""
        twin = copy.deepcopy(model)
        steps: list[list[torch.Tensor]] = []

        class Keep(Capture):
            def step(self) -> None:
                steps.append([p.grad.clone() for p in twin.parameters()])

        def mine(rows: torch.Tensor) -> torch.Tensor:
            return rows[slice_start(len(rows), rank, size) : slice_start(len(rows), rank + 1, size)]

        loss, _ = run_epoch(
            twin,
            [(mine(bx), mine(by)) for bx, by in batches],
            CPU,
            optimizer=Keep(twin),
            label_smoothing=0.1,
            world=world,  # type: ignore[arg-type]
            class_weights=weights,
        )
        return steps, loss

    one_steps, one_loss = steps_of(0, 1, SINGLE)
    barrier, slots = threading.Barrier(ranks), [None] * ranks
    results: dict[int, tuple[list[list[torch.Tensor]], float]] = {}

    def run(rank: int) -> None:
        results[rank] = steps_of(rank, ranks, ThreadRank(rank, ranks, barrier, slots))

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(ranks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == ranks
    for step, one in enumerate(one_steps):
        average = [sum(results[r][0][step][k] for r in range(ranks)) / ranks for k in range(2)]
        for got, want in zip(average, one, strict=True):
            assert torch.allclose(got, want, atol=1e-6), step
    for rank in range(ranks):
        assert results[rank][1] == pytest.approx(one_loss, rel=1e-6)


def test_the_linear_probe_minimises_the_class_weighted_loss() -> None:
    """At the probe's solution the gradient of the weighted loss (plus its L2 penalty) vanishes,
    that of the unweighted one does not; the history's training loss is the weighted one."""
    x, y = noise_embeddings(90, seed=2)  # no separating plane: the weights move the optimum
    weights = torch.tensor([4.0, 1.0, 0.5])
    head = nn.Sequential(nn.Linear(8, 3))
    result = fit_linear_probe(head, (x, y), (x, y), CPU, class_weights=weights)
    linear = head[0]
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def gradient_norm(weight: torch.Tensor | None) -> float:
        linear.zero_grad()
        penalty = 0.5 * result.l2 * linear.weight.square().sum()
        (nn.functional.cross_entropy(linear(xt), yt, weight=weight) + penalty).backward()
        return float(torch.cat([p.grad.flatten() for p in linear.parameters()]).norm())

    weighted_gradient = gradient_norm(weights)
    assert weighted_gradient < 1e-4
    assert gradient_norm(None) > 100 * weighted_gradient
    with torch.no_grad():
        weighted = nn.functional.cross_entropy(linear(xt), yt, weight=weights)
    assert result.history[0].train_loss == pytest.approx(float(weighted), rel=1e-6)


def test_with_mixing_off_the_step_draws_nothing_and_is_torchs_own() -> None:
    """Default params (no class weights, alphas 0) take torch's plain loss and no random draw."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    twin = copy.deepcopy(model)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    capture = Capture(model)
    loss, _ = run_epoch(model, [(x, y)], CPU, optimizer=capture, mixing=Mixing(0.0, 0.0))
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert np.array_equal(after[1], numpy_state[1]) and after[2:] == numpy_state[2:]
    expected = nn.functional.cross_entropy(twin(x), y)
    expected.backward()
    assert loss == expected.item()
    for got, want in zip(capture.grads, [p.grad for p in twin.parameters()], strict=True):
        assert torch.equal(got, want)


def test_every_linear_of_the_head_trains() -> None:
    torch.manual_seed(0)
    head = build_head(8, [16, 12], dropout=0.3, num_classes=3)
    before = copy.deepcopy(head.state_dict())
    x, y = separable_embeddings(64)
    fit(
        head,
        (array_batches(x, y, 16, True), array_batches(x, y, 64)),
        PhaseParams(lr=1e-2, epochs=2, patience=5),
        device=CPU,
    )
    linears = [name for name, m in head.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3
    for name in linears:
        assert not torch.equal(before[f"{name}.weight"], head.state_dict()[f"{name}.weight"]), name
        assert not torch.equal(before[f"{name}.bias"], head.state_dict()[f"{name}.bias"]), name


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[int]]:
    root = make_imagefolder(
        tmp_path_factory.mktemp("imgs"), classes=("a", "b", "c"), train=6, test=0
    )
    paths = sorted(str(p) for p in (root / "train").rglob("*.jpg"))
    labels = ["abc".index(p.split("/")[-2]) for p in paths]
    return paths, labels


def tiny_network(
    classes: int = 3, dropout: float = 0.3, first: str | None = "layer4", arch: str = "resnet18"
) -> Tail:
    """A torchvision model with an MLP head; the blocks from `first` on (and the head) train."""
    torch.manual_seed(0)
    model = build_model(arch, "none", 32)
    family = describe(model, arch)
    width = classifier_in_features(model, family)
    model.set_submodule(family.classifier, build_head(width, [16], dropout, classes))
    tail = Tail(model, family, first)
    set_trainable(model, tail)
    return tail


FROZEN = ("conv1", "bn1", "layer1", "layer2", "layer3")


def test_frozen_part_gets_no_gradient_and_its_batchnorm_stays_in_eval_mode(tiny_images) -> None:
    paths, labels = tiny_images
    tail = tiny_network()
    model = tail.model
    frozen_before = {n: copy.deepcopy(model.get_submodule(n).state_dict()) for n in FROZEN}
    layer4_before = copy.deepcopy(model.layer4.state_dict())
    data = ImageDataset(paths, labels, 32, Preprocessing())
    batches = ImageBatches(data, BatchOrder(len(data), 6, shuffle=True))
    fit(Streamed(tail), (batches, batches), PhaseParams(lr=1e-2, epochs=2, patience=5), device=CPU)

    tail.train()
    for name in FROZEN:
        block = model.get_submodule(name)
        assert not any(m.training for m in block.modules()), f"{name} left eval mode"
        for key, value in block.state_dict().items():
            # running_mean / running_var / num_batches_tracked included
            assert torch.equal(value, frozen_before[name][key]), f"{name}.{key} changed"
        assert all(p.grad is None and not p.requires_grad for p in block.parameters())
    assert model.layer4.training
    changed = [
        k for k, v in model.layer4.state_dict().items() if not torch.equal(v, layer4_before[k])
    ]
    assert any("running_mean" in k for k in changed) and any("weight" in k for k in changed)


@pytest.mark.parametrize("patience", [2, 100])
def test_early_stopping_restores_the_best_epoch_weights(patience: int) -> None:
    torch.manual_seed(0)
    model = build_head(8, [64], dropout=0.0, num_classes=3)
    x, y = noise_embeddings(96, seed=1)
    vx, vy = noise_embeddings(96, seed=2)
    val = array_batches(vx, vy, 32)
    result = fit(
        model,
        (array_batches(x, y, 16, True), val),
        PhaseParams(lr=3e-2, epochs=12, patience=patience),
        device=CPU,
    )
    last = result.history[-1]
    assert result.best_epoch < last.epoch, "the test needs a best epoch before the last one"
    assert result.stopped_early is (patience == 2)
    restored_loss, _ = run_epoch(model, val, CPU)
    assert restored_loss == pytest.approx(result.best_val_loss, abs=1e-6)
    assert restored_loss != pytest.approx(last.val_loss, abs=1e-4)


def test_a_nan_loss_stops_training_naming_epoch_and_lr() -> None:
    torch.manual_seed(0)
    model = build_head(8, [16], 0.0, 3)
    x, y = separable_embeddings(64)
    x[5, 0] = np.inf
    with pytest.raises(NonFiniteLossError, match=r"epoch 1 with lr=0.1"):
        fit(
            model,
            (array_batches(x, y, 64), array_batches(x, y, 64)),
            PhaseParams(lr=0.1, epochs=3, patience=3),
            device=CPU,
        )


def test_a_huge_learning_rate_stops_with_a_clear_error() -> None:
    torch.manual_seed(0)
    model = build_head(8, [16], 0.0, 3)
    x, y = separable_embeddings(64)
    with pytest.raises(
        NonFiniteLossError, match=r"loss became (nan|inf) in epoch \d+ with lr=1e\+30"
    ):
        fit(
            model,
            (array_batches(x, y, 8, True), array_batches(x, y, 64)),
            PhaseParams(lr=1e30, epochs=20, patience=20),
            device=CPU,
        )


def test_same_seed_gives_identical_training() -> None:
    def run() -> list:
        torch.manual_seed(7)
        model = build_head(8, [16], 0.3, 3)
        x, y = separable_embeddings(64)
        result = fit(
            model,
            (array_batches(x, y, 16, True, seed=7), array_batches(x, y, 64)),
            PhaseParams(lr=1e-2, epochs=3, patience=3),
            device=CPU,
        )
        return result.history_rows()

    assert run() == run()


def test_cached_activations_and_streamed_images_give_the_same_losses(tiny_images, tmp_path) -> None:
    """Phase 2 on cached layer3 outputs == the production `Streamed` running the frozen trunk
    inside the loop (finetune.input: images)."""
    paths, labels = tiny_images
    streamed_net = tiny_network(dropout=0.3)
    cached_net = copy.deepcopy(streamed_net)
    data = ImageDataset(paths, labels, 32, Preprocessing())

    cache_dir = tmp_path / "activations"
    trunk = FrozenTrunk(copy.deepcopy(cached_net.model), cached_net.family, "layer4")
    extract(
        trunk,
        {"train": (paths, labels)},
        tmp_path / "embeddings",
        cache_dir,
        image_size=32,
        prep=Preprocessing(),
        batch_size=5,
        num_workers=0,
        device=CPU,
    )
    activations, _ = cache.load_activations(cache_dir, "train")  # memory-mapped, NHWC
    labels_array = np.asarray(labels)

    torch.manual_seed(3)
    streamed = fit(
        Streamed(streamed_net),
        (
            ImageBatches(data, BatchOrder(len(data), 6, True, seed=3)),
            ImageBatches(data, BatchOrder(len(data), 6, False)),
        ),
        PhaseParams(lr=1e-3, epochs=2, patience=5),
        device=CPU,
    )
    torch.manual_seed(3)
    cached = fit(
        cached_net,
        (
            ArrayBatches(
                activations, labels_array, BatchOrder(len(data), 6, True, seed=3), nhwc=True
            ),
            ArrayBatches(activations, labels_array, BatchOrder(len(data), 6, False), nhwc=True),
        ),
        PhaseParams(lr=1e-3, epochs=2, patience=5),
        device=CPU,
    )
    for s, c in zip(streamed.history, cached.history, strict=True):
        assert s.train_loss == pytest.approx(c.train_loss, abs=1e-4)
        assert s.val_loss == pytest.approx(c.val_loss, abs=1e-4)

    # and Streamed (the trunk stopped at the tail's first block, the tail run on what reached
    # it) computes what the whole model computes on the images, in training mode too
    net = tiny_network(dropout=0.0)
    images = next(iter(ImageBatches(data, BatchOrder(len(data), 6, False))))[0]
    with torch.no_grad():
        through_tail = Streamed(net).train()(images)
        whole = net.train().model(images)
    assert torch.allclose(through_tail, whole, atol=1e-5)


class Recorded:
    """Training batches that note the model's parameters and buffers whenever a batch is asked
    for and at the end of each pass: before each step and after the last."""

    def __init__(self, model: nn.Module, batches: list) -> None:
        self.model, self.batches = model, batches
        self.passes: list[list[tuple[list[torch.Tensor], list[torch.Tensor]]]] = []

    def snapshot(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return (
            [p.detach().clone() for p in self.model.parameters()],
            [b.detach().clone() for b in self.model.buffers()],
        )

    def __iter__(self):
        noted = []
        self.passes.append(noted)
        for batch in self.batches:
            noted.append(self.snapshot())
            yield batch
        noted.append(self.snapshot())


@pytest.mark.parametrize("start_epoch", [None, 4])
def test_the_weight_ema_is_the_formula_and_is_what_fit_validates_and_keeps(
    start_epoch: int | None,
) -> None:
    """ema = decay * ema + (1 - decay) * weights after every step, from the starting weights on,
    computed by hand in float64; each epoch's val loss is the EMA's (with the model's own
    BatchNorm statistics of the moment), and the weights fit leaves (those saved) are the EMA of
    the best epoch, not the trained weights."""
    decay = 0.6
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    rows, labels = (torch.as_tensor(a) for a in separable_embeddings(54, seed=3))
    x, y, vx, vy = rows[:24], labels[:24], rows[24:], labels[24:]
    train = Recorded(model, [(x[i : i + 6], y[i : i + 6]) for i in range(0, 24, 6)])
    result = fit(
        model,
        (train, [(vx, vy)]),
        PhaseParams(lr=0.05, epochs=3, patience=10, ema=decay),
        device=CPU,
        start_epoch=start_epoch,
    )
    passes = train.passes[1:] if start_epoch is not None else train.passes
    assert len(passes) == 3 and all(len(noted) == 5 for noted in passes)  # 4 steps an epoch
    average = [p.double() for p in passes[0][0][0]]  # the starting weights
    by_epoch = {}
    for epoch, noted in enumerate(passes, start=(start_epoch or 0) + 1):
        for weights, _ in noted[1:]:  # after each step
            average = [
                decay * a + (1 - decay) * w.double() for a, w in zip(average, weights, strict=True)
            ]
        by_epoch[epoch] = (average, noted[-1])

    twin = copy.deepcopy(model).eval()
    for stats in result.history[1 if start_epoch is not None else 0 :]:
        ema, (trained, buffers) = by_epoch[stats.epoch]
        for kind, weights in (("ema", ema), ("trained", trained)):
            with torch.no_grad():
                for param, value in zip(twin.parameters(), weights, strict=True):
                    param.copy_(value)
                for buffer, value in zip(twin.buffers(), buffers, strict=True):
                    buffer.copy_(value)
                loss = nn.functional.cross_entropy(twin(vx), vy).item()
            if kind == "ema":
                assert stats.val_loss == pytest.approx(loss, abs=1e-5), stats.epoch
            else:
                assert stats.val_loss != pytest.approx(loss, abs=1e-3), "scored the trained"
    assert result.best_epoch in by_epoch, "the test needs an epoch to beat the start"
    ema, (trained, buffers) = by_epoch[result.best_epoch]
    for param, expected, live in zip(model.parameters(), ema, trained, strict=True):
        assert torch.allclose(param.double(), expected, atol=1e-6)
        assert not torch.allclose(param, live, atol=1e-3), "fit kept the trained weights"
    for buffer, expected in zip(model.buffers(), buffers, strict=True):
        assert torch.equal(buffer, expected), "BatchNorm statistics are the model's own"


def test_ema_zero_averages_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default adds no operation on the weights: no average is even built, so the results
    are those of training without the feature."""
    from twophase import train

    def refuse(*args: object) -> None:
        raise AssertionError("ema: 0 built a weight average")

    monkeypatch.setattr(train, "WeightAverage", refuse)
    torch.manual_seed(0)
    model = build_head(8, [16], 0.0, 3)
    x, y = separable_embeddings(32)
    fit(model, (array_batches(x, y, 8), array_batches(x, y, 32)), PhaseParams(epochs=2), device=CPU)
