"""Data-parallel training with 2 CPU ranks through the real CLI (`trainer=ddp_cpu`).

The splits are chosen with odd sizes, so that a sampler that pads ranks to equal length would
count some rows twice: the recorded metrics must equal those recomputed in one process from the
best checkpoint over the whole split.
"""

from __future__ import annotations

import pytest
import torch

from kiln.data import DigitsDataModule
from kiln.models.nets import mlp
from kilntest import NO_COMPRESSION, assert_ok, read_run, run_dirs, run_kiln

pytestmark = [pytest.mark.slow, pytest.mark.ddp]

SPLITS = {"val_fraction": 0.107, "test_fraction": 0.107}


def accuracy(net: torch.nn.Module, data: DigitsDataModule, split: str) -> tuple[float, int]:
    features, targets = data.split_tensors(split)
    with torch.no_grad():
        predicted = net.eval()(features).argmax(dim=1)
    return (predicted == targets).float().mean().item(), len(targets)


def test_two_cpu_ranks_write_one_run_with_unbiased_metrics(tmp_path):
    result = run_kiln(
        [
            "train",
            f"paths.output_dir={tmp_path / 'runs'}",
            "trainer=ddp_cpu",
            "data=digits",
            *[f"data.{key}={value}" for key, value in SPLITS.items()],
            "model=mlp",
            "model.net.hidden_sizes=[32]",
            "trainer.max_epochs=3",
            "monitor.metric=val/acc",
            "monitor.mode=max",
            "progress=lines",
            *NO_COMPRESSION,
        ],
        tmp_path,
    )
    assert_ok(result)
    (run_dir,) = run_dirs(tmp_path / "runs")  # rank 1 made no run directory of its own
    record = read_run(run_dir)
    assert record["status"] == "completed"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    # rank 0 alone writes: every file in the run directory comes from its process (its pid ends the
    # directory's name, and TensorBoard puts the writer's pid in each event file's name)
    rank_zero_pid = run_dir.name.rsplit("_", 1)[1]
    events = list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and all(f".{rank_zero_pid}." in p.name for p in events)
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".hydra",
        ".kiln.lock",  # rank 0's: the one writer
        "checkpoints",
        "drift_baseline.json",
        "run.json",
        "tensorboard",
        "train.log",
    ]
    assert result.stdout.count("best epoch") == 1  # one summary, from rank 0

    checkpoint = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    net = mlp((1, 8, 8), 10, hidden_sizes=[32])
    net.load_state_dict(
        {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    )
    data = DigitsDataModule(seed=42, **SPLITS)
    data.setup()
    test_accuracy, test_rows = accuracy(net, data, "test")
    val_accuracy, _ = accuracy(net, data, "val")
    assert test_rows % 2 == 1  # uneven over 2 ranks: padding would show
    assert record["test_metrics"]["test/acc"] == pytest.approx(test_accuracy, abs=1e-6)
    assert record["best_checkpoint"]["score"] == pytest.approx(val_accuracy, abs=1e-6)
    assert record["throughput"]["epochs"] == 3


def test_a_sweep_of_two_rank_runs_runs_each_job_once(tmp_path):
    """Upstream, rank 1 of each DDP job re-runs the whole sweep (Lightning #11300); kiln's must not."""
    result = run_kiln(
        [
            "train",
            "-m",
            f"paths.output_dir={tmp_path / 'runs'}",
            "trainer=ddp_cpu",
            "data=digits",
            "model=mlp",
            "model.net.hidden_sizes=[8],[16]",
            "trainer.max_epochs=1",
            "progress=lines",
            *NO_COMPRESSION,
        ],
        tmp_path,
    )
    assert_ok(result)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["train_multirun"]
    (sweep,) = (tmp_path / "runs" / "train_multirun").iterdir()  # one sweep, not one per rank 1
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    for job, width in zip(jobs, (8, 16), strict=True):
        assert read_run(job)["status"] == "completed"
        weights = torch.load(job / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
        assert weights["state_dict"]["net.1.weight"].shape[0] == width
    assert result.stdout.count("best epoch") == 2  # one summary per job, from its rank 0
