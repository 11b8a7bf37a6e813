"""What a config may call (kiln.targets): a run directory is data, not code.

A run directory someone shares holds its config; `kiln export run=<dir>` and `api.load_module(<dir>)`
rebuild the run from it. A `_target_` there that loads a pickle, writes a file or starts a
program is refused in one line naming the key and the target, and the payload never runs: each
payload below would write a marker file, and the marker is not there afterwards.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kiln import api
from kiln.config import check_target, compose
from kiln.errors import KilnError
from kilntest import ROOT, TINY_DIGITS, copy_run, kiln_cli, read_run

ALLOWED_LIST = "kiln instantiates only kiln's components, torch.optim, torch.nn layers"


def train_in_process(run_dir: Path, *overrides: str) -> Any:
    from kiln.stages import train as train_stage

    cfg = compose("train", [*TINY_DIGITS, f"run_dir={run_dir}", *overrides])
    return train_stage.main.call(cfg)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny digits MLP, trained in this process (2 epochs)."""
    run_dir = tmp_path_factory.mktemp("targets") / "run"
    train_in_process(run_dir)
    assert read_run(run_dir)["status"] == "completed"
    return run_dir


class WritesMarker:
    """Unpickling this writes the marker file: a pickle runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "the pickle ran"))


def payloads(run: Path, marker: Path) -> dict[str, dict[str, Any]]:
    """`model.net` nodes a tampered config could hold, each of which would write `marker`."""
    notes = run / "notes.pt"
    torch.save(WritesMarker(marker), notes)  # a pickle, as torch.load(weights_only=False) reads it
    python = f"__import__('pathlib').Path({str(marker)!r}).write_text('ran')"
    return {
        "torch.load": {"_target_": "torch.load", "f": str(notes), "weights_only": False},
        "pathlib.Path.write_text": {
            "_target_": "pathlib.Path.write_text",
            "self": {"_target_": "pathlib.Path", "_args_": [str(marker)]},
            "data": "pwned",
        },
        "os.system": {"_target_": "os.system", "command": f"touch {marker}"},
        "builtins.eval": {"_target_": "builtins.eval", "_args_": [python]},
        "builtins.exec": {"_target_": "builtins.exec", "_args_": [python]},
        "subprocess.run": {"_target_": "subprocess.run", "args": ["touch", str(marker)]},
        # an allowed package's own import of os is still os.system
        "kiln.config.os.system": {"_target_": "kiln.config.os.system", "command": f"touch {marker}"},
    }


def tamper(run: Path, key: str, node: Any) -> None:
    """Replace `key` (e.g. model.net) in the run's saved config, as someone sharing the run could."""
    path = run / ".hydra" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    *parents, last = key.split(".")
    holder = config
    for part in parents:
        holder = holder[part]
    holder[last] = node
    path.write_text(yaml.safe_dump(config))


def assert_refused(error: BaseException, key: str, target: str) -> None:
    line = str(error)
    assert line.startswith(f"{key}._target_={target}: "), line
    assert ALLOWED_LIST in line and "\n" not in line, line


PAYLOADS = [
    "torch.load",
    "pathlib.Path.write_text",
    "os.system",
    "builtins.eval",
    "builtins.exec",
    "subprocess.run",
    "kiln.config.os.system",
]


@pytest.mark.slow
@pytest.mark.parametrize("target", PAYLOADS)
def test_a_tampered_run_is_refused_by_load_module(trained: Path, tmp_path: Path, target: str) -> None:
    run = copy_run(trained, tmp_path)
    marker = tmp_path / "marker"
    tamper(run, "model.net", payloads(run, marker)[target])
    with pytest.raises(KilnError) as raised:
        api.load_module(run)
    assert_refused(raised.value, "model.net", target)
    assert not marker.exists()


