"""The params.yaml schema: typed sections, validated whole before any stage does heavy work.

Every stage calls `load_params()` first, so a typo anywhere in params.yaml fails the very first
stage of `dvc repro` in a second, naming the key in its dotted `-S` form.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from twophase.errors import TwophaseError

DATASETS = (
    "oxford_iiit_pet",
    "flowers102",
    "dtd",
    "fgvc_aircraft",
    "food101",
    "digits",
    "imagefolder",
)
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BATCHNORM_MODES = ("frozen", "train")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle")
SOLVERS = ("sgd", "lbfgs")
CACHE_DTYPES = ("float32", "float16", "bfloat16")
# the training augmentations, applied in this order whatever the order of data.augment
AUGMENTATIONS = (
    "random_resized_crop",
    "horizontal_flip",
    "color_jitter",
    "trivial_augment",
    "rand_augment",
    "random_erasing",  # on the normalised tensor, as timm and torchvision's references do
)
FINETUNE_INPUTS = ("cached", "images")
SHUFFLES = ("full", "blocks")
CLASS_WEIGHTS = ("none", "balanced")
TTA_MODES = ("none", "flip")  # test-time augmentation: the plain input, or it and its mirror
# Params that change how fast a stage runs, never what it writes: no stage depends on them.
SPEED_ONLY_PARAMS = ("features.batch_size", "features.num_workers", "compute")


def is_speed_only(key: str) -> bool:
    """A dotted key (`compute.nproc`) among SPEED_ONLY_PARAMS, itself or inside a section."""
    return any(key == name or key.startswith(f"{name}.") for name in SPEED_ONLY_PARAMS)


MAX_IMAGE_SIZE = 2048  # pixels: ViT-H is trained at 518; above this the probe alone takes GiBs


class ParamsError(TwophaseError, ValueError):
    """A params.yaml problem, phrased as one line the user can act on."""


@dataclass(frozen=True)
class DataParams:
    dataset: str = "oxford_iiit_pet"
    root: str = "data/raw"
    val_ratio: float = 0.2
    test_ratio: float = 0.2  # only for a dataset without a test split (a folder of class folders)
    image_size: int = 224
    augment: tuple[str, ...] = ("random_resized_crop", "horizontal_flip")

    def __post_init__(self) -> None:
        _check_choice("data.dataset", self.dataset, DATASETS)
        for i, name in enumerate(self.augment):
            _check_choice(f"data.augment[{i}]", name, AUGMENTATIONS)
        _check(bool(self.root.strip()), "data.root", self.root, "a folder path")
        _check(0.0 < self.val_ratio < 1.0, "data.val_ratio", self.val_ratio, "a number in (0, 1)")
        _check(
            0.0 < self.test_ratio < 1.0, "data.test_ratio", self.test_ratio, "a number in (0, 1)"
        )
        _check(
            8 <= self.image_size <= MAX_IMAGE_SIZE,
            "data.image_size",
            self.image_size,
            f"an integer in [8, {MAX_IMAGE_SIZE}]",
        )


@dataclass(frozen=True)
class ModelParams:
    arch: str = "resnet18"
    weights: str = "IMAGENET1K_V1"
    dense_units: tuple[int, ...] = (256,)
    dropout: float = 0.3
    drop_path: float | None = None  # phase 2's stochastic depth (None: the library's own)

    def __post_init__(self) -> None:
        # which names exist is torchvision's to say: checked against it by the first stage
        name = self.arch.removeprefix("timm/")
        _check(bool(re.fullmatch(r"[\w.-]+", name)), "model.arch", self.arch, "a model name")
        _check(bool(self.weights.strip()), "model.weights", self.weights, "a weights name")
        _check(
            all(u > 0 for u in self.dense_units),
            "model.dense_units",
            list(self.dense_units),
            "a list of positive integers, e.g. [256], or [] for a linear head",
        )
        _check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "a number in [0, 1)")
        if self.drop_path is not None:
            _check(
                0.0 <= self.drop_path < 1.0,
                "model.drop_path",
                self.drop_path,
                "a number in [0, 1), or null for the library's own rate",
            )


@dataclass(frozen=True)
class FeaturesParams:
    batch_size: int = 64
    num_workers: int = 2
    dtype: str = "float32"
    views: int = 0  # augmented views of every training image, cached besides the plain one

    def __post_init__(self) -> None:
        _check(self.views >= 0, "features.views", self.views, "an integer >= 0")
        _check(self.batch_size >= 1, "features.batch_size", self.batch_size, "an integer >= 1")
        _check(self.num_workers >= 0, "features.num_workers", self.num_workers, "an integer >= 0")
        _check_choice("features.dtype", self.dtype, CACHE_DTYPES)


@dataclass(frozen=True)
class ComputeParams:
    """How many processes run the features and training stages (torchrun + DDP when > 1)."""

    nproc: int = 1  # processes per node: GPUs per node, or CPU processes (gloo)
    nnodes: int = 1
    rdzv_endpoint: str = ""  # host:port of the first node, when nnodes > 1
    launcher: str = ""  # a command that starts one torchrun per node, e.g. srun --ntasks-per-node=1
    num_workers: int = 0  # processes reading phase 2's cached batches ahead (into pinned memory)

    def __post_init__(self) -> None:
        _check(self.num_workers >= 0, "compute.num_workers", self.num_workers, "an integer >= 0")
        _check(1 <= self.nproc <= 256, "compute.nproc", self.nproc, "an integer in [1, 256]")
        _check(self.nnodes >= 1, "compute.nnodes", self.nnodes, "an integer >= 1")
        _check(
            self.nnodes == 1 or bool(re.fullmatch(r"[\w.-]+:\d+", self.rdzv_endpoint)),
            "compute.rdzv_endpoint",
            self.rdzv_endpoint,
            "host:port of the first node (needed when compute.nnodes > 1)",
        )

    @property
    def processes(self) -> int:
        return self.nproc * self.nnodes


@dataclass(frozen=True)
class PhaseParams:
    """How a phase trains, the settings both phases share: `train_transfer` and `finetune`
    add their own (TransferParams, FinetuneParams) and name the section in their messages."""

    lr: float = 1e-4
    epochs: int = 50
    patience: int = 5
    batch_size: int = 128
    optimizer: str = "adam"
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    class_weights: str = "none"  # balanced: each class weighs n / (classes * its count)
    mixup: float = 0.0  # MixUp's alpha (0: off): inputs and targets mixed, lam ~ Beta(a, a)
    ema: float = 0.0  # weight EMA decay (0: off): validation and the saved weights use the average

    def _validate(self, section: str, min_epochs: int = 1) -> None:
        _check(self.lr > 0 and math.isfinite(self.lr), f"{section}.lr", self.lr, "a number > 0")
        _check(
            self.epochs >= min_epochs,
            f"{section}.epochs",
            self.epochs,
            f"an integer >= {min_epochs}",
        )
        _check(self.patience >= 1, f"{section}.patience", self.patience, "an integer >= 1")
        _check(self.batch_size >= 1, f"{section}.batch_size", self.batch_size, "an integer >= 1")
        _check_choice(f"{section}.optimizer", self.optimizer, OPTIMIZERS)
        _check(0 <= self.momentum < 1, f"{section}.momentum", self.momentum, "a number in [0, 1)")
        _check(
            self.weight_decay >= 0, f"{section}.weight_decay", self.weight_decay, "a number >= 0"
        )
        _check_choice(f"{section}.schedule", self.schedule, SCHEDULES)
        _check(
            0 <= self.warmup_epochs < max(1, self.epochs),
            f"{section}.warmup_epochs",
            self.warmup_epochs,
            f"an integer in [0, {section}.epochs)",
        )
        if self.schedule == "onecycle" and self.epochs > 0:  # a start, a peak and an end
            _check(
                self.epochs >= 3,
                f"{section}.epochs",
                self.epochs,
                f"an integer >= 3 with {section}.schedule: onecycle (it starts low, peaks, "
                "then anneals to its end in the last epoch)",
            )
            _check(
                self.warmup_epochs <= self.epochs - 2,
                f"{section}.warmup_epochs",
                self.warmup_epochs,
                f"at most {section}.epochs - 2 with onecycle (the peak, then the annealed end)",
            )
        _check(
            0 <= self.label_smoothing < 1,
            f"{section}.label_smoothing",
            self.label_smoothing,
            "a number in [0, 1)",
        )
        _check_choice(f"{section}.class_weights", self.class_weights, CLASS_WEIGHTS)
        _check_alpha(f"{section}.mixup", self.mixup)
        _check(0 <= self.ema < 1, f"{section}.ema", self.ema, "a number in [0, 1) (0: off)")


@dataclass(frozen=True)
class TransferParams(PhaseParams):
    solver: str = "sgd"  # sgd: minibatches with `optimizer`; lbfgs: a linear probe, full batch

    def __post_init__(self) -> None:
        self._validate("train_transfer")
        _check_choice("train_transfer.solver", self.solver, SOLVERS)
        if self.solver == "lbfgs" and self.mixup > 0:
            raise ParamsError(
                f"train_transfer.mixup: {self.mixup!r} mixes minibatches, but the L-BFGS probe "
                "(train_transfer.solver: lbfgs) fits the whole training set at once: set "
                "train_transfer.mixup: 0 or train_transfer.solver: sgd"
            )
        if self.solver == "lbfgs" and self.ema:  # one full-batch solve: no steps to average
            raise ParamsError(
                f"train_transfer.ema: {self.ema!r} averages the weights of optimizer steps, "
                "which the L-BFGS linear probe (solver: lbfgs) does not take; set it to 0"
            )


@dataclass(frozen=True)
class FinetuneParams(PhaseParams):
    lr: float = 1e-5
    epochs: int = 15
    unfreeze: tuple[str, ...] = ("1",)  # the last block: layer4 for a ResNet
    batchnorm: str = "frozen"
    lr_decay: float = 1.0  # each earlier unfrozen block: lr * lr_decay**k (the head: lr)
    input: str = "cached"  # images: the training split streamed, freshly augmented each epoch
    shuffle: str = "full"  # blocks: shuffled among 8 blocks of a batch at a time (huge caches)
    cutmix: float = 0.0  # CutMix's alpha (0: off): a box of another image pasted in; images only

    def __post_init__(self) -> None:
        self._validate("finetune", min_epochs=0)  # 0: phase 1 alone, e.g. to diff the phases
        _check_choice("finetune.input", self.input, FINETUNE_INPUTS)
        _check_choice("finetune.shuffle", self.shuffle, SHUFFLES)
        check_unfreeze(self.unfreeze)
        _check_choice("finetune.batchnorm", self.batchnorm, BATCHNORM_MODES)
        _check(0 < self.lr_decay <= 1, "finetune.lr_decay", self.lr_decay, "a number in (0, 1]")
        _check_alpha("finetune.cutmix", self.cutmix)
        if self.cutmix > 0 and self.input != "images":
            raise ParamsError(
                f"finetune.cutmix: {self.cutmix!r} pastes boxes of images, but finetune.input is "
                f"{self.input!r}: set finetune.input: images (cached activations take "
                "finetune.mixup)"
            )


@dataclass(frozen=True)
class EvaluateParams:
    tta: str = "none"  # flip: scores also the average of the image's and its mirror's probabilities

    def __post_init__(self) -> None:
        _check_choice("evaluate.tta", self.tta, TTA_MODES)


@dataclass(frozen=True)
class Params:
    seed: int = 42
    device: str = "auto"
    precision: str = "auto"
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    features: FeaturesParams = field(default_factory=FeaturesParams)
    compute: ComputeParams = field(default_factory=ComputeParams)
    train_transfer: TransferParams = field(default_factory=TransferParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)

    def __post_init__(self) -> None:
        _check(0 <= self.seed < 2**32, "seed", self.seed, "an integer in [0, 2**32)")
        if self.train_transfer.solver == "lbfgs" and self.model.dense_units:
            raise ParamsError(
                "train_transfer.solver: 'lbfgs' fits a linear head; set model.dense_units: []"
            )
        _check_choice("device", self.device, DEVICES)
        _check_choice("precision", self.precision, PRECISIONS)
        mixing = [
            (key, alpha)
            for key, alpha in (
                ("train_transfer.mixup", self.train_transfer.mixup),
                ("finetune.mixup", self.finetune.mixup),
                ("finetune.cutmix", self.finetune.cutmix),
            )
            if alpha > 0
        ]
        if mixing and self.compute.processes > 1:
            key, alpha = mixing[0]
            raise ParamsError(
                f"{key}: {alpha!r} pairs the rows of one process's batch, so "
                f"{self.compute.processes} processes would train another network than one "
                "(compute is speed only): mix in one process (compute.nproc: 1, nnodes: 1)"
            )
        if self.features.views and not self.data.augment:
            raise ParamsError(
                f"features.views: {self.features.views} caches augmented views, but data.augment "
                "is empty: name augmentations, e.g. [random_resized_crop, horizontal_flip]"
            )


def check_unfreeze(unfreeze: tuple[str, ...]) -> None:
    """Its shape only; whether the names are the arch's last blocks is checked with the model."""
    key = "finetune.unfreeze"
    allowed = "the last blocks by name, e.g. [layer4], an integer N (the last N blocks) or all"
    _check(len(unfreeze) > 0, key, list(unfreeze), allowed)
    _check(len(set(unfreeze)) == len(unfreeze), key, list(unfreeze), "blocks named once each")
    if len(unfreeze) > 1:
        _check(not ({"all"} & set(unfreeze)), key, list(unfreeze), allowed)
        _check(not any(u.isdigit() for u in unfreeze), key, list(unfreeze), allowed)
    elif unfreeze[0].isdigit():
        _check(int(unfreeze[0]) >= 1, key, int(unfreeze[0]), "an integer >= 1")


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ParamsError(f"{key}: {value!r} is not allowed; expected {allowed}")


