"""`kiln.models.backbones`: any timm model builds for small and grayscale images, with timm's data
config; weights load strictly from files and directories (the wrong ones name the first tensor that
does not fit) and a line says what was loaded; resnet18 exports to ONNX with parity and survives
structured pruning. Offline: timm builds the nets from their names, nothing downloads."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kiln.compression.pruning import count_parameters, prune_structured
from kiln.data.images import IMAGENET_MEAN, IMAGENET_STD
from kiln.errors import InvalidArgument, KilnError
from kiln.export.onnx_export import export_net
from kiln.models import backbones
from kiln.models.backbones import Backbone, backbone

SHAPE = (3, 32, 32)
NAMES = ["resnet18", "resnet50", "convnext_atto", "vit_tiny", "mobilenetv3_small_050"]


def images(rows: int = 2, shape: tuple[int, ...] = SHAPE, seed: int = 0) -> torch.Tensor:
    return torch.rand(rows, *shape, generator=torch.Generator().manual_seed(seed))


def features(net: Backbone, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.eval().backbone(x)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Batches of two 32x32 images gain nothing from threads, and lose much when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def built(name: str) -> Backbone:
    """One net per architecture for the whole module (building them all takes seconds); tests that
    change a net build their own."""
    torch.manual_seed(0)
    return backbone(SHAPE, 7, name=name).eval()


@pytest.fixture
def resnet18() -> Backbone:
    return built("resnet18")


def weights_error(**config: Any) -> str:
    with pytest.raises(KilnError) as info:
        backbone(SHAPE, 3, **config)
    message = str(info.value)
    assert "\n" not in message
    return message


# published sizes less the 1000-class head: resnet18 11.69M, resnet50 25.56M
PUBLISHED = {"resnet18": 11_176_512, "resnet50": 23_508_032}


@pytest.mark.parametrize("name", NAMES)
def test_timm_models_map_images_to_logits(name: str):
    net = built(name)
    x = images()
    with torch.no_grad():
        pooled = net.backbone(x)
        out = net(x)
    assert type(pooled) is torch.Tensor and pooled.shape == (2, net.feature_size)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert net.head[-1].in_features == net.feature_size and net.head[-1].out_features == 7
    assert (net.name, net.library) == (name, "timm")
    if name in PUBLISHED:
        assert count_parameters(net.backbone) == PUBLISHED[name]


def test_the_net_carries_timms_data_config():
    resnet = built("resnet18").data_config
    assert resnet["mean"] == pytest.approx(IMAGENET_MEAN) and resnet["std"] == pytest.approx(IMAGENET_STD)
    assert (resnet["input_size"], resnet["interpolation"]) == ([3, 224, 224], "bicubic")  # timm's a1_in1k
    vit = built("vit_tiny").data_config  # timm's ViTs are normalized to [-1, 1]
    assert (vit["mean"], vit["std"], vit["interpolation"]) == ([0.5] * 3, [0.5] * 3, "bicubic")
    json.dumps(resnet)  # plain values: they go into run records and ONNX metadata


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "vit_tiny"])
def test_grayscale_images_work(name: str):
    net = backbone((1, 32, 32), 3, name=name).eval()
    stem = next(m for m in net.backbone.modules() if isinstance(m, nn.Conv2d))
    assert stem.in_channels == 1
    with torch.no_grad():
        assert net(images(shape=(1, 32, 32))).shape == (2, 3)


def test_vit_picks_a_patch_that_tiles_the_image_and_takes_the_cls_token():
    net = backbone((1, 28, 28), 10, name="vit_tiny").eval()  # digits: 16 does not divide 28, 14 does
    patch = next(m for m in net.backbone.modules() if isinstance(m, nn.Conv2d))
    assert patch.kernel_size == (14, 14)
    wide = backbone((3, 32, 16), 4, name="vit_tiny", patch_size=8).eval()
    x = images(shape=(3, 32, 16))
    with torch.no_grad():
        hidden = wide.backbone.forward_features(x)
        assert hidden.shape == (2, 1 + 4 * 2, 192)  # CLS + a 4x2 grid of patches
        assert torch.equal(wide.backbone(x), hidden[:, 0])
    with pytest.raises(InvalidArgument, match=r"patch_size: must divide the image size 32x32, got 5"):
        backbone(SHAPE, 2, name="vit_tiny", patch_size=5)
    with pytest.raises(InvalidArgument, match="only ViT backbones take a patch size"):
        backbone(SHAPE, 2, name="resnet18", patch_size=8)


def test_dropout_goes_before_the_head_and_bad_values_are_refused():
    net = backbone(SHAPE, 2, name="convnext_atto", dropout=0.3)
    assert isinstance(net.head[0], nn.Dropout) and net.head[0].p == 0.3
    assert isinstance(net.head[1], nn.Linear)
    with pytest.raises(InvalidArgument, match=r"dropout: must be in \[0, 1\), got 1.5"):
        backbone(SHAPE, 2, dropout=1.5)


@pytest.mark.slow
def test_an_unknown_name_lists_near_timm_matches():
    with pytest.raises(KilnError) as info:
        backbone(SHAPE, 2, name="resnt18")
    message = str(info.value)
    assert message.startswith("model.net.name=resnt18: not a timm model; did you mean resnet18")
    assert message.endswith("""python -c 'import timm; print(timm.list_models("res*"))' lists them""")
    # the command the line prints, run as printed (the venv's python first on PATH)
    command = message[message.index("python -c") :].removesuffix(" lists them")
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    listed = subprocess.run(command, shell=True, env=environment, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "'resnet18'" in listed.stdout and "'resnet50'" in listed.stdout
    with pytest.raises(KilnError, match=r"did you mean efficientnet_b0"):
        backbone(SHAPE, 2, name="efficientnet-b0")


def test_convnext_refuses_images_it_would_shrink_to_nothing():
    with pytest.raises(KilnError, match=r"at least 32x32 pixels .* the data has 16x16"):
        backbone((3, 16, 16), 2, name="convnext_atto")


def test_timm_missing_is_one_line_with_the_install_command(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(
        backbones, "_import_error", lambda library: "ModuleNotFoundError: No module named 'timm'"
    )
    with pytest.raises(KilnError) as info:
        backbone(SHAPE, 2)
    assert str(info.value) == (
        "model=backbone needs timm, and timm does not import here (ModuleNotFoundError: No module named "
        "'timm'); pip install timm torchvision (scripts/setup.sh installs both)"
    )


def test_a_line_says_which_weights_were_loaded_or_that_the_net_starts_from_scratch(
    resnet18: Backbone, tmp_path: Path, capfd: pytest.CaptureFixture[str]
):
    capfd.readouterr()
    backbone(SHAPE, 3, name="resnet18")
    assert capfd.readouterr().err == (
        "kiln: model.net: timm resnet18 starts from scratch (random weights; model.net.weights=FILE loads some)\n"
    )
    torch.save(resnet18.state_dict(), tmp_path / "own.pt")
    backbone(SHAPE, 3, name="resnet18", weights=str(tmp_path / "own.pt"))
    tensors = len(resnet18.backbone.state_dict())  # its head's two tensors are not the backbone's
    assert tensors == len(resnet18.state_dict()) - 2
    assert capfd.readouterr().err == (
        f"kiln: model.net: timm resnet18 with weights from {tmp_path / 'own.pt'} ({tensors} tensors)\n"
    )


def test_weights_round_trip_through_pt_safetensors_ckpt_and_a_timm_directory(
    resnet18: Backbone, tmp_path: Path
):
    x = images()
    expected = features(resnet18, x)
    inner = resnet18.backbone.state_dict()
    # a Backbone's own state dict, head included: the head stays new, sized to the data
    torch.save(resnet18.state_dict(), tmp_path / "own.pt")
    # timm's own resnet18 keys, with its 1000-class fc
    timm_keys = inner | {"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    save_file({k: v.contiguous() for k, v in timm_keys.items()}, tmp_path / "timm.safetensors")
    # a Lightning checkpoint of a KilnModule (net.backbone.*, net.head.*, other entries)
    checkpoint = {f"net.{k}": v for k, v in resnet18.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": checkpoint}, tmp_path / "run.ckpt")
    # a directory as timm's save_pretrained/push_to_hub writes it
    (tmp_path / "hub").mkdir()
    save_file({k: v.contiguous() for k, v in timm_keys.items()}, tmp_path / "hub" / "model.safetensors")
    (tmp_path / "hub" / "config.json").write_text(
        json.dumps({"architecture": "resnet18", "num_classes": 1000})
    )
    for weights in ("own.pt", "timm.safetensors", "run.ckpt", "hub"):
        torch.manual_seed(1)  # another initialization: only the file can make them equal
        loaded = backbone(SHAPE, 3, name="resnet18", weights=str(tmp_path / weights))
        assert torch.equal(features(loaded, x), expected), weights
        assert loaded.head[-1].out_features == 3
    assert not torch.equal(features(backbone(SHAPE, 3, name="resnet18"), x), expected)


def test_weights_of_another_architecture_name_the_first_tensor_that_does_not_fit(tmp_path: Path):
    torch.save(built("resnet50").state_dict(), tmp_path / "r50.pt")
    message = weights_error(name="resnet18", weights=str(tmp_path / "r50.pt"))
    assert message == (
        f"model.net.weights={tmp_path / 'r50.pt'}: tensor layer1.0.conv1.weight "
        "has shape (64, 64, 1, 1) in the file but (64, 64, 3, 3) in resnet18; these weights are for another "
        "architecture: set model.net.name to theirs"
    )
    torch.save(backbone(SHAPE, 3, name="resnet34").state_dict(), tmp_path / "r34.pt")
    message = weights_error(name="resnet18", weights=str(tmp_path / "r34.pt"))
    assert "tensor layer1.2.conv1.weight (64, 64, 3, 3) in the file has no place in resnet18" in message
    # RGB weights for grayscale data
    torch.save(built("convnext_atto").state_dict(), tmp_path / "rgb.pt")
    with pytest.raises(KilnError) as info:
        backbone((1, 32, 32), 2, name="convnext_atto", weights=str(tmp_path / "rgb.pt"))
    assert "tensor stem.0.weight has shape (40, 3, 4, 4) in the file but (40, 1, 4, 4)" in str(info.value)
    assert "these weights are for 3-channel images and the data has 1" in str(info.value)
    torch.save(built("vit_tiny").state_dict(), tmp_path / "vit16.pt")  # patches of 16 pixels
    message = weights_error(name="vit_tiny", patch_size=8, weights=str(tmp_path / "vit16.pt"))
    assert message.endswith(
        "tensor pos_embed has shape (1, 5, 192) in the file but (1, 17, 192) in vit_tiny; "
        "these weights are for another image size or patch size: resize the images or set "
        "model.net.patch_size to theirs"
    )


def test_a_timm_directory_of_another_architecture_says_so(tmp_path: Path):
    (tmp_path / "r34").mkdir()
    save_file(
        {k: v.contiguous() for k, v in backbone(SHAPE, 3, name="resnet34").backbone.state_dict().items()},
        tmp_path / "r34" / "model.safetensors",
    )
    (tmp_path / "r34" / "config.json").write_text(json.dumps({"architecture": "resnet34"}))
    message = weights_error(name="resnet18", weights=str(tmp_path / "r34"))
    assert message == (
        f"model.net.weights={tmp_path / 'r34'}: its config.json is for timm's resnet34, not resnet18; "
        "set model.net.name=resnet34"
    )


def test_files_that_are_not_state_dicts_are_one_line_naming_the_file(tmp_path: Path):
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled object: weights_only refuses it
    (tmp_path / "notes.pt").write_text("these are not weights\n")
    torch.save({"lr": 0.1, "epoch": 3}, tmp_path / "settings.pt")
    (tmp_path / "weights.txt").write_text("1 2 3\n")
    (tmp_path / "empty").mkdir()
    cases = {
        "module.pt": "pickles a torch.nn.modules.linear.Linear object, which torch.load(weights_only=True) refuses",
        "notes.pt": "a text file, not a state dict",
        "settings.pt": "not a state dict of tensors (its entry 'lr' is a float)",
        "weights.txt": "not a weights file (expected .safetensors, .pt, .pth, .bin, .ckpt)",
        "missing.pt": "no such file or directory",
        "empty": "the directory has no model.safetensors or pytorch_model.bin (what timm writes)",
    }
    for name, reason in cases.items():
        message = weights_error(weights=str(tmp_path / name))
        assert message.startswith(f"model.net.weights={tmp_path / name}: {reason}"), message
        assert "give a state dict saved with torch.save(net.state_dict())" in message


def test_resnet18_exports_to_onnx_with_parity(resnet18: Backbone):
    model = export_net(resnet18, images(), opset=20)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = images(rows=3, seed=1)  # another batch size than the traced one
    with torch.no_grad():
        expected = resnet18(x).numpy()
    (out,) = session.run(None, {"input": x.numpy()})
    assert out.shape == (3, 7)
    assert np.abs(out - expected).max() <= 1e-4


def test_structured_pruning_makes_resnet18_smaller_and_it_still_runs(resnet18: Backbone):
    pruned = prune_structured(resnet18, SHAPE, 0.5)
    assert count_parameters(pruned) < 0.35 * count_parameters(resnet18)  # half the channels: about a quarter
    assert isinstance(pruned, Backbone)
    assert (pruned.head[-1].in_features, pruned.head[-1].out_features) == (256, 7)  # the outputs stay
    with torch.no_grad():
        out = pruned.eval()(images())
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["convnext_atto", "vit_tiny"])
def test_structured_pruning_of_convnext_and_vit_runs_and_rebuilds_from_its_state_dict(name: str):
    """Depthwise convs and LayerNorms (ConvNeXt) rebuild at their pruned sizes; a ViT's attention
    projections keep their heads while its MLPs shrink."""
    from kiln.compression.pruning import fit_to_state_dict

    net = backbone(SHAPE, 7, name=name).eval()
    pruned = prune_structured(net, SHAPE, 0.5).eval()
    assert count_parameters(pruned) < 0.8 * count_parameters(net)
    with torch.no_grad():
        out = pruned(images())
        rebuilt = fit_to_state_dict(backbone(SHAPE, 7, name=name), pruned.state_dict()).eval()
        assert torch.equal(rebuilt(images()), out)
    assert out.shape == (len(images()), 7)


@pytest.mark.parametrize(
    ("overrides", "mean", "said"),
    [([], [0.5] * 3, True), (["data.mean=[0.1,0.2,0.3]", "data.std=[1,1,1]"], [0.1, 0.2, 0.3], False)],
)
def test_the_image_data_takes_the_timm_normalization_unless_the_data_config_sets_one(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], overrides: list[str], mean: list[float], said: bool
):
    from kiln import contract
    from kiln.builder import build, build_module
    from kiln.config import compose
    from test_images_e2e import colour_folder

    folder = colour_folder(tmp_path / "photos", per_class=8)
    cfg = compose(
        "train",
        [
            "data=image_folder",
            f"data.path={folder}",
            "data.image_size=32",
            "model=backbone",
            "model.net.name=vit_tiny",
            *overrides,
        ],
    )
    datamodule = build("data", cfg.data, seed=0)
    datamodule.setup("fit")
    capfd.readouterr()
    build_module(cfg, datamodule)
    image = contract.image_input(datamodule)  # what the exported graph repeats
    assert image is not None and image["mean"] == pytest.approx(mean)
    line = "kiln: data: from vit_tiny's timm data config: mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]"
    assert (line in capfd.readouterr().err) is said
