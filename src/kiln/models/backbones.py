"""Known image architectures (ResNet, ConvNeXt, ViT) as kiln nets: `backbone(input_shape, num_outputs, name=...)`.

torchvision and timm do not import with the CPU torch (DESIGN.md, "Vision libraries with the CPU
torch"), so the architectures come from Hugging Face transformers, built from a config (nothing
downloads); timm is used instead when it imports (`library=auto`). Either way the net is a
`Backbone`: `backbone` maps images to pooled features as a plain tensor (a transformers ModelOutput
never leaves forward, so the exporter and the pruner see tensors only) and `head` is a new linear
layer sized to the data.

`weights=PATH` loads a state dict into the backbone only, strictly: a file from another
architecture, another channel count or another image size is one error naming the first tensor
that does not fit, not a silently half-loaded net.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kiln.errors import KilnError, require

LIBRARIES = ("auto", "transformers", "timm")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# top-level names of classification heads in the files kiln reads: transformers' *ForImageClassification
# (classifier), timm's (head, fc) and a Backbone's own (head)
HEAD_NAMES = ("classifier", "head", "fc")
GIVE_INSTEAD = (
    "give a state dict saved with torch.save(net.state_dict()) (.pt/.pth/.bin), a .safetensors file, "
    "a Lightning .ckpt, or a directory written by save_pretrained"
)


@dataclass(frozen=True)
class Arch:
    family: str  # transformers' model_type: resnet, convnext or vit
    timm_name: str
    config: dict[str, Any]  # the size fields of the transformers config


def _resnet(depths: list[int], hidden_sizes: list[int], layer_type: str) -> dict[str, Any]:
    return {"depths": depths, "hidden_sizes": hidden_sizes, "layer_type": layer_type}


def _convnext(depths: list[int], hidden_sizes: list[int]) -> dict[str, Any]:
    return {"depths": depths, "hidden_sizes": hidden_sizes}


def _vit(hidden_size: int, layers: int, heads: int, mlp: int) -> dict[str, Any]:
    return {
        "hidden_size": hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": mlp,
    }


ARCHS: dict[str, Arch] = {
    "resnet18": Arch("resnet", "resnet18", _resnet([2, 2, 2, 2], [64, 128, 256, 512], "basic")),
    "resnet34": Arch("resnet", "resnet34", _resnet([3, 4, 6, 3], [64, 128, 256, 512], "basic")),
    "resnet50": Arch("resnet", "resnet50", _resnet([3, 4, 6, 3], [256, 512, 1024, 2048], "bottleneck")),
    # the small ConvNeXts are timm's (the same depths and widths; timm writes their MLPs as 1x1 convs)
    "convnext_atto": Arch("convnext", "convnext_atto", _convnext([2, 2, 6, 2], [40, 80, 160, 320])),
    "convnext_femto": Arch("convnext", "convnext_femto", _convnext([2, 2, 6, 2], [48, 96, 192, 384])),
    "convnext_pico": Arch("convnext", "convnext_pico", _convnext([2, 2, 6, 2], [64, 128, 256, 512])),
    "convnext_nano": Arch("convnext", "convnext_nano", _convnext([2, 2, 8, 2], [80, 160, 320, 640])),
    "convnext_tiny": Arch("convnext", "convnext_tiny", _convnext([3, 3, 9, 3], [96, 192, 384, 768])),
    "vit_tiny": Arch("vit", "vit_tiny_patch16_224", _vit(192, 12, 3, 768)),
    "vit_small": Arch("vit", "vit_small_patch16_224", _vit(384, 12, 6, 1536)),
}


class Backbone(nn.Module):
    """`head(backbone(x))`: images (N, C, H, W) -> pooled features (N, feature_size) -> logits."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_size: int,
        num_outputs: int,
        dropout: float,
        name: str,
        library: str,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        self.head = nn.Sequential(*layers, nn.Linear(feature_size, num_outputs))
        self.name = name
        self.library = library
        self.feature_size = feature_size

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


class HFFeatures(nn.Module):
    """A transformers base model (`model`) whose forward returns pooled features as a plain tensor:
    ResNet/ConvNeXt their pooler output, ViT the CLS token after the final layernorm."""

    def __init__(self, model: nn.Module, family: str) -> None:
        super().__init__()
        self.model = model
        self.family = family

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(pixel_values=x)
        if self.family == "vit":
            return out.last_hidden_state[:, 0]
        return out.pooler_output.flatten(1)


