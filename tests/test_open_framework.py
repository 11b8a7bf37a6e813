"""kiln on a user's own Lightning code: a plain LightningModule and LightningDataModule (no kiln
import, no kiln attribute; tests/userproject.py writes them) through the real CLI.

The user runs kiln from their project directory, without PYTHONPATH:

    cd my_project && python -m kiln train --config-dir my_configs model=my_lit data=my_images

and gets a trained, tested, compressed and exported model whose variants were scored by their own
validation_step and test_step; `kiln predict` on the shipped model.onnx reproduces the recorded
test accuracy; under DDP each rank trains on its own half; and code kiln cannot take (a forward
the ONNX exporter cannot translate, no test loader, a monitored key never logged) is one line on
stderr with exit code 2.
"""

from __future__ import annotations

import csv
import importlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kilntest import kiln_command, read_run, run_dirs
from userproject import write_user_project

EPOCHS = 12  # enough for the small CNN to separate the 3 shapes (val accuracy 1.0 with plain Lightning)
COMMON = ["progress=lines", "export.latency_repeats=3"]
ERROR_PREFIX = "kiln train: error: "


# -- running kiln as the user does -----------------------------------------------------------------


def user_kiln(project: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`python -m kiln <args>` in the project directory, with no PYTHONPATH: userpkg is found only
    because it sits in the current directory."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    return subprocess.run(
        kiln_command(*args), cwd=project, env=env, capture_output=True, text=True, timeout=timeout
    )


def train(
    project: Path,
    output: Path,
    *overrides: str,
    model: str = "my_lit",
    data: str = "my_images",
    monitor: tuple[str, str] = ("val/loss", "min"),
) -> subprocess.CompletedProcess[str]:
    """`kiln train` on the project's own configs (my_configs/model, my_configs/data)."""
    return user_kiln(
        project,
        "train",
        "--config-dir",
        "my_configs",
        f"model={model}",
        f"data={data}",
        f"paths.output_dir={output}",
        f"monitor.metric={monitor[0]}",
        f"monitor.mode={monitor[1]}",
        *COMMON,
        *overrides,
    )


def describe(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout[-6000:]}\nstderr:\n{result.stderr[-6000:]}"


def user_package(project: Path) -> tuple[Any, Any]:
    """The project's userpkg.lit and userpkg.data, imported in this process."""
    for name in [m for m in sys.modules if m == "userpkg" or m.startswith("userpkg.")]:
        del sys.modules[name]  # another test's project
    sys.path.insert(0, str(project))
    try:
        return importlib.import_module("userpkg.lit"), importlib.import_module("userpkg.data")
    finally:
        sys.path.remove(str(project))


def user_datamodule(project: Path, run_dir: Path) -> Any:
    """The user's ImageFolderDataModule in this process, with the arguments the run gave it (as its
    best checkpoint saved them): the same splits, in the same order, without worker processes."""
    checkpoint = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    _, data = user_package(project)
    datamodule = data.ImageFolderDataModule(**{**checkpoint["datamodule_hyper_parameters"], "num_workers": 0})
    datamodule.setup("fit")
    return datamodule


# -- the one trained project run, shared ---------------------------------------------------------


@dataclass
class ProjectRun:
    project: Path
    result: subprocess.CompletedProcess[str]
    run_dir: Path
    record: dict[str, Any]


@pytest.fixture(scope="module")
def project_run(tmp_path_factory: pytest.TempPathFactory) -> ProjectRun:
    base = tmp_path_factory.mktemp("open-framework")
    project = write_user_project(base / "project")
    result = train(
        project,
        base / "runs",
        f"trainer.max_epochs={EPOCHS}",
        "compress.prune_structured.finetune_epochs=2",
    )
    assert result.returncode == 0, describe(result)
    (run_dir,) = run_dirs(base / "runs")
    return ProjectRun(project, result, run_dir, read_run(run_dir))


def read_report(run_dir: Path) -> dict[str, Any]:
    import json

    report: dict[str, Any] = json.loads((run_dir / "report.json").read_text())
    return report


# -- tests -----------------------------------------------------------------------------------------


