"""Models of several inputs (issue 23, item 5): a forward taking several tensors, or one dict,
exported with named inputs and dynamic axes, compressed where that applies, scored by the user's
own validation_step, and served by `kiln predict` from an .npz or a Parquet file of named arrays.

The user project (tests/multi_input_project.py) is a small transformer text classifier over
token ids and an attention mask, with its own DataModule of dict batches.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from kiln.errors import KilnError
from multi_input_project import CLASSES, token_rows, write_text_project


def import_project(root: Path) -> None:
    for name in [m for m in sys.modules if m == "textpkg" or m.startswith("textpkg.")]:
        del sys.modules[name]  # another test's project
    sys.path.insert(0, str(root))


def graph_inputs(path_or_model: Any) -> dict[str, tuple[str, list[Any]]]:
    """{input name: (element type, [dims: size or axis name])} of an ONNX model."""
    import onnx

    model = onnx.load(str(path_or_model)) if isinstance(path_or_model, Path) else path_or_model
    initializers = {t.name for t in model.graph.initializer}
    return {
        i.name: (
            onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type),
            [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim],
        )
        for i in model.graph.input
        if i.name not in initializers
    }


# -- export: named inputs, dynamic batch and sequence ------------------------------------------------


class TwoTensors(nn.Module):
    """forward(input_ids, attention_mask): a masked mean of token embeddings, then a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        return self.head((self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0))


class OneDict(nn.Module):
    """forward(batch): an image's features and tabular features, in one dict."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(12, 4)
        self.table = nn.Linear(3, 4)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.image(batch["pixels"].flatten(1)) + self.table(batch["features"])


class DictBatches:
    """A datamodule whose validation batches are dicts holding the inputs and the labels."""

    def val_dataloader(self) -> list[dict[str, torch.Tensor]]:
        ids = torch.randint(1, 16, (4, 10))
        return [
            {
                "labels": torch.zeros(4, dtype=torch.long),
                "attention_mask": torch.ones(4, 10),
                "input_ids": ids,
            }
        ]


def ort_answer(model: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    from kiln.export.checks import open_session

    session = open_session("graph", model=model.SerializeToString())
    return np.asarray(session.run(None, feeds)[0])


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_a_forward_of_two_tensors_exports_named_inputs_with_dynamic_batch_and_sequence(exporter):
    """The example comes from a dict batch by forward's argument names (labels left out); the
    graph takes input_ids and attention_mask by name, any batch and any sequence length."""
    from kiln.export.onnx_export import example_input, export_graph

    torch.manual_seed(0)
    net = TwoTensors().eval()
    datamodule = DictBatches()
    datamodule_mask = datamodule.val_dataloader()[0]["attention_mask"]
    assert datamodule_mask.dtype == torch.float32  # a float mask: only its batch axis is dynamic
    example = example_input(net, datamodule)
    assert example.names == ["input_ids", "attention_mask"]
    assert example.axes == {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch"}}

    net.example_input_array = {
        "attention_mask": torch.ones(2, 10, dtype=torch.long),
        "input_ids": torch.ones(2, 10, dtype=torch.long),
    }
    example = example_input(net, None)  # Lightning's dict form: forward(**example), in forward's order
    assert example.names == ["input_ids", "attention_mask"]
    exported = export_graph(net, example, opset=20, exporter=exporter)
    assert exported.exporter == exporter
    inputs = graph_inputs(exported.model)
    assert inputs == {
        "input_ids": ("INT64", ["batch", "sequence"]),
        "attention_mask": ("INT64", ["batch", "sequence"]),
    }

    ids = torch.randint(1, 16, (5, 17))  # neither the traced batch (2) nor the traced length (10)
    mask = (torch.arange(17) < torch.tensor([[3], [17], [9], [1], [12]])).long()
    answer = ort_answer(exported.model, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        expected = net(ids, mask).numpy()
    np.testing.assert_allclose(answer, expected, atol=1e-5)


def test_a_forward_of_one_dict_exports_its_keys_as_inputs():
    """example_input_array = (dict,): Lightning calls forward(example[0]); the dict's keys name
    the graph's inputs, float ones dynamic in the batch only."""
    from kiln.export.onnx_export import example_input, export_graph

    torch.manual_seed(0)
    net = OneDict().eval()
    net.example_input_array = ({"pixels": torch.randn(1, 3, 2, 2), "features": torch.randn(1, 3)},)
    example = example_input(net, None)
    assert example.as_dict and example.names == ["pixels", "features"]
    exported = export_graph(net, example, opset=20)
    assert graph_inputs(exported.model) == {
        "pixels": ("FLOAT", ["batch", 3, 2, 2]),
        "features": ("FLOAT", ["batch", 3]),
    }
    pixels, features = torch.randn(7, 3, 2, 2), torch.randn(7, 3)
    answer = ort_answer(exported.model, {"pixels": pixels.numpy(), "features": features.numpy()})
    with torch.no_grad():
        expected = net({"pixels": pixels, "features": features}).numpy()
    np.testing.assert_allclose(answer, expected, atol=1e-5)