def backbone(
    input_shape: Sequence[int],
    num_outputs: int,
    name: str = "resnet18",
    weights: str | None = None,
    library: str = "auto",
    dropout: float = 0.0,
    patch_size: int | None = None,
) -> Backbone:
    """A known architecture for images (channels, height, width) with a new `num_outputs` head.

    `weights`: a state dict for the backbone (file or save_pretrained directory; nothing downloads).
    `patch_size` (ViT only): defaults to 16, or the largest size up to 16 that divides the image."""
    arch = ARCHS.get(name)
    if arch is None:
        near = difflib.get_close_matches(name, list(ARCHS), n=3, cutoff=0.6)
        guess = f"did you mean {' or '.join(near)}? " if near else ""
        raise KilnError(f"model.net.name={name}: not a backbone kiln knows; {guess}known: {', '.join(ARCHS)}")
    require(
        len(input_shape) == 3,
        "input_shape",
        f"a backbone needs images (channels, height, width), got {tuple(input_shape)}",
    )
    channels, height, width = (int(size) for size in input_shape)
    require(0 <= dropout < 1, "dropout", f"must be in [0, 1), got {dropout}")
    require(library in LIBRARIES, "library", f"must be one of {', '.join(LIBRARIES)}, got {library!r}")
    if arch.family == "convnext" and min(height, width) < 32:
        # a 4x4 stem and three 2x2 downsamplings, all without padding: 16x16 images end at zero pixels
        raise KilnError(
            f"model.net.name={name}: ConvNeXt needs images of at least 32x32 pixels (it downsamples by 32), "
            f"the data has {height}x{width}; resize the images, or use a resnet or vit backbone"
        )
    if arch.family == "vit":
        patch_size = _patch_size(patch_size, height, width)
    else:
        require(
            patch_size is None,
            "patch_size",
            f"only ViT backbones take a patch size; {name} is a {arch.family}",
        )
    library = _resolve_library(library)
    path = None if weights is None else Path(str(weights)).expanduser()
    # read before building: a wrong file fails before the seconds a build takes
    state = None if path is None else _read_weights(path, f"model.net.weights={path}", name, arch, library)
    if library == "timm":
        features, feature_size = _timm_features(arch, channels, height, width, patch_size)
    else:
        features, feature_size = _transformers_features(arch, channels, height, width, patch_size)
    if path is not None and state is not None:
        target = features.model if isinstance(features, HFFeatures) else features
        load_weights(target, state, f"model.net.weights={path}", name, library, channels)
    return Backbone(features, feature_size, num_outputs, dropout, name, library)


def _patch_size(patch_size: int | None, height: int, width: int) -> int:
    """The ViT patch: the one asked for if it tiles the image, else 16, else the largest size below
    16 that tiles it (28x28 digits: 14)."""
    if patch_size is None:
        side = math.gcd(height, width)
        return max(size for size in range(1, 17) if side % size == 0)
    require(
        isinstance(patch_size, int)
        and patch_size >= 1
        and height % patch_size == 0
        and width % patch_size == 0,
        "patch_size",
        f"must divide the image size {height}x{width}, got {patch_size}; "
        f"leave it unset for {_patch_size(None, height, width)}",
    )
    return patch_size


@functools.cache
def _import_error(library: str) -> str | None:
    """Why `import library` fails (its first line), or None when it imports. timm fails with a
    RuntimeError, not an ImportError, when torchvision does not match torch."""
    try:
        __import__(library)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return None


def _resolve_library(library: str) -> str:
    if library == "auto":
        return "timm" if _import_error("timm") is None else "transformers"
    reason = _import_error(library)
    if reason is not None:
        if library == "timm":  # timm imports torchvision, which must be built for this torch
            fix = (
                "install timm with a torchvision built for this torch, or set model.net.library=transformers"
            )
        else:
            fix = f"install it (pip install {library}), or set model.net.library=auto"
        raise KilnError(f"model.net.library={library}: {library} does not import here ({reason}); {fix}")
    return library