def test_a_payload_nested_in_an_argument_is_refused(trained: Path, tmp_path: Path) -> None:
    """Hydra builds a `_target_` inside an argument too: it is checked with the rest."""
    run = copy_run(trained, tmp_path)
    marker = tmp_path / "marker"
    python = f"__import__('pathlib').Path({str(marker)!r}).write_text('ran')"
    tamper(run, "model.optimizer.lr", {"_target_": "builtins.eval", "_args_": [python]})
    with pytest.raises(KilnError) as raised:
        api.load_module(run)
    assert_refused(raised.value, "model.optimizer.lr", "builtins.eval")
    assert not marker.exists()


@pytest.mark.parametrize("target", ["torch.load", "pathlib.Path.write_text"])
def test_a_tampered_run_is_refused_by_kiln_export(trained: Path, tmp_path: Path, target: str) -> None:
    from kiln.stages import export as export_stage

    run = copy_run(trained, tmp_path)
    marker = tmp_path / "marker"
    tamper(run, "model.net", payloads(run, marker)[target])
    cfg = compose("export", [f"run={run}", "export.latency_repeats=3"])
    with pytest.raises(KilnError) as raised:
        export_stage.main.call(cfg)
    assert_refused(raised.value, "model.net", target)
    assert not marker.exists()
    assert not (run / "model.onnx").exists() and not (run / "export").exists()
    assert read_run(run)["delivery"]["status"] == "failed"  # said in the record, training kept
    assert read_run(run)["status"] == "completed"


def test_a_refused_data_target_stops_before_the_model_is_built(trained: Path, tmp_path: Path) -> None:
    run = copy_run(trained, tmp_path)
    marker = tmp_path / "marker"
    tamper(run, "data", {"_target_": "subprocess.run", "args": ["touch", str(marker)]})
    with pytest.raises(KilnError) as raised:
        api.load_module(run)
    assert_refused(raised.value, "data", "subprocess.run")
    assert not marker.exists()


def test_a_resume_keeps_no_tampered_target(trained: Path, tmp_path: Path) -> None:
    """`resume=auto` continues with the run's saved values (kiln.runs.keep_saved_values): a
    tampered `_target_` among them is refused when it would be built."""
    run = copy_run(trained, tmp_path)
    marker = tmp_path / "marker"
    tamper(run, "model.net", payloads(run, marker)["pathlib.Path.write_text"])
    from kiln.stages import train as train_stage

    cfg = compose("train", [f"run_dir={run}", "resume=auto", "trainer.max_epochs=3"])  # the rest: saved
    with pytest.raises(KilnError) as raised:
        train_stage.main.call(cfg)
    assert_refused(raised.value, "model.net", "pathlib.Path.write_text")
    assert not marker.exists()


