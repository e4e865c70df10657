"""The model: a torchvision (or timm) classification model with its weights and preprocessing,
and the MLP head that replaces its classifier.

Checkpoints hold the model's own state-dict keys, so they load into plain torchvision (docs:
"Use the model"). Where the model is cut into a frozen trunk and a trained tail is network.py's;
where each family's blocks and classifier are is the family table's (backbones.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from twophase.backbones import (
    TIMM_DROP_PATH,
    TIMM_PREFIX,
    ArchError,
    Family,
    describe,
    family_of,
)
from twophase.errors import TwophaseError
from twophase.params import ParamsError

if TYPE_CHECKING:  # torchvision: imported only where a model is built
    from torchvision.models import WeightsEnum

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(TwophaseError):
    """model.weights names nothing that can be loaded."""


@dataclass(frozen=True)
class Preprocessing:
    """What the weights were trained with: resize to `resize_ratio * image_size`, centre crop."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_ratio: float = 256 / 224
    interpolation: str = "bilinear"


def weights_enum(arch: str, weights: str) -> WeightsEnum | None:
    """The torchvision weights named `weights`, or None for 'none' and local files."""
    check_arch(arch)
    if weights.lower() == "none" or _looks_like_path(weights) or is_timm(arch):
        return None
    import torchvision  # imported only where a torchvision model is built

    enum = torchvision.models.get_model_weights(arch)
    name = weights.removeprefix(f"{enum.__name__}.")
    if name == "DEFAULT":
        default: WeightsEnum = enum.DEFAULT
        return default
    if name not in enum.__members__:
        names = ", ".join(["DEFAULT", *enum.__members__, "none", "<path to a .pt state dict>"])
        raise WeightsError(
            f"model.weights: {weights!r} is not a weights name for {arch}; expected one of {names}"
        )
    return enum[name]


def _looks_like_path(weights: str) -> bool:
    return "/" in weights or "\\" in weights or weights.endswith((".pt", ".pth", ".bin"))


def preprocessing(arch: str, weights: str, model: nn.Module | None = None) -> Preprocessing:
    """The weights' own preprocessing: torchvision's transforms, or timm's data config."""
    if is_timm(arch) and model is not None:
        from timm.data import resolve_data_config  # type: ignore[attr-defined]  # optional

        config = resolve_data_config({}, model=model)  # type: ignore[no-untyped-call]
        return Preprocessing(
            mean=tuple(config["mean"]),
            std=tuple(config["std"]),
            resize_ratio=1 / config["crop_pct"],
            interpolation=config["interpolation"],
        )
    enum = weights_enum(arch, weights)
    if enum is None:
        return Preprocessing()
    preset = enum.transforms()
    return Preprocessing(
        mean=tuple(preset.mean),
        std=tuple(preset.std),
        resize_ratio=preset.resize_size[0] / preset.crop_size[0],
        interpolation=preset.interpolation.value,
    )


def is_timm(arch: str) -> bool:
    return arch.startswith(TIMM_PREFIX)


def check_arch(arch: str) -> None:
    """An unsupported name is a params error listing the supported ones."""
    if is_timm(arch):
        try:
            import timm  # optional: pip install -e '.[timm]'
        except ImportError:
            raise ParamsError(
                f"model.arch: {arch!r} needs timm: pip install -e '.[timm]'"
            ) from None
        if not timm.is_model(arch.removeprefix(TIMM_PREFIX)):
            raise ParamsError(f"model.arch: {arch!r} is not a timm model name") from None
        return
    try:
        family_of(arch, check=True)
    except ArchError as err:
        raise ParamsError(str(err)) from None


def model_kwargs(arch: str, weights: str, image_size: int) -> dict[str, Any]:
    """Builder arguments beyond the name: a ViT is built for the size its weights were trained
    at (as torchvision's own builder does), an untrained one for `image_size`."""
    if is_timm(arch) or family_of(arch).layout != "tokens":
        return {}
    enum = weights_enum(arch, weights)
    return {"image_size": int(enum.meta["min_size"][0]) if enum is not None else image_size}


def create_model(arch: str, kwargs: dict[str, Any], drop_path: float | None = None) -> nn.Module:
    """An untrained `arch` from torchvision, or from timm for `timm/<name>`.

    `drop_path` (model.drop_path) sets its stochastic depth (`set_drop_path`); None keeps the
    library's default, as the frozen trunk and phase 1 build it: in eval mode it does nothing.
    """
    if is_timm(arch):
        import timm  # optional dependency

        if drop_path:  # timm builds DropPath modules only for a rate > 0: its default is none
            kwargs = {**kwargs, TIMM_DROP_PATH: drop_path}
        try:
            timm_model: nn.Module = timm.create_model(arch.removeprefix(TIMM_PREFIX), **kwargs)
        except TypeError as err:
            if drop_path and TIMM_DROP_PATH in str(err):
                raise _no_drop_path(
                    arch, drop_path, f"timm's builder takes no {TIMM_DROP_PATH}"
                ) from None
            raise
        return timm_model
    import torchvision  # imported only where a model is built

    model: nn.Module = torchvision.models.get_model(arch, weights=None, **kwargs)
    if drop_path is not None:
        set_drop_path(model, arch, drop_path)
    return model