def _check_choice(key: str, value: str, choices: typing.Iterable[str]) -> None:
    _check(value in choices, key, value, "one of " + ", ".join(choices))


def _check_alpha(key: str, value: float) -> None:
    """A Beta distribution's alpha for MixUp or CutMix: 0 (off) or more."""
    _check(value >= 0 and math.isfinite(value), key, value, "a number >= 0 (0: off)")


class _Yaml12FloatLoader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-05` as a float (YAML 1.2), as `dvc exp run -S` writes it,
    and refuses a key given twice in one mapping (PyYAML keeps the last; DVC refuses the file)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)  # merge keys (<<: *anchor) first, as SafeLoader does
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                duplicate = key in seen
            except TypeError:  # a list or mapping as a key
                raise ParamsError(f"a key that is not a name (line {line})") from None
            if duplicate:
                raise ParamsError(f"key {key!r} appears twice (line {line})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Yaml12FloatLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
        r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)"
        r"|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12FloatLoader)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate the whole params file; raise ParamsError with one clear line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ParamsError(f"cannot read {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ParamsError(f"{path} is not UTF-8 text (byte {err.start} cannot be read)") from None
    if not text.strip():
        raise ParamsError(f"{path} is empty, which DVC refuses: restore it (git checkout {path})")
    try:
        raw = read_yaml(text)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    return parse_params(raw)


def parse_params(raw: object) -> Params:
    """Build Params from parsed YAML; unknown keys and wrong types are errors."""
    if raw is None:
        raw = {}
    params: Params = _build(Params, raw, prefix="")
    return params


def _build(cls: type[Any], raw: object, prefix: str) -> Any:
    where = prefix.rstrip(".") or "params.yaml"
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping of keys, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key not in fields:
            close = _closest(str(key), list(fields))
            hint = f"; did you mean {prefix}{close}?" if close else ""
            valid = ", ".join(prefix + name for name in fields)
            shown = key if re.fullmatch(r"[\w.-]+", str(key)) else repr(key)
            raise ParamsError(f"{prefix}{shown}: unknown key{hint} (valid keys: {valid})")
        kwargs[key] = _convert(hints[key], value, prefix + key)
    return cls(**kwargs)


def _closest(key: str, valid: list[str]) -> str | None:
    """The valid key a typo most likely meant: spelling first, then initials (learning_rate: lr)."""
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        return close[0]
    initials = "".join(part[0] for part in re.split(r"[_\W]+", key.lower()) if part)
    return next((name for name in valid if name in (initials, key.lower())), None)


def _convert(hint: Any, value: object, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type, hint), value, key + ".")
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: expected an integer, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamsError(f"{key}: expected a number, got {_describe(value)}")
        return float(value)
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ParamsError(f"{key}: expected a string, got {_describe(value)}")
        return str(value)
    origin = typing.get_origin(hint)
    if origin is tuple:
        item_hint = typing.get_args(hint)[0]
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ParamsError(f"{key}: expected a list, got {_describe(value)}")
        return tuple(_convert(item_hint, item, f"{key}[{i}]") for i, item in enumerate(value))
    if isinstance(hint, types.UnionType) and type(None) in hint.__args__:  # e.g. float | None
        if value is None:
            return None
        (inner,) = (arg for arg in hint.__args__ if arg is not type(None))
        return _convert(inner, value, key)
    raise TypeError(f"unsupported params type for {key}: {hint}")


def _describe(value: object) -> str:
    if value is None:
        return "nothing (null)"
    return f"{value!r} ({type(value).__name__})"


def to_dict(params: Params) -> dict[str, Any]:
    """Plain nested dict (lists, not tuples) for checkpoints and reports."""
    return typing.cast(dict[str, Any], _plain(dataclasses.asdict(params)))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the dotted form users pass to `dvc exp run -S`."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
