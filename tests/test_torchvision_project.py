"""A user's torchvision code end to end (issue 23 item 4): a DataModule on
`torchvision.datasets.ImageFolder` with a `transforms.v2` eval transform, a LightningModule around a
timm ResNet, no kiln attribute (tests/torchvisionproject.py writes them).

    kiln train --config-dir my_configs model=tv_resnet data=tv_folders
      -> model.onnx takes uint8 images of any size: kiln read the eval transform (Resize,
         CenterCrop, ToImage, ToDtype, Normalize) and put it inside the graph
      -> kiln predict input=images/test/ reproduces the module's own accuracy on those files

An eval transform kiln cannot repeat in the graph (a Lambda) is named in one warning line; the
export goes on with the transformed tensor as the model's input, and `kiln predict` on image files
says, in one line, which tensor the model takes; given that tensor as .npy, it answers.

Training and predicting run in this process (kiln.config.compose, the stages' `call` and `main`).
"""

from __future__ import annotations

import csv
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from kilntest import copy_run, read_run
from torchvisionproject import write_torchvision_project

EPOCHS = 4  # the narrowed resnet10t reaches a test accuracy of about 0.8 on the three digits
COMMON = [
    "progress=lines",
    "export.latency_repeats=3",
    "compress=none",
    "monitor.metric=val/acc",
    "monitor.mode=max",
]


def forget_project_modules() -> None:
    for name in [m for m in sys.modules if m == "tvpkg" or m.startswith("tvpkg.")]:
        del sys.modules[name]  # another test's project


def train_in_process(project: Path, run_dir: Path, *overrides: str, data: str) -> Any:
    """The work of `kiln train --config-dir my_configs model=tv_resnet data=<data>` in this process,
    on one torch thread: on a busy 2-core machine a thread per core makes every small step wait
    for whichever thread is not running (tests/kilntest.py, ONE_THREAD)."""
    from kiln.config import compose
    from kiln.stages import train as train_stage

    forget_project_modules()
    sys.path.insert(0, str(project))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = compose(
            "train",
            ["model=tv_resnet", f"data={data}", f"run_dir={run_dir}", *COMMON, *overrides],
            extra_config_dir=str(project / "my_configs"),
        )
        return train_stage.main.call(cfg)
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(project))


def user_modules(project: Path) -> tuple[Any, Any]:
    """The project's tvpkg.lit and tvpkg.data, imported in this process."""
    forget_project_modules()
    sys.path.insert(0, str(project))
    try:
        return importlib.import_module("tvpkg.lit"), importlib.import_module("tvpkg.data")
    finally:
        sys.path.remove(str(project))


def torch_answers(
    project: Path, run_dir: Path, data_class: str
) -> tuple[list[str], list[int], list[int], Any]:
    """(file names relative to images/test, the true classes, the trained module's answers, the
    transformed test tensors), all through the user's own eval transform in torch."""
    from torchvision import datasets

    lit, data = user_modules(project)
    module = lit.LitTimmClassifier.load_from_checkpoint(
        run_dir / "checkpoints" / "best.ckpt", map_location="cpu"
    )
    datamodule = getattr(data, data_class)(str(project / "images"))
    test = datasets.ImageFolder(str(project / "images" / "test"), transform=datamodule.eval_transform)
    x = torch.stack([test[i][0] for i in range(len(test))])
    with torch.no_grad():
        answers = module.eval()(x).argmax(dim=1).tolist()
    files = [str(Path(path).relative_to(project / "images" / "test")) for path, _ in test.samples]
    return files, [label for _, label in test.samples], answers, x


def predict(*args: str) -> int:
    """`kiln predict <args>` in this process: its exit code (its lines go to stdout and stderr)."""
    from kiln.stages import predict as predict_stage

    return predict_stage.main(list(args))


def read_predictions(path: Path) -> list[dict[str, str]]:
    with path.open() as stream:
        return list(csv.DictReader(stream))


def graph_input(path: Path) -> tuple[int, list[Any]]:
    (spec,) = onnx.load(str(path)).graph.input
    dims = [d.dim_param or d.dim_value for d in spec.type.tensor_type.shape.dim]
    return spec.type.tensor_type.elem_type, dims


@dataclass
class Trained:
    project: Path
    run_dir: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    base = tmp_path_factory.mktemp("torchvision-project")
    project = write_torchvision_project(base / "project")
    run_dir = base / "run"
    train_in_process(project, run_dir, f"trainer.max_epochs={EPOCHS}", data="tv_folders")
    return Trained(project, run_dir)


