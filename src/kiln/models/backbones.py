"""Image backbones from timm as kiln nets: `backbone(input_shape, num_outputs, name=<any timm model>)`.

timm builds the architecture from its name (nothing downloads; `pretrained=False`), returning pooled
features (`num_classes=0`); the net is a `Backbone` whose `head` is a new linear layer sized to the
data. timm's own data config for the model (input size, mean, std, interpolation) rides along as
`Backbone.data_config`: kiln's image datamodule takes its mean, std and interpolation where the
data config leaves them unset (kiln.data.images, use_net_data_config), keeps its own image size
(and says timm's), and the exported graph repeats what the datamodule did.

`weights=PATH` loads a state dict into the backbone only, strictly: a file from another
architecture, another channel count or another image size is one error naming the first tensor
that does not fit, not a silently half-loaded net. A line on stderr says which weights were loaded
(file, number of tensors) or that the net starts from scratch.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kiln.errors import KilnError, require

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# top-level names of classification heads in the files kiln reads: timm's (head, fc, classifier)
# and a Backbone's own (head)
HEAD_NAMES = ("classifier", "head", "fc")
GIVE_INSTEAD = (
    "give a state dict saved with torch.save(net.state_dict()) (.pt/.pth/.bin), a .safetensors file, "
    "a Lightning .ckpt, or a directory timm's save/push_to_hub wrote (model.safetensors)"
)
# kiln's short names for timm's ViTs (the configs and runs that used them keep working)
ALIASES = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224"}
# what a timm model's data config says that kiln uses (timm.data.resolve_model_data_config)
DATA_CONFIG_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct")
NEEDS_TIMM = "pip install timm torchvision (scripts/setup.sh installs both)"


class Backbone(nn.Module):
    """`head(backbone(x))`: images (N, C, H, W) -> pooled features (N, feature_size) -> logits."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_size: int,
        num_outputs: int,
        dropout: float,
        name: str,
        data_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        self.head = nn.Sequential(*layers, nn.Linear(feature_size, num_outputs))
        self.name = name
        self.library = "timm"
        self.feature_size = feature_size
        self.data_config = dict(data_config or {})

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def backbone(
    input_shape: Sequence[int],
    num_outputs: int,
    name: str = "resnet18",
    weights: str | None = None,
    dropout: float = 0.0,
    patch_size: int | None = None,
) -> Backbone:
    """A timm architecture for images (channels, height, width) with a new `num_outputs` head.

    `weights`: a state dict for the backbone (file or directory; nothing downloads).
    `patch_size` (ViT only): defaults to 16, or the largest size up to 16 that divides the image."""
    timm = _import_timm()
    timm_name = _timm_name(timm, str(name))
    require(
        len(input_shape) == 3,
        "input_shape",
        f"a backbone needs images (channels, height, width), got {tuple(input_shape)}",
    )
    channels, height, width = (int(size) for size in input_shape)
    require(0 <= dropout < 1, "dropout", f"must be in [0, 1), got {dropout}")
    if timm_name.startswith("convnext") and min(height, width) < 32:
        # a 4x4 stem and three 2x2 downsamplings, all without padding: 16x16 images end at zero pixels
        raise KilnError(
            f"model.net.name={name}: ConvNeXt needs images of at least 32x32 pixels (it downsamples by 32), "
            f"the data has {height}x{width}; resize the images, or use a resnet or vit backbone"
        )
    is_vit = timm_name.startswith("vit_")
    if is_vit:
        patch_size = _patch_size(patch_size, height, width)
    else:
        require(patch_size is None, "patch_size", f"only ViT backbones take a patch size; {name} is not one")
    path = None if weights is None else Path(str(weights)).expanduser()
    key = f"model.net.weights={path}"
    # read before building: a wrong file fails before the seconds a build takes
    state = None if path is None else _read_weights(path, key, timm_name)
    extra: dict[str, Any] = {"img_size": (height, width), "patch_size": patch_size} if is_vit else {}
    # num_classes=0: timm's models then return their pooled features (ViT: the CLS token after the norm)
    model = timm.create_model(timm_name, pretrained=False, num_classes=0, in_chans=channels, **extra)
    data_config = _data_config(timm, model)
    if path is not None and state is not None:
        loaded = load_weights(model, state, key, str(name), channels)
        _say(f"model.net: timm {timm_name} with weights from {path} ({loaded} tensors)")
    else:
        _say(
            f"model.net: timm {timm_name} starts from scratch (random weights; model.net.weights=FILE loads some)"
        )
    # what the pooled features measure: a MobileNetV3's or EfficientNet's head conv widens them past
    # num_features (its trunk's width), which timm then keeps in head_hidden_size
    feature_size = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return Backbone(model, feature_size, num_outputs, dropout, str(name), data_config)


def _say(line: str) -> None:
    print(f"kiln: {line}", file=sys.stderr, flush=True)


@functools.cache
def _import_error(library: str) -> str | None:
    """Why `import library` fails (its first line), or None when it imports. timm fails with a
    RuntimeError, not an ImportError, when torchvision is not built for this torch."""
    try:
        __import__(library)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return None


def _import_timm() -> Any:
    reason = _import_error("timm")
    if reason is not None:
        raise KilnError(f"model=backbone needs timm, and timm does not import here ({reason}); {NEEDS_TIMM}")
    import timm

    return timm