def test_static_int8_and_pruning_are_skipped_for_several_inputs_with_a_reason():
    from kiln.compression.steps import PruneStructured, QuantizeDynamic, QuantizeStatic
    from kiln.export.onnx_export import NamedInputs, skip_reason

    example = NamedInputs({"input_ids": torch.ones(2, 4), "attention_mask": torch.ones(2, 4)}, {})

    class Candidate:
        def __init__(self, prune: list[Any], quantize: Any) -> None:
            self.prune_steps, self.quantize_step = prune, quantize

    static = skip_reason(Candidate([], QuantizeStatic()), example)
    pruned = skip_reason(Candidate([("prune", PruneStructured())], None), example)
    assert static == (
        "static int8 calibrates one input tensor; this model takes 2 inputs (input_ids, attention_mask): "
        "use quantize_dynamic"
    )
    assert pruned is not None and pruned.startswith("structured pruning traces one input tensor")
    assert skip_reason(Candidate([], QuantizeDynamic()), example) is None
    assert skip_reason(Candidate([], QuantizeStatic()), torch.ones(2, 4)) is None  # one input: all apply


# -- the user project end to end -------------------------------------------------------------------

TRAIN = ["progress=lines", "export.latency_repeats=3", "trainer.max_epochs=2", "data.rows=600"]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(project, run directory) of the text classifier trained, compressed and exported in-process
    with kiln's default recipe (auto)."""
    from kiln.config import compose
    from kiln.stages import train as train_stage

    base = tmp_path_factory.mktemp("text")
    project = write_text_project(base / "project")
    run_dir = base / "run"
    import_project(project)
    try:
        cfg = compose(
            "train",
            ["model=text", "data=tokens", f"run_dir={run_dir}", *TRAIN],
            extra_config_dir=str(project / "my_configs"),
        )
        train_stage.main.call(cfg)
    finally:
        sys.path.remove(str(project))
    return project, run_dir


def write_npz(path: Path, ids: np.ndarray, mask: np.ndarray, **extra: np.ndarray) -> Path:
    np.savez(path, input_ids=ids, attention_mask=mask, **extra)
    return path


def predicted(output: Path) -> np.ndarray:
    lines = output.read_text().splitlines()
    assert lines[0].split(",")[0] == "prediction"
    return np.array([CLASSES.index(line.split(",")[0]) for line in lines[1:]])


def predict(model: Path, source: Path, output: Path) -> dict[str, Any]:
    from kiln.stages import predict as predict_stage

    return predict_stage.run(
        {"model": str(model), "input": str(source), "output": str(output), "batch_size": 64}
    )