@pytest.mark.slow
def test_the_eval_transform_goes_into_the_graph_and_predict_reproduces_the_modules_accuracy(
    trained, tmp_path
):
    from PIL import Image

    run_dir, images = trained.run_dir, trained.project / "images" / "test"
    sizes = {Image.open(p).size for p in images.rglob("*.png")}
    assert len(sizes) > 100  # the files come in many sizes, none of them the net's 32x32

    # the graph takes uint8 images of any size, with torchvision's Resize and CenterCrop inside
    assert graph_input(run_dir / "model.onnx") == (onnx.TensorProto.UINT8, ["batch", "height", "width", 3])
    meta = {p.key: p.value for p in onnx.load(str(run_dir / "model.onnx")).metadata_props}
    image_input = json.loads(meta["kiln.image_input"])
    assert (image_input["resize"], image_input["crop"]) == ({"shorter": 36}, [32, 32])
    report = json.loads((run_dir / "report.json").read_text())
    (fp32,) = [v for v in report["variants"] if v["name"] == "fp32"]
    assert fp32["passed"] and fp32["parity_max_abs"] < 1e-3, fp32["check"]

    files, truth, answers, _ = torch_answers(trained.project, run_dir, "FolderDataModule")
    torch_accuracy = float(np.mean(np.equal(answers, truth)))
    assert torch_accuracy == pytest.approx(read_run(run_dir)["test_metrics"]["test/acc"], abs=1e-6)
    assert torch_accuracy > 0.6  # a model that learned something: its answers are not one class

    output = tmp_path / "predictions.csv"
    assert predict(f"model={run_dir / 'model.onnx'}", f"input={images}", f"output={output}") == 0
    rows = read_predictions(output)
    classes = sorted(p.name for p in images.iterdir())
    by_file = {row["file"]: row["prediction"] for row in rows}
    assert sorted(by_file) == sorted(files)
    predicted = [classes.index(by_file[name]) for name in files]
    predict_accuracy = float(np.mean(np.equal(predicted, truth)))
    assert abs(predict_accuracy - torch_accuracy) <= 0.005, (predict_accuracy, torch_accuracy)
    assert np.mean(np.equal(predicted, answers)) >= 0.99  # file by file, the module's answers


@pytest.mark.slow
def test_predict_on_the_baselines_own_images_reports_no_drift(trained, tmp_path):
    """The drift baseline holds the validation images as the eval transform made them (resized,
    centre-cropped) and as the net embedded them; `kiln predict` on those very files, taken as
    the graph takes them, must find them where the baseline put them."""
    output = tmp_path / "predictions.csv"
    model, images = trained.run_dir / "model.onnx", trained.project / "images" / "val"
    assert predict(f"model={model}", f"input={images}", f"output={output}", "drift_threshold=0.2") == 0
    drift = json.loads(output.with_suffix(".drift.json").read_text())
    psi = drift["psi"]
    assert {"red_mean", "sharpness", "embedding_distance"} <= set(psi), sorted(psi)
    # colour and sharpness: the same pixels as the baseline's; the embeddings: within the grey
    # level by which onnxruntime's resize may differ from Pillow's (0.03 measured)
    assert max(v for k, v in psi.items() if not k.startswith("embedding")) < 0.01, psi
    assert max(v for k, v in psi.items() if k.startswith("embedding")) < 0.1, psi


@pytest.mark.slow
def test_kiln_export_of_the_saved_run_reads_the_eval_transform_again(trained, tmp_path, capfd):
    """`kiln export run=<dir>` rebuilds the user's datamodule from the run's saved config (not set
    up yet) and puts the same preprocessing into the graph, without a warning."""
    from kiln.config import compose
    from kiln.stages import export as export_stage

    run_dir = copy_run(trained.run_dir, tmp_path)
    forget_project_modules()
    sys.path.insert(0, str(trained.project))
    try:
        export_stage.main.call(compose("export", [f"run={run_dir}", "export.latency_repeats=3"]))
    finally:
        sys.path.remove(str(trained.project))
    assert "warning" not in capfd.readouterr().err
    assert graph_input(run_dir / "model.onnx") == (onnx.TensorProto.UINT8, ["batch", "height", "width", 3])
    meta = {p.key: p.value for p in onnx.load(str(run_dir / "model.onnx")).metadata_props}
    assert json.loads(meta["kiln.image_input"])["resize"] == {"shorter": 36}


@pytest.mark.slow
def test_an_eval_transform_kiln_cannot_repeat_is_named_and_the_model_takes_tensors(tmp_path, capfd):
    project = write_torchvision_project(tmp_path / "project", {"train": 8, "val": 4, "test": 6})
    run_dir = tmp_path / "run"
    train_in_process(project, run_dir, "trainer.max_epochs=1", data="tv_folders_lambda")
    warnings = [line for line in capfd.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("kiln export: warning: the eval transform's Lambda(")
    assert "clamp_outliers" in warnings[0] and "image_input" in warnings[0]

    model = run_dir / "model.onnx"
    assert read_run(run_dir)["status"] == "completed"
    assert graph_input(model) == (onnx.TensorProto.FLOAT, ["batch", 3, 32, 32])

    images = project / "images" / "test"
    output = tmp_path / "predictions.csv"
    for source in (images, images / "one" / "000.png"):
        assert predict(f"model={model}", f"input={source}", f"output={output}") == 2
        (line,) = capfd.readouterr().err.strip().splitlines()
        assert line == (
            f"kiln predict: error: input={source}: image files, but this model takes float tensors "
            "shaped (batch, 3, 32, 32), as the datamodule's eval transform makes them (its graph "
            "holds no image preprocessing); save them as a .npy array and give input=<file>.npy"
        )
        assert not output.exists()

    # what the line asks for: the transformed tensors as .npy
    _, _, answers, x = torch_answers(project, run_dir, "LambdaFolderDataModule")
    np.save(tmp_path / "test.npy", x.numpy())
    assert predict(f"model={model}", f"input={tmp_path / 'test.npy'}", f"output={output}") == 0
    classes = sorted(p.name for p in images.iterdir())
    assert [row["prediction"] for row in read_predictions(output)] == [classes[a] for a in answers]