def _timm_name(timm: Any, name: str) -> str:
    """timm's name for `name` (kiln's aliases resolved); an unknown name lists the nearest ones."""
    timm_name = ALIASES.get(name, name)
    if timm.is_model(timm_name):
        return str(timm_name)
    known = [*timm.list_models(), *ALIASES]
    near = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    guess = f"did you mean {' or '.join(near)}? " if near else ""
    raise KilnError(
        f"model.net.name={name}: not a timm model; {guess}"
        f"python -c 'import timm; print(timm.list_models(\"{_pattern(name)}\"))' lists them"
    )


def _pattern(name: str) -> str:
    """A timm.list_models pattern from the start of a name: `resnt18` -> `res*`."""
    stem = re.match(r"[a-z]+", name.lower())
    return f"{stem.group(0)[:3]}*" if stem else "*"


def _data_config(timm: Any, model: nn.Module) -> dict[str, Any]:
    """timm's data config of `model`, as plain JSON values."""
    config = timm.data.resolve_model_data_config(model)
    plain = {key: config[key] for key in DATA_CONFIG_KEYS if key in config}
    for key in ("input_size", "mean", "std"):
        if key in plain:
            plain[key] = [float(v) if key != "input_size" else int(v) for v in plain[key]]
    return plain


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


def load_weights(target: nn.Module, state: dict[str, Tensor], key: str, name: str, channels: int) -> int:
    """Load the backbone tensors of `state` (a file's, `key` names it) into `target`, strictly;
    returns how many tensors were loaded.

    Keys may carry the prefix of a larger model around the backbone (a Backbone's `backbone.`, a
    KilnModule checkpoint's `net.backbone.`): the prefix under which most keys fit is taken, and the
    rest of that larger model (its head) is ignored."""
    expected = target.state_dict()
    prefix = _common_prefix(state, expected)
    if prefix is None:
        first = next(iter(state), "")
        raise KilnError(
            f"{key}: none of its {len(state)} tensors fits {name} (first in the file: {first}); {OTHER_ARCHITECTURE}"
        )
    found, unexpected = _backbone_tensors(state, prefix, expected)
    stem = next((k for k, v in expected.items() if v.dim() == 4), None)  # the first conv sees the channels
    for tensor_key, tensor in expected.items():
        if tensor_key not in found:
            if tensor_key.endswith("num_batches_tracked"):
                continue  # a counter, not a weight
            raise KilnError(
                f"{key}: tensor {tensor_key} {_shape(tensor)} of {name} is not in the file "
                f"(it has {len(found)} of {name}'s tensors under '{prefix}'); {OTHER_ARCHITECTURE}"
            )
        theirs = found[tensor_key]
        if theirs.shape != tensor.shape:
            why = _why_shapes_differ(tensor_key, theirs, tensor, tensor_key == stem, channels)
            raise KilnError(
                f"{key}: tensor {tensor_key} has shape {_shape(theirs)} in the file but {_shape(tensor)} in {name}; {why}"
            )
    if unexpected:
        raise KilnError(
            f"{key}: tensor {unexpected[0]} {_shape(state[prefix + unexpected[0]])} in the file has no place "
            f"in {name}; {OTHER_ARCHITECTURE}"
        )
    target.load_state_dict({**expected, **found})
    return len(found)


OTHER_ARCHITECTURE = "these weights are for another architecture: set model.net.name to theirs"


def _backbone_tensors(
    state: dict[str, Tensor], prefix: str, expected: dict[str, Tensor]
) -> tuple[dict[str, Tensor], list[str]]:
    """(the file's tensors under `prefix` that the backbone has, by the backbone's names; those
    under `prefix` it has no place for). A classification head's tensors are neither: a new head
    is made for the data."""
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
    return found, unexpected


def _why_shapes_differ(tensor_key: str, theirs: Tensor, ours: Tensor, is_stem: bool, channels: int) -> str:
    """Why a tensor of the file has another shape than the backbone's, and the fix: other image
    channels (the stem differs only in its input channels), another image or patch size (a ViT's
    position embedding), or else another architecture."""
    drop_channels = (0, *range(2, theirs.dim()))  # every dimension but the input channels
    only_channels = theirs.dim() == 4 and all(theirs.shape[d] == ours.shape[d] for d in drop_channels)
    if is_stem and only_channels:
        return (
            f"these weights are for {theirs.shape[1]}-channel images and the data has {channels}: "
            "convert the images, or train without model.net.weights"
        )
    if "position" in tensor_key or "pos_embed" in tensor_key:
        return (
            "these weights are for another image size or patch size: resize the images or set "
            "model.net.patch_size to theirs"
        )
    return OTHER_ARCHITECTURE


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


def _read_weights(path: Path, key: str, timm_name: str) -> dict[str, Tensor]:
    if not path.exists():
        raise KilnError(f"{key}: no such file or directory; {GIVE_INSTEAD}")
    if path.is_dir():
        _check_config(path, key, timm_name)
        files = _weight_files(path)
        if not files:
            raise KilnError(
                f"{key}: the directory has no model.safetensors or pytorch_model.bin (what timm "
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


def _check_config(directory: Path, key: str, timm_name: str) -> None:
    """A directory timm wrote says what it holds (config.json's `architecture`): refuse another."""
    path = directory / "config.json"
    if not path.exists():
        return
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # the tensors will tell
    theirs = config.get("architecture") if isinstance(config, dict) else None
    if isinstance(theirs, str) and theirs != timm_name:
        raise KilnError(
            f"{key}: its config.json is for timm's {theirs}, not {timm_name}; set model.net.name={theirs}"
        )