def test_user_project_is_plain_lightning(tmp_path):
    """The helper's package is what a Lightning user writes: not a word of kiln in it."""
    project = write_user_project(tmp_path / "project", images_per_class=2)
    sources = {p.name: p.read_text() for p in (project / "userpkg").glob("*.py")}
    assert set(sources) == {"__init__.py", "lit.py", "data.py"}
    assert not [name for name, text in sources.items() if "kiln" in text.lower()]
    assert sorted(p.name for p in (project / "images").iterdir()) == ["circle", "square", "stripes"]
    assert len(list((project / "images").rglob("*.png"))) == 6


@pytest.mark.slow
def test_plain_lightning_code_trains_compresses_and_ships(project_run):
    record = project_run.record
    assert record["status"] == "completed"
    assert record["test_metrics"]["test/acc"] > 0.8, record["test_metrics"]
    assert (project_run.run_dir / "model.onnx").is_file()

    report = read_report(project_run.run_dir)
    variants = report["variants"]
    steps = [v["steps"] for v in variants]
    assert any("quantize_static" in s for s in steps), steps
    assert any("prune_structured" in s for s in steps), steps
    for variant in variants:  # each scored by the user's own validation_step
        assert "val/acc" in variant["val_metrics"], (variant["name"], variant["val_metrics"])
    assert report["shipped"] is not None
    assert report["shipped"] in [v["name"] for v in variants]


@pytest.mark.slow
def test_predict_reproduces_test_accuracy(project_run, tmp_path):
    datamodule = user_datamodule(project_run.project, project_run.run_dir)
    xs, ys = [], []
    for x, y, _ in datamodule.test_dataloader():
        xs.append(x)
        ys.append(y)
    images = torch.cat(xs).numpy().astype(np.float32)
    truth = [datamodule.classes[i] for i in torch.cat(ys).tolist()]
    np.save(tmp_path / "test.npy", images)

    result = user_kiln(
        project_run.project,
        "predict",
        f"model={project_run.run_dir / 'model.onnx'}",
        f"input={tmp_path / 'test.npy'}",
        f"output={tmp_path / 'preds.csv'}",
    )
    assert result.returncode == 0, describe(result)
    with (tmp_path / "preds.csv").open() as stream:
        predictions = [row["prediction"] for row in csv.DictReader(stream)]
    assert len(predictions) == len(truth)
    assert set(predictions) <= set(datamodule.classes)  # class names, not indices
    accuracy = float(np.mean([p == t for p, t in zip(predictions, truth, strict=True)]))

    # model.onnx is the shipped variant: its test accuracy as the user's test_step measured it on
    # the graph, which for the uncompressed one is the accuracy recorded in run.json
    report = read_report(project_run.run_dir)
    shipped = next(v for v in report["variants"] if v["name"] == report["shipped"])
    assert abs(accuracy - shipped["test_metrics"]["test/acc"]) <= 0.005, (accuracy, shipped)
    if not shipped["steps"]:  # the fp32 graph: the answers of the user's own module, image by image
        assert abs(accuracy - project_run.record["test_metrics"]["test/acc"]) <= 0.005
        lit, _ = user_package(project_run.project)
        module = lit.LitClassifier.load_from_checkpoint(
            project_run.run_dir / "checkpoints" / "best.ckpt", map_location="cpu"
        ).eval()
        with torch.no_grad():
            answers = module(torch.from_numpy(images)).argmax(dim=1).tolist()
        assert predictions == [datamodule.classes[i] for i in answers]


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_ranks_see_disjoint_halves(tmp_path):
    project = write_user_project(tmp_path / "project")
    record_dir = tmp_path / "seen"
    record_dir.mkdir()
    result = train(
        project,
        tmp_path / "runs",
        "trainer=ddp_cpu",
        "trainer.max_epochs=1",
        "compress=none",
        "export.after_training=false",
        f"model.record_dir={record_dir}",
    )
    assert result.returncode == 0, describe(result)
    (run_dir,) = run_dirs(tmp_path / "runs")
    assert read_run(run_dir)["status"] == "completed"

    seen = [[int(line) for line in (record_dir / f"rank{rank}.txt").read_text().split()] for rank in (0, 1)]
    assert sorted(p.name for p in record_dir.iterdir()) == ["rank0.txt", "rank1.txt"]
    rank0, rank1 = (set(s) for s in seen)
    assert rank0 and rank1
    assert not rank0 & rank1
    training = {index for _, _, index in user_datamodule(project, run_dir).train_set.samples}
    assert rank0 | rank1 == training
    assert abs(len(rank0) - len(rank1)) <= 1