def _transformers_features(
    arch: Arch, channels: int, height: int, width: int, patch_size: int | None
) -> tuple[HFFeatures, int]:
    # imported here: transformers' modeling code takes seconds to import
    model: nn.Module
    if arch.family == "resnet":
        from transformers import ResNetConfig, ResNetModel

        model = ResNetModel(ResNetConfig(num_channels=channels, **arch.config))
        size = arch.config["hidden_sizes"][-1]
    elif arch.family == "convnext":
        from transformers import ConvNextConfig, ConvNextModel

        model = ConvNextModel(ConvNextConfig(num_channels=channels, **arch.config))
        size = arch.config["hidden_sizes"][-1]
    else:
        from transformers import ViTConfig, ViTModel

        assert patch_size is not None  # backbone() picked one
        config = ViTConfig(
            num_channels=channels, image_size=(height, width), patch_size=patch_size, **arch.config
        )
        model = ViTModel(config, add_pooling_layer=False)
        size = arch.config["hidden_size"]
    return HFFeatures(model, arch.family), size


def _timm_features(
    arch: Arch, channels: int, height: int, width: int, patch_size: int | None
) -> tuple[nn.Module, int]:
    import timm

    # num_classes=0: timm's models then return their pooled features (ViT: the CLS token after the norm)
    extra: dict[str, Any] = (
        {"img_size": (height, width), "patch_size": patch_size} if arch.family == "vit" else {}
    )
    model = timm.create_model(arch.timm_name, pretrained=False, num_classes=0, in_chans=channels, **extra)
    return model, int(model.num_features)


def load_weights(
    target: nn.Module, state: dict[str, Tensor], key: str, name: str, library: str, channels: int
) -> None:
    """Load the backbone tensors of `state` (a file's, `key` names it) into `target`, strictly.

    Keys may carry the prefix of a larger model around the backbone (transformers' `resnet.`,
    a Backbone's `backbone.model.`, a KilnModule checkpoint's `net.backbone.model.`): the prefix under
    which most keys fit is taken, and the rest of that larger model (its head) is ignored."""
    expected = target.state_dict()
    prefix = _common_prefix(state, expected)
    if prefix is None:
        first = next(iter(state), "")
        raise KilnError(
            f"{key}: none of its {len(state)} tensors fits {name} ({library}; first in the file: {first}); "
            "these weights are for another architecture or library: set model.net.name to theirs"
        )
    found: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for file_key, tensor in state.items():
        if not file_key.startswith(prefix):
            continue  # the model around the backbone: its head, its loss
        rest = file_key[len(prefix) :]
        if rest in expected:
            found[rest] = tensor
        elif rest.split(".")[0] not in HEAD_NAMES:
            unexpected.append(rest)
    other = "these weights are for another architecture: set model.net.name to theirs"
    stem = next((k for k, v in expected.items() if v.dim() == 4), None)  # the first conv sees the channels
    for tensor_key, tensor in expected.items():
        if tensor_key not in found:
            if tensor_key.endswith("num_batches_tracked"):
                continue  # a counter, not a weight
            raise KilnError(
                f"{key}: tensor {tensor_key} {_shape(tensor)} of {name} is not in the file "
                f"(it has {len(found)} of {name}'s tensors under '{prefix}'); {other}"
            )
        theirs = found[tensor_key]
        if theirs.shape != tensor.shape:
            drop_channels = (0, *range(2, theirs.dim()))  # every dimension but the input channels
            only_channels = theirs.dim() == 4 and all(
                theirs.shape[d] == tensor.shape[d] for d in drop_channels
            )
            if tensor_key == stem and only_channels:
                why = (
                    f"these weights are for {theirs.shape[1]}-channel images and the data has {channels}: "
                    "convert the images, or train without model.net.weights"
                )
            elif "position" in tensor_key:
                why = (
                    "these weights are for another image size or patch size: resize the images or set "
                    "model.net.patch_size to theirs"
                )
            else:
                why = other
            raise KilnError(
                f"{key}: tensor {tensor_key} has shape {_shape(theirs)} in the file but {_shape(tensor)} in {name}; {why}"
            )
    if unexpected:
        raise KilnError(
            f"{key}: tensor {unexpected[0]} {_shape(state[prefix + unexpected[0]])} in the file has no place "
            f"in {name}; {other}"
        )
    target.load_state_dict({**expected, **found})


def _shape(tensor: Tensor) -> str:
    return str(tuple(tensor.shape))