def test_the_text_classifier_ships_a_graph_of_named_inputs_and_predicts_its_test_accuracy(text_run, tmp_path):
    project, run_dir = text_run
    report = json.loads((run_dir / "report.json").read_text())
    assert graph_inputs(run_dir / "model.onnx") == {
        "input_ids": ("INT64", ["batch", "sequence"]),
        "attention_mask": ("INT64", ["batch", "sequence"]),
    }
    # compression: dynamic int8 applies to the MatMul/Gemm of a transformer; what cannot apply is
    # skipped with its reason, in the report, never a traceback
    names = {v["name"]: v for v in report["variants"]}
    assert {"fp32", "int8_dynamic"} <= set(names)
    assert names["int8_dynamic"]["precision"] == "int8" and names["int8_dynamic"]["passed"]
    skipped = {a["name"]: a["abandoned"] for a in report["abandoned"]}
    assert skipped["int8_static"].startswith("static int8 calibrates one input tensor")
    assert skipped["pruned"].startswith("structured pruning traces one input tensor")
    markdown = (run_dir / "report.md").read_text()
    assert "- int8_static: abandoned: static int8 calibrates one input tensor" in markdown
    # scored by the user's own validation_step on the graph; fp32 agrees with torch
    fp32 = names["fp32"]
    assert fp32["passed"] and fp32["parity_max_abs"] < 1e-4
    assert fp32["val_metrics"]["val/acc"] == pytest.approx(
        report["baseline"]["val_metrics"]["val/acc"], abs=1e-6
    )
    torch_test = report["baseline"]["test_metrics"]["test/acc"]
    assert torch_test > 0.8  # the rule was learned: predictions below mean something

    # kiln predict on the test split, as an .npz of named arrays (its labels array is left out)
    ids, mask, labels = token_rows(project, 600, 12, 0)
    test = slice(480, 600)  # TokenDataModule's test split: the last 20% of its rows
    source = write_npz(tmp_path / "test.npz", ids[test], mask[test], labels=labels[test])
    result = predict(run_dir / "model.onnx", source, tmp_path / "predictions.csv")
    assert result["rows"] == 120
    accuracy = float(np.mean(predicted(tmp_path / "predictions.csv") == labels[test]))
    shipped = names[report["shipped"]]
    assert accuracy == pytest.approx(shipped["test_metrics"]["test/acc"], abs=1e-6)
    assert abs(accuracy - torch_test) <= 0.02

    # the same rows from Parquet: one list of token ids and one mask per row
    import pandas as pd

    frame = pd.DataFrame({"input_ids": list(ids[test]), "attention_mask": list(mask[test])})
    frame.to_parquet(tmp_path / "test.parquet")
    predict(run_dir / "model.onnx", tmp_path / "test.parquet", tmp_path / "from_parquet.csv")
    assert (tmp_path / "from_parquet.csv").read_text() == (tmp_path / "predictions.csv").read_text()


def test_predict_takes_a_sequence_length_the_model_never_saw(text_run, tmp_path):
    """Rows padded to 20 tokens (training used 12): the graph's sequence axis is dynamic, and its
    answers match the user's own module in torch on the same rows."""
    from kiln import api

    project, run_dir = text_run
    ids, mask, labels = token_rows(project, 200, 20, seed=5)
    source = write_npz(tmp_path / "long.npz", ids.astype(np.int32), mask.astype(np.int32))
    predict(run_dir / "model.onnx", source, tmp_path / "long.csv")
    answers = predicted(tmp_path / "long.csv")
    import_project(project)
    try:
        module = api.load_module(run_dir)
    finally:
        sys.path.remove(str(project))
    with torch.no_grad():
        probabilities = module(torch.from_numpy(ids), torch.from_numpy(mask)).softmax(-1).numpy()
    assert float(np.mean(answers == probabilities.argmax(-1))) >= 0.98  # int8 may flip a borderline row
    assert float(np.mean(answers == labels)) > 0.8
    # the graph is fed each named array where it belongs: its probabilities are the module's (a
    # mask left out or swapped with the ids would move them by far more)
    shipped = json.loads((run_dir / "report.json").read_text())["shipped"]
    rows = [line.split(",") for line in (tmp_path / "long.csv").read_text().splitlines()[1:]]
    answered = np.array([[float(cell) for cell in row[1:]] for row in rows])
    np.testing.assert_allclose(answered, probabilities, atol=1e-4 if shipped == "fp32" else 0.05)


# -- bad input: one line naming the input and what the model expects ----------------------------------


@pytest.fixture(scope="module")
def two_input_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model.onnx taking input_ids and attention_mask (int64, batch x sequence), written by
    torch's exporter directly (what predict reads is the graph, whoever wrote it)."""
    torch.manual_seed(0)
    ids = torch.ones(2, 6, dtype=torch.long)
    axes = {0: "batch", 1: "sequence"}
    path = tmp_path_factory.mktemp("two_inputs") / "model.onnx"
    torch.onnx.export(
        TwoTensors().eval(),
        (ids, ids),
        str(path),
        dynamo=False,
        input_names=["input_ids", "attention_mask"],
        output_names=["output"],
        dynamic_axes={"input_ids": axes, "attention_mask": axes, "output": {0: "batch"}},
    )
    return path