# -- code kiln cannot take: one line, exit code 2 --------------------------------------------------


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one `kiln train: error:` line, checked to be the last line of stderr, with no traceback."""
    assert result.returncode == 2, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, describe(result)
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    return errors[0]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return write_user_project(tmp_path / "project", images_per_class=20)


@pytest.mark.slow
def test_unexportable_forward_is_one_line_after_a_completed_training(project, tmp_path):
    result = train(project, tmp_path / "runs", "trainer.max_epochs=1", "compress=none", model="unexportable")
    line = error_line(result)
    assert "ONNX" in line, line
    (run_dir,) = run_dirs(tmp_path / "runs")
    record = read_run(run_dir)
    assert record["status"] == "completed"  # training and testing finished; only the export failed
    assert "test/acc" in record["test_metrics"]
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert not (run_dir / "model.onnx").exists()


def train_in_process(project: Path, run_dir: Path, *overrides: str, model: str, data: str) -> Any:
    """The work of `kiln train --config-dir my_configs ...` in this process (kiln.config.compose and
    the stage's `call`): no subprocess, no torch import to wait for. Mistakes raise KilnError."""
    from kiln.config import compose
    from kiln.stages import train as train_stage

    for name in [m for m in sys.modules if m == "userpkg" or m.startswith("userpkg.")]:
        del sys.modules[name]  # another test's project
    sys.path.insert(0, str(project))
    try:
        cfg = compose(
            "train",
            [
                f"model={model}",
                f"data={data}",
                "data.num_workers=0",
                f"run_dir={run_dir}",
                *COMMON,
                *overrides,
            ],
            extra_config_dir=str(project / "my_configs"),
        )
        return train_stage.main.call(cfg)
    finally:
        sys.path.remove(str(project))


def test_datamodule_without_test_loader_is_refused_before_training(project, tmp_path):
    from kiln.errors import KilnError

    run_dir = tmp_path / "run"
    with pytest.raises(KilnError, match=r"^data: NoTestDataModule has no test_dataloader") as raised:
        train_in_process(project, run_dir, "trainer.max_epochs=1", model="my_lit", data="no_test")
    assert "\n" not in str(raised.value)
    assert not list(run_dir.glob("checkpoints/*.ckpt"))  # refused before any epoch was trained
    assert read_run(run_dir)["status"] == "failed"


def test_monitored_key_never_logged_is_one_line_naming_what_is_logged(project, tmp_path):
    from kiln.errors import KilnError

    run_dir = tmp_path / "run"
    with pytest.raises(KilnError) as raised:
        train_in_process(
            project,
            run_dir,
            "trainer.max_epochs=2",
            "monitor.metric=val/f1",
            "monitor.mode=max",
            "compress=none",
            "export.after_training=false",
            model="my_lit",
            data="my_images",
        )
    line = str(raised.value)
    assert line.startswith("monitor.metric=val/f1 is not logged") and "val/acc" in line and "\n" not in line
    assert read_run(run_dir)["status"] == "failed"


@pytest.mark.slow
def test_the_trained_user_module_comes_back_from_python(project_run):
    """kiln.api.load_module: the user's own LitClassifier with the best weights, rebuilt from the
    run's saved config; its predictions equal those of the shipped fp32 graph's test score."""
    from kiln import api

    sys.path.insert(0, str(project_run.project))
    try:
        module = api.load_module(project_run.run_dir)
    finally:
        sys.path.remove(str(project_run.project))
    assert type(module).__name__ == "LitClassifier" and not module.training
    checkpoint = torch.load(
        project_run.run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True
    )
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(tensor, checkpoint["state_dict"][name])
    datamodule = user_datamodule(project_run.project, project_run.run_dir)
    right = total = 0
    with torch.no_grad():
        for x, y, _ in datamodule.test_dataloader():
            right += int((module(x).argmax(dim=1) == y).sum())
            total += len(y)
    assert right / total == pytest.approx(project_run.record["test_metrics"]["test/acc"], abs=1e-6)