def _common_prefix(state: dict[str, Tensor], expected: dict[str, Tensor]) -> str | None:
    """The prefix (ending in '.', or '') under which the most file keys are keys of `expected`."""
    counts: Counter[str] = Counter()
    for file_key in state:
        parts = file_key.split(".")
        for start in range(len(parts)):
            if ".".join(parts[start:]) in expected:
                counts[".".join(parts[:start]) + "." if start else ""] += 1
    if not counts:
        return None
    return max(counts, key=lambda prefix: (counts[prefix], -len(prefix)))


def _read_weights(path: Path, key: str, name: str, arch: Arch, library: str) -> dict[str, Tensor]:
    if not path.exists():
        raise KilnError(f"{key}: no such file or directory; {GIVE_INSTEAD}")
    if path.is_dir():
        if library == "transformers":
            _check_config(path, key, name, arch)
        files = _weight_files(path)
        if not files:
            raise KilnError(
                f"{key}: the directory has no model.safetensors or pytorch_model.bin (what save_pretrained "
                f"writes); {GIVE_INSTEAD}"
            )
        state: dict[str, Tensor] = {}
        for file in files:
            state.update(_read_file(file, f"model.net.weights={file}"))
        return state
    return _read_file(path, key)


def _weight_files(directory: Path) -> list[Path]:
    single = [directory / "model.safetensors", directory / "pytorch_model.bin"]
    index = directory / "model.safetensors.index.json"
    if index.exists():  # sharded: save_pretrained of a large model
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        return [directory / shard for shard in shards]
    return [file for file in single if file.exists()][:1]


def _read_file(path: Path, key: str) -> dict[str, Tensor]:
    if path.suffix not in WEIGHT_SUFFIXES:
        raise KilnError(f"{key}: not a weights file (expected {', '.join(WEIGHT_SUFFIXES)}); {GIVE_INSTEAD}")
    loaded: Any
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise KilnError(f"{key}: {_unreadable(path, exc)}; {GIVE_INSTEAD}") from exc
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # a Lightning checkpoint
    if not isinstance(loaded, dict) or not loaded:
        what = "an empty dict" if isinstance(loaded, dict) else f"a {type(loaded).__name__}"
        raise KilnError(f"{key}: holds {what}, not a state dict of tensors; {GIVE_INSTEAD}")
    for entry, value in loaded.items():
        if not isinstance(value, Tensor):
            raise KilnError(
                f"{key}: not a state dict of tensors (its entry {entry!r} is a {type(value).__name__}); {GIVE_INSTEAD}"
            )
    return {str(entry): value for entry, value in loaded.items()}


def _unreadable(path: Path, exc: Exception) -> str:
    """Why a weights file could not be read, in words (torch.load's own errors on a text file are
    `IndexError: pop from empty list` and the like)."""
    with path.open("rb") as file:
        head = file.read(512)
    try:
        text = b"\0" not in head and bool(head.decode("utf-8").strip())
    except UnicodeDecodeError:  # a multi-byte character cut at 512 bytes reads as binary: fine here
        text = False
    if text:
        return "a text file, not a state dict"
    message = str(exc)
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if refused:
        return f"pickles a {refused.group(1)} object, which torch.load(weights_only=True) refuses; not a state dict"
    if "WeightsUnpickler error" in message:
        return "not a file torch.save wrote"
    first = (message.strip().splitlines() or [""])[0][:160]
    return f"cannot be read as a state dict ({type(exc).__name__}: {first})".replace(": )", ")")


def _check_config(directory: Path, key: str, name: str, arch: Arch) -> None:
    """A save_pretrained directory says what it holds: refuse another architecture by its config.json."""
    path = directory / "config.json"
    if not path.exists():
        return
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # the tensors will tell
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return
    same_size = all(config.get(field_name) == value for field_name, value in arch.config.items())
    if model_type == arch.family and same_size:
        return
    theirs = [
        known
        for known, other in ARCHS.items()
        if other.family == model_type and all(config.get(f) == v for f, v in other.config.items())
    ]
    what = f"a {model_type} ({', '.join(config.get('architectures') or [])})".replace(" ()", "")
    fix = (
        f"set model.net.name={theirs[0]}"
        if theirs
        else f"set model.net.name to a backbone of that architecture, or give {name} weights"
    )
    raise KilnError(f"{key}: its config.json is for {what} that is not {name}; {fix}")