TAKES = "the model takes input_ids (int64, batch x sequence), attention_mask (int64, batch x sequence)"
IDS = np.arange(40, dtype=np.int64).reshape(4, 10) % 16


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        ({"input_ids": IDS}, f"no array 'attention_mask' (arrays given: input_ids); {TAKES}"),
        (
            {"input_ids": IDS.astype(np.float64), "attention_mask": np.ones((4, 10))},
            f"array 'input_ids' holds float64, but {TAKES}",
        ),
        (
            {"input_ids": IDS.ravel(), "attention_mask": np.ones((40,), dtype=np.int64)},
            f"array 'input_ids' has shape [40] (1 axes), but {TAKES}",
        ),
        (
            {"input_ids": IDS, "attention_mask": np.ones((4, 8), dtype=np.int64)},
            f"array 'attention_mask' has 8 on its sequence axis but 'input_ids' has 10; they must match ({TAKES})",
        ),
        (
            {"input_ids": IDS, "attention_mask": np.ones((3, 10), dtype=np.int64)},
            f"array 'attention_mask' has 3 on its batch (rows) axis but 'input_ids' has 4; they must match ({TAKES})",
        ),
    ],
    ids=["missing", "dtype", "rank", "sequence", "rows"],
)
def test_an_npz_that_does_not_fit_the_inputs_is_one_line_naming_the_input(
    two_input_model, tmp_path, capsys, arrays, expected
):
    from kiln.stages import predict as predict_stage

    source = tmp_path / "rows.npz"
    np.savez(source, **arrays)
    output = tmp_path / "out.csv"
    code = predict_stage.main([f"model={two_input_model}", f"input={source}", f"output={output}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"kiln predict: error: input={source}: {expected}"]
    assert not output.exists()


def test_rows_of_one_array_and_ragged_parquet_rows_are_refused_naming_what_the_model_takes(
    two_input_model, tmp_path
):
    import pandas as pd

    from kiln.stages import predict as predict_stage

    np.save(tmp_path / "ids.npy", IDS)
    with pytest.raises(KilnError) as raised:
        predict(two_input_model, tmp_path / "ids.npy", tmp_path / "out.csv")
    assert str(raised.value) == (
        f"input={tmp_path / 'ids.npy'}: this model takes several named inputs: input_ids (int64, batch x sequence), "
        "attention_mask (int64, batch x sequence); give an .npz of arrays with those names, or a Parquet file with "
        "those columns (one list per row)"
    )
    ragged = pd.DataFrame({"input_ids": [[1, 2, 3], [4, 5]], "attention_mask": [[1, 1, 1], [1, 1]]})
    ragged.to_parquet(tmp_path / "ragged.parquet")
    with pytest.raises(KilnError, match=r"column 'input_ids' holds \[2\] values in row 2 but \[3\] in row 1"):
        predict(two_input_model, tmp_path / "ragged.parquet", tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()
    # int32 token ids are taken (cast), and the answers are the net's
    np.savez(
        tmp_path / "ok.npz", input_ids=IDS.astype(np.int32), attention_mask=np.ones((4, 10), dtype=np.int32)
    )
    assert (
        predict_stage.run(
            {
                "model": str(two_input_model),
                "input": str(tmp_path / "ok.npz"),
                "output": str(tmp_path / "ok.csv"),
                "batch_size": 3,
            }
        )["rows"]
        == 4
    )


class ImageAndTable(nn.Module):
    """forward(pixels, features): an image with tabular features, as tuple batches give them."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(12, 4)
        self.table = nn.Linear(3, 4)

    def forward(self, pixels: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.image(pixels.flatten(1)) + self.table(features)


class TupleBatches:
    def val_dataloader(self) -> list[tuple[torch.Tensor, ...]]:
        return [(torch.randn(5, 3, 2, 2), torch.randn(5, 3), torch.zeros(5, dtype=torch.long))]


def test_a_tuple_batch_gives_one_input_per_required_argument_of_forward():
    """(pixels, features, y) batches and forward(pixels, features): the first two items are the
    inputs, float ones dynamic in the batch only; a dict batch with one input keeps the old rule."""
    from kiln.export.onnx_export import example_input, export_graph, inputs_of_batch

    torch.manual_seed(0)
    net = ImageAndTable().eval()
    example = example_input(net, TupleBatches())
    assert example.names == ["pixels", "features"] and not example.as_dict
    assert example.axes == {"pixels": {0: "batch"}, "features": {0: "batch"}}
    assert [len(t) for t in example.tensors.values()] == [2, 2]  # two rows: a dynamic batch is traced above 1
    exported = export_graph(net, example, opset=20)
    assert graph_inputs(exported.model) == {
        "pixels": ("FLOAT", ["batch", 3, 2, 2]),
        "features": ("FLOAT", ["batch", 3]),
    }
    pixels, features = torch.randn(4, 3, 2, 2), torch.randn(4, 3)
    answer = ort_answer(exported.model, {"pixels": pixels.numpy(), "features": features.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(answer, net(pixels, features).numpy(), atol=1e-5)
    assert inputs_of_batch({"x": torch.ones(2, 3), "y": torch.ones(2)}, nn.Linear(3, 1).forward) is None