def set_drop_path(model: nn.Module, arch: str, drop_path: float) -> None:
    """Stochastic depth of a torchvision model: the residual branch of block i of N (its
    StochasticDepth modules in forward order) is dropped with probability
    drop_path * i / (N - 1), from 0 at the first block to `drop_path` at the last.

    This is the rate torchvision's ConvNeXt and Swin builders give for `stochastic_depth_prob`
    (EfficientNet's ends at drop_path * (N - 1) / N) and timm's `drop_path_rate`. It is set on
    the built model because Swin's builders fix `stochastic_depth_prob` (0.2 to 0.5) instead of
    taking it. 0 turns off the stochastic depth torchvision's builders have on by default.
    """
    if not _has_drop_path(arch, drop_path):
        return
    layers: list[Any] = [m for m in model.modules() if type(m).__name__ == "StochasticDepth"]
    last = max(len(layers) - 1, 1)
    for i, layer in enumerate(layers):
        layer.p = drop_path * i / last


def check_drop_path(arch: str, drop_path: float) -> None:
    """A non-zero model.drop_path needs an arch with stochastic depth: the family table says it
    for torchvision; a timm model is built on the meta device (no memory, no weights) to ask."""
    if not drop_path:
        return
    check_arch(arch)
    if is_timm(arch):
        with torch.device("meta"):
            create_model(arch, {}, drop_path)
    else:
        _has_drop_path(arch, drop_path)


def _has_drop_path(arch: str, drop_path: float) -> bool:
    """Whether a torchvision `arch` has stochastic depth; a non-zero rate for one without is
    a params error."""
    family = family_of(arch)
    if family.drop_path is None and drop_path:
        raise _no_drop_path(
            arch, drop_path, f"torchvision's {family.name} family has no stochastic depth"
        )
    return family.drop_path is not None


def _no_drop_path(arch: str, drop_path: float, why: str) -> ParamsError:
    return ParamsError(
        f"model.drop_path: {drop_path!r} is not allowed for {arch} ({why}); expected 0, or an "
        "arch with it: ConvNeXt, EfficientNet, Swin, most timm models"
    )


def build_model(arch: str, weights: str, image_size: int, progress: bool = True) -> nn.Module:
    """`arch` with the requested weights, its classifier as the library made it."""
    check_arch(arch)
    if is_timm(arch) and weights.lower() != "none":
        return _timm_pretrained(arch, weights)
    enum = weights_enum(arch, weights)
    try:
        model = create_model(arch, model_kwargs(arch, weights, image_size))
    except (ValueError, AssertionError, RuntimeError) as err:
        raise ParamsError(f"data.image_size: {image_size} does not fit {arch} ({err})") from None
    if enum is not None:
        model.load_state_dict(enum.get_state_dict(progress=progress, check_hash=True))
    elif weights.lower() != "none":
        classifier = describe(model, arch).classifier
        state = load_state_dict_file(Path(weights), classifier)
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # right names, wrong shapes
            mismatch = next((line.strip() for line in str(err).splitlines() if "size" in line), "")
            raise WeightsError(
                f"model.weights: {weights!r} does not fit {arch} ({mismatch.rstrip('.')})"
            ) from None
        missing = [k for k in result.missing_keys if not k.startswith(f"{classifier}.")]
        if missing or result.unexpected_keys:
            raise WeightsError(
                f"model.weights: {weights!r} does not fit {arch} "
                f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
            )
    return model


def _timm_pretrained(arch: str, weights: str) -> nn.Module:
    """timm's own loading: from the hub for DEFAULT, else from a local file."""
    import timm  # optional dependency

    name = arch.removeprefix(TIMM_PREFIX)
    if weights == "DEFAULT":
        model: nn.Module = timm.create_model(name, pretrained=True)
        return model
    if not _looks_like_path(weights) or not Path(weights).is_file():
        raise WeightsError(
            f"model.weights: {weights!r} for {arch} must be DEFAULT (timm's hub), none, or an "
            "existing weights file"
        )
    try:
        model = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"file": str(Path(weights).resolve())}
        )
    except (RuntimeError, ValueError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WeightsError(
            f"model.weights: {weights!r} does not fit {arch} ({reason[:160]})"
        ) from None
    return model


def load_state_dict_file(path: Path, classifier: str = "fc") -> dict[str, torch.Tensor]:
    """A local state dict (plain, or a checkpoint dict with 'state_dict'/'model'), classifier
    dropped: its number of classes is the pretraining's, not ours."""
    if not path.is_file():
        raise WeightsError(f"model.weights: file {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WeightsError(
            f"model.weights: {str(path)!r} is not a PyTorch weights file ({reason[:120]})"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(
            f"model.weights: {str(path)!r} holds no state dict (a mapping of names to tensors)"
        )
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith(f"{classifier}.")}


def classifier_in_features(model: nn.Module, family: Family) -> int:
    classifier = model.get_submodule(family.classifier)
    if not isinstance(classifier, nn.Linear):  # pragma: no cover - guards the family table
        raise TypeError(f"{family.classifier} is not a Linear layer")
    return int(classifier.in_features)


def build_head(
    in_features: int, dense_units: Sequence[int], dropout: float, num_classes: int
) -> nn.Sequential:
    """in → [Linear → ReLU → Dropout]* → Linear(num_classes); every Linear trains."""
    layers: list[nn.Module] = []
    width = in_features
    for units in dense_units:
        layers += [nn.Linear(width, units), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        width = units
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