def test_the_cli_refuses_a_callback_that_writes_a_file_before_anything_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    node = f"{{_target_:pathlib.Path.write_text,self:{{_target_:pathlib.Path,_args_:[{marker}]}},data:pwned}}"
    result = kiln_cli(
        "train", *TINY_DIGITS, f"paths.output_dir={tmp_path / 'runs'}", f"+callbacks.x={node}", cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("kiln train: error: callbacks.x._target_=pathlib.Path.write_text: pathlib "), last
    assert ALLOWED_LIST in last
    assert not marker.exists()
    assert not list((tmp_path / "runs").glob("**/checkpoints/*.ckpt"))  # nothing was trained


# -- users' own code ------------------------------------------------------------------------------

USER_NET = textwrap.dedent(
    """\
    import math

    from torch import nn


    def tiny(input_shape, num_outputs, hidden=8, dropout=0.0):
        inputs = math.prod(input_shape)
        return nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, num_outputs))


    def not_a_callback():
        return 3
    """
)


@pytest.fixture
def project(tmp_path: Path) -> Any:
    """A project folder with the user's own net builder (`targets_user_net.tiny`) on sys.path."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "targets_user_net.py").write_text(USER_NET)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("targets_user_net", None)


def test_project_code_is_called_and_the_same_code_inside_a_run_is_refused(
    project: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    train_in_process(
        run, "model.net._target_=targets_user_net.tiny", "~model.net.hidden_sizes", "trainer.max_epochs=1"
    )
    module = api.load_module(run)  # the user's own net, rebuilt from the run's saved config
    assert [type(layer).__name__ for layer in module.net] == ["Flatten", "Linear", "ReLU", "Linear"]
    assert module.net[1].out_features == 8

    # The same module, shipped inside a run directory: a run directory is data, never imported.
    shared = copy_run(run, tmp_path / "shared")
    (shared / "shipped_net.py").write_text(USER_NET)
    sys.path.insert(0, str(shared))
    try:
        tamper(shared, "model.net._target_", "shipped_net.tiny")
        with pytest.raises(KilnError) as raised:
            api.load_module(shared)
    finally:
        sys.path.remove(str(shared))
    assert_refused(raised.value, "model.net", "shipped_net.tiny")
    assert f"lies inside the run directory {shared.resolve()}" in str(raised.value)
    assert "shipped_net" not in sys.modules  # refused before it was imported


def test_a_callback_that_is_not_a_callback_is_one_line(project: Path, tmp_path: Path) -> None:
    layer = "{_target_:torch.nn.Linear,in_features:2,out_features:2}"
    with pytest.raises(KilnError) as raised:
        train_in_process(tmp_path / "a", f"+callbacks.x={layer}")
    assert str(raised.value) == (
        "callbacks.x._target_=torch.nn.Linear: not a Lightning callback; callbacks.x must build a "
        "lightning.pytorch.callbacks.Callback, e.g. +callbacks.x={_target_: "
        "lightning.pytorch.callbacks.LearningRateMonitor}, or remove it with ~callbacks.x"
    )
    assert not (tmp_path / "a" / "run.json").exists()  # refused before the run started

    # A builder function is judged on what it returns, before the Trainer is made.
    with pytest.raises(
        KilnError, match=r"^callbacks\.y\._target_=targets_user_net\.not_a_callback: not a Lightning"
    ):
        train_in_process(tmp_path / "b", "+callbacks.y={_target_:targets_user_net.not_a_callback}")
    assert not list((tmp_path / "b").glob("checkpoints/*.ckpt"))


def test_the_suggested_callback_fix_works(tmp_path: Path) -> None:
    """The line above suggests `+callbacks.x={_target_: lightning.pytorch.callbacks.LearningRateMonitor}`."""
    run = tmp_path / "run"
    train_in_process(run, "+callbacks.x={_target_: lightning.pytorch.callbacks.LearningRateMonitor}")
    assert read_run(run)["status"] == "completed"


def test_an_installed_library_is_trusted_only_when_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    node = {"_target_": "sklearn.preprocessing.StandardScaler"}
    with pytest.raises(KilnError) as raised:
        check_target("model.net", node)
    line = str(raised.value)
    assert line.startswith(
        "model.net._target_=sklearn.preprocessing.StandardScaler: sklearn is an installed library"
    )
    assert line.endswith(
        '(README: "What a config may call"; to trust an installed library, list it in KILN_TRUSTED_TARGETS)'
    )
    monkeypatch.setenv("KILN_TRUSTED_TARGETS", "sklearn.preprocessing")
    check_target("model.net", node)  # trusted now
    # What loads pickles or touches files stays refused, whatever the variable says.
    monkeypatch.setenv("KILN_TRUSTED_TARGETS", "torch,pathlib")
    for name in ("torch.load", "pathlib.Path.write_text"):
        with pytest.raises(KilnError) as refused:
            check_target("model.net", {"_target_": name})
        assert "KILN_TRUSTED_TARGETS" not in str(refused.value)


def test_the_readme_says_what_a_config_may_call() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "## What a config may call" in readme or "### What a config may call" in readme
    section = readme.split("What a config may call", 1)[1][:3000]
    for name in ("torch.load", "KILN_TRUSTED_TARGETS", "run directory"):
        assert name in section
