"""`kiln export` end to end: one self-contained ONNX file per variant, checked, with a dynamic batch
axis, a pinned opset and metadata; parity with PyTorch (independently recomputed here); raw-row
tables; the report; and the exporter's failure on an unsupported operator, naming the module."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from kiln.data.preprocessing import TablePreprocessor
from kiln.export.feeds import specs_of, table_feeds
from kiln.export.from_run import load_trained, open_run, raw_split
from kilntest import QUICK, copy_run, kiln_cli, kiln_in_process, ok

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits_export(digits_cnn_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = copy_run(digits_cnn_run, tmp_path_factory.mktemp("digits-export"))
    ok(kiln_cli("export", f"run={run}", *QUICK, cwd=run.parent))
    return run


@pytest.fixture(scope="module")
def penguins_export(penguins_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = copy_run(penguins_run, tmp_path_factory.mktemp("penguins-export"))
    ok(kiln_cli("export", f"run={run}", *QUICK, cwd=run.parent))
    return run


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_the_file_is_checked_self_contained_with_a_dynamic_batch_and_a_pinned_opset(digits_export: Path):
    model_path = digits_export / "model.onnx"
    onnx.checker.check_model(str(model_path), full_check=True)
    model = onnx.load(str(model_path), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [20]
    (graph_input,) = model.graph.input
    assert graph_input.type.tensor_type.shape.dim[0].dim_param == "batch"
    s = session(model_path)
    for rows in (1, 7, 300):
        label, probabilities, logits = s.run(
            None, {"input": np.random.rand(rows, 1, 8, 8).astype(np.float32)}
        )
        assert label.shape == (rows,) and probabilities.shape == (rows, 10) and logits.shape == (rows, 10)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_metadata_records_classes_features_metric_version_and_config_hash(digits_export: Path):
    meta = session(digits_export / "model.onnx").get_modelmeta().custom_metadata_map
    record = json.loads((digits_export / "run.json").read_text())
    assert json.loads(meta["kiln.class_names"]) == [str(d) for d in range(10)]
    assert json.loads(meta["kiln.feature_names"])[:2] == ["pixel_0_0", "pixel_0_1"]
    assert meta["kiln.monitor"] == "val/acc"
    assert 0 <= float(meta["kiln.monitor_value"]) <= 1
    assert meta["kiln.version"] == __import__("kiln").__version__
    assert meta["kiln.config_hash"] == record["config_hash"]


def test_fp32_onnx_matches_pytorch_on_the_test_split(digits_export: Path):
    datamodule, module = load_trained(open_run(digits_export))
    features, _ = datamodule.split_tensors("test")
    with torch.no_grad():
        expected = module(features).numpy()
    (logits,) = session(digits_export / "model.onnx").run(["logits"], {"input": features.numpy()})
    assert np.abs(logits - expected).max() <= 1e-4
    data = json.loads((digits_export / "report.json").read_text())
    assert data["shipped"] == "fp32" and data["variants"][0]["parity_max_abs"] <= 1e-4


def test_the_report_has_every_number_and_the_shipped_variant(digits_export: Path):
    data = json.loads((digits_export / "report.json").read_text())
    assert data["model"] == "model.onnx" and data["status"] == "passed"
    for entry in [data["baseline"], *data["variants"]]:
        assert "test/acc" in entry["test_metrics"] and entry["size_bytes"] > 0 and entry["params"] > 0
        assert set(entry["latency_us"]) == {"1", "256"} and all(v > 0 for v in entry["latency_us"].values())
        wanted = data["latency_repeats"]
        assert all(min(5, wanted) <= runs <= wanted for runs in entry["latency_runs"].values())
    assert data["baseline"]["name"] == "torch_fp32"
    # a plain CNN is traced without a warning and answers like torch: auto keeps the quick exporter
    assert {v["exporter"] for v in data["variants"]} == {"torchscript"}
    markdown = (digits_export / "report.md").read_text()
    assert "| fp32 (shipped) |" in markdown and "torch_fp32 (baseline)" in markdown
    assert (digits_export / "report.png").read_bytes()[:4] == b"\x89PNG"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(digits_export / "tensorboard")).Reload()
    assert "export/fp32/test/acc" in events.Tags()["scalars"]
    assert "export/fp32/latency_us_batch_256" in events.Tags()["scalars"]


def test_a_table_model_takes_raw_rows_and_predicts_as_the_pytorch_pipeline(penguins_export: Path):
    datamodule, module = load_trained(open_run(penguins_export))
    frame = raw_split(datamodule, "test")
    # rows the training data never showed: all missing, unseen categories, a missing number
    extra = frame.head(3).copy().astype(object)
    extra.iloc[0, :] = None
    extra.loc[extra.index[1], "island"] = "Atlantis"
    extra.loc[extra.index[1], "sex"] = None
    extra.loc[extra.index[2], "bill_length_mm"] = np.nan
    rows = __import__("pandas").concat([frame, extra], ignore_index=True)
    preprocessor = TablePreprocessor.from_state(datamodule.preprocessor.state_dict())
    with torch.no_grad():
        expected = module(torch.as_tensor(preprocessor.transform(rows))).numpy()
    s = session(penguins_export / "model.onnx")
    assert {i.name for i in s.get_inputs()} == set(datamodule.raw_columns)
    label, _probabilities, logits = s.run(None, table_feeds(rows, specs_of(s.get_inputs())))
    assert np.abs(logits - expected).max() <= 1e-4
    np.testing.assert_array_equal(label, np.asarray(datamodule.class_names)[expected.argmax(axis=1)])


def test_an_operator_the_exporter_cannot_handle_is_named_with_its_module(tmp_path: Path):
    (tmp_path / "oddnet.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class Zeta(nn.Module):
                def forward(self, x):
                    return x + 0.0 * torch.special.zeta(x.detach().abs() + 2.0, torch.tensor(2.0))

            def build(input_shape, num_outputs):
                return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), Zeta(), nn.Linear(16, num_outputs))
            """
        )
    )
    env = {"PYTHONPATH": str(tmp_path)}
    ok(
        kiln_cli(
            "train", "data=digits", "model=mlp", "model.net._target_=oddnet.build", "~model.net.hidden_sizes",
            "~model.net.dropout", "trainer.max_epochs=1", "progress=lines", "compress=none",
            "export.after_training=false", f"paths.output_dir={tmp_path / 'runs'}", cwd=tmp_path, env=env,
        )
    )  # fmt: skip
    (run,) = (tmp_path / "runs" / "train").iterdir()
    result = kiln_cli("export", f"run={run}", cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot handle module net.2 (Zeta)" in lines[0], result.stderr
    assert not (run / "model.onnx").exists() and not (run / "export").exists()


def test_after_training_compresses_and_exports_with_the_runs_own_settings(penguins_run: Path, tmp_path: Path):
    """What kiln train calls after testing (rank 0): kiln.delivery.after_training(cfg, run_dir)."""
    from omegaconf import OmegaConf

    from kiln.delivery import after_training

    run = copy_run(penguins_run, tmp_path)
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert after_training(cfg, run) is None  # the fixture trained with export.after_training=false
    cfg.compress = OmegaConf.create(
        {"recipe": "quantize_static", "steps": ["quantize_static"], "max_metric_drop": 100}
    )
    cfg.export.after_training = True
    cfg.export.latency_repeats = 3
    report = after_training(cfg, run)
    assert report is not None and report["shipped"] == "quantize_static"
    assert (run / "model.onnx").is_file() and (run / "report.json").is_file()


def test_a_candidate_is_timed_against_fp32_and_the_summary_says_what_each_number_is(
    digits_cnn_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
):
    run = copy_run(digits_cnn_run, tmp_path)
    code = kiln_in_process(
        monkeypatch,
        "compress",
        f"run={run}",
        "compress=quantize_static",
        "compress.quantize_static.calibration_batches=2",
        "compress.max_metric_drop=100",
        *QUICK,
    )
    out = capfd.readouterr().out
    assert code == 0, out
    data = json.loads((run / "report.json").read_text())
    fp32, int8 = data["variants"]
    for batch in ("1", "256"):
        speedup = int8["speedup"][batch]
        # at least 6 rounds (8 of quick calls) whatever latency_repeats says (3 here): fewer give no 95% interval
        assert speedup["rounds"] >= 6 and int8["latency_runs"][batch] == speedup["rounds"]
        assert fp32["latency_runs"][batch] == speedup["rounds"]  # fp32 ran once in every round
        low, high = speedup["ci95"]
        assert 0 < low <= speedup["median"] <= high
    assert "speedup" not in fp32  # the reference
    assert data["gate"] == {"metric": "val/acc", "mode": "max"} and data["decision"] == "auto"
    summary = out[out.index("shipped quantize_static") :]
    rounds = int8["speedup"]["256"]["rounds"]
    assert (
        "speed-up over the fp32 graph" in summary
        and f"(95% interval, batch 256, {rounds} paired rounds)" in summary
    )
    assert "val/acc drop" in summary and "95% interval [" in summary
    assert (
        f"validation val/acc={int8['val_metrics']['val/acc']:.4f}" in summary
        and f"{int8['val_rows']} rows" in summary
    )
    calls = int8["latency_calls_per_round"]["256"]  # quick calls: a round keeps the quickest of 3
    quickest = f" (each the quickest of {calls} calls)" if calls > 1 else ""
    median = f"median {int8['latency_us']['256']:.0f} us of {rounds} paired rounds{quickest}"
    assert f"onnxruntime latency at batch 256: {median}" in summary
    assert "fastest" not in summary


def test_a_budget_metric_the_module_does_not_log_is_one_line_and_nothing_ships(
    digits_cnn_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
):
    run = copy_run(digits_cnn_run, tmp_path)
    code = kiln_in_process(
        monkeypatch, "compress", f"run={run}", "compress=none", "compress.metric=val/top5", *QUICK
    )
    stderr = capfd.readouterr().err
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln compress: error: compress.metric=val/top5: "), stderr
    assert "does not log it; it logs: val/acc, val/auroc, val/f1, val/loss" in lines[0]
    assert not (run / "model.onnx").exists() and not (run / "report.json").exists()
