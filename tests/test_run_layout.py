"""One owner of the run directory (issue 24, item 2): `kiln.runs.RunLayout` names every file of a
run, and every other module asks it for paths.

The scan reads kiln's source (an AST walk; docstrings are prose and are skipped) for string
literals that name a run-directory file or folder by hand. The in-process run renames files in
the layout and checks that training, resume, export and `kiln report` all follow."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from kiln.runs import RunDirectory, RunLayout, read_record, write_record
from kilntest import ROOT, TINY_DIGITS

SOURCE = ROOT / "src" / "kiln"
OWNER = "runs.py"  # the layout's module, below SOURCE

# Folder names that are also stage, logger or tag names (`kiln export`, `logger=tensorboard`, the
# `export/report` tag): such a literal names the folder only where it is used as a path: joined
# (`run / "export"`), after a slash (f"{run}/tensorboard"), or given a module-level name of its own.
_WORDS = {RunLayout.CHECKPOINTS, RunLayout.TENSORBOARD, RunLayout.COMPRESS, RunLayout.EXPORT}


def layout_names() -> list[str]:
    """The names RunLayout gives, as they appear in a path (fold_{} -> fold_)."""
    names = [value for key, value in vars(RunLayout).items() if key.isupper() and isinstance(value, str)]
    return [name.split("{", 1)[0] for name in names]


def names_in(text: str, as_path: bool = False) -> list[str]:
    """The run-directory names `text` holds as a word of a path or a sentence (`as_path`: the
    literal is used as a path, so a bare folder name counts)."""
    found = []
    for name in layout_names():
        if name in _WORDS:
            word = text == name or text.startswith(f"{name}/")
            matched = (as_path and word) or re.search(rf"/{re.escape(name)}($|[^\w.])", text)
        elif name.endswith("_"):  # a fold's or trial's folder: fold_0, f"fold_{i}"
            matched = re.search(rf"(^|[^\w.]){re.escape(name)}(\d|<|$)", text)
        else:
            matched = re.search(rf"(^|[^\w.]){re.escape(name)}($|[^\w])", text)
        if matched:
            found.append(name)
    return found


def docstrings(tree: ast.AST) -> set[int]:
    bodies = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, bodies)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }


def used_as_paths(tree: ast.AST) -> set[int]:
    """Literals joined onto a path (`x / "name"`) or bound to a module-level name (`DIR = "name"`)."""
    joined = {
        id(node.right)
        for node in ast.walk(tree)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
    }
    named = {
        id(node.value)
        for node in getattr(tree, "body", [])
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None
    }
    return joined | named


def literals_naming_run_files(source: Path) -> dict[tuple[str, str], int]:
    """(file, literal) -> line, for every string literal outside the layout's module that names a
    run-directory file (f-strings' literal parts included)."""
    found: dict[tuple[str, str], int] = {}
    for path in sorted(source.rglob("*.py")):
        relative = path.relative_to(source).as_posix()
        if relative == OWNER:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        prose, paths = docstrings(tree), used_as_paths(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in prose:
                continue
            if names_in(node.value, as_path=id(node) in paths):
                found.setdefault((relative, node.value), node.lineno)
    return found


def test_no_module_but_the_layout_names_a_run_directory_file() -> None:
    offenders = literals_naming_run_files(SOURCE)
    assert not offenders, "ask kiln.runs.RunLayout for these paths:\n" + "\n".join(
        f"src/kiln/{file}:{line}: {text!r}" for (file, text), line in sorted(offenders.items())
    )


def test_the_scan_finds_a_file_named_by_hand(tmp_path: Path) -> None:
    (tmp_path / "leak.py").write_text(
        '"""Docstrings may say run.json."""\n'
        'A = "checkpoints/best.ckpt"\n'
        'B = f"{run}/tensorboard"\n'
        'C = f"fold_{i}"\n'
        'D = run / "export"\n'
        'E = "compress"\n'
        "def f():\n"
        '    say("kiln export run=x", "logger=tensorboard", "export/report")\n'  # a stage, a logger, a tag
    )
    found = literals_naming_run_files(tmp_path)
    assert sorted(text for _, text in found) == [
        "/tensorboard",
        "checkpoints/best.ckpt",
        "compress",
        "export",
        "fold_",
    ]


def test_the_layout_gives_every_path_below_its_root(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    assert layout.record == tmp_path / "run.json"
    assert layout.saved_config == tmp_path / ".hydra" / "config.yaml"
    assert layout.overrides == tmp_path / ".hydra" / "overrides.yaml"
    assert layout.best_checkpoint == tmp_path / "checkpoints" / "best.ckpt"
    assert layout.last_checkpoint == tmp_path / "checkpoints" / "last.ckpt"
    assert layout.preempted_checkpoint == tmp_path / "checkpoints" / "preempted.ckpt"
    assert layout.fold(2).record == tmp_path / "fold_2" / "run.json"
    assert layout.trial(7).root == tmp_path / "trial_007"
    assert layout.exported("int8") == tmp_path / "export" / "int8.onnx"
    assert layout.relative(layout.manifest) == "compress/manifest.json"
    assert [p.name for p in layout.shipped] == ["model.onnx", "report.json", "report.md", "report.png"]


def test_the_record_is_written_and_read_back_through_the_layout(tmp_path: Path) -> None:
    write_record(tmp_path, {"status": "running", "stage": "train", "url": "mysql://me:pw@db/x"})
    assert read_record(tmp_path)["status"] == "running"
    assert "pw" not in RunLayout(tmp_path).record.read_text()  # credentials masked, as every write


def test_a_missing_record_is_one_line_naming_the_directory(tmp_path: Path) -> None:
    from kiln.errors import KilnError

    with pytest.raises(
        KilnError, match=rf"^{re.escape(str(tmp_path))}: not a kiln run directory \(no run.json\)$"
    ):
        read_record(tmp_path)


def test_a_config_naming_a_path_the_layout_lacks_is_told_the_paths_it_has() -> None:
    from kiln.errors import KilnError
    from kiln.runs import run_path

    with pytest.raises(
        KilnError, match=r"kiln_run_path:checkpoint_dir.*one of best_checkpoint, checkpoints,"
    ):
        run_path("checkpoint_dir", "/runs/x")


@pytest.fixture
def renamed(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The layout with new names for the files training, export and the report write and read."""
    names = {
        "RECORD": "kiln-run.json",
        "HYDRA": ".kiln",
        "SAVED_CONFIG": "settings.yaml",
        "OVERRIDES": "arguments.yaml",
        "MODEL": "shipped.onnx",
        "CHECKPOINTS": "weights",
        "BEST_CHECKPOINT": "top.ckpt",
        "TENSORBOARD": "tb",
        "REPORT": "summary.json",
        "REPORT_MARKDOWN": "summary.md",
        "REPORT_PLOT": "summary.png",
    }
    for attribute, name in names.items():
        monkeypatch.setattr(RunLayout, attribute, name)
    return names


def test_a_name_changed_in_the_layout_is_followed_by_train_resume_export_and_report(
    renamed: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kiln.config import compose
    from kiln.stages import export, report, train

    run_dir = tmp_path / "run"
    tiny = [*TINY_DIGITS, "model.net.hidden_sizes=[8]", "logger.log_graph=false", f"run_dir={run_dir}"]
    train.main.call(compose("train", [*tiny, "trainer.max_epochs=1"]))  # type: ignore[attr-defined]
    assert (run_dir / "weights" / "top.ckpt").is_file() and (run_dir / "weights" / "last.ckpt").is_file()
    assert not (run_dir / "checkpoints").exists()
    assert list((run_dir / "tb").glob("events.out.tfevents.*")) and not (run_dir / "tensorboard").exists()
    assert (run_dir / "kiln-run.json").is_file() and not (run_dir / "run.json").exists()
    assert (run_dir / ".kiln" / "settings.yaml").is_file() and (
        run_dir / ".kiln" / "arguments.yaml"
    ).is_file()
    assert not (run_dir / ".hydra").exists()

    train.main.call(compose("train", [*tiny, "trainer.max_epochs=2", "resume=auto"]))  # type: ignore[attr-defined]
    record = read_record(run_dir)
    assert record["resumed_from"] == str(run_dir / "weights" / "last.ckpt")
    assert record["status"] == "completed" and len(record["attempts"]) == 1

    run = RunDirectory.read(run_dir)
    assert run.best_checkpoint == run_dir / "weights" / "top.ckpt"
    export.main.call(compose("export", [f"run={run_dir}", "export.latency_repeats=1"]))  # type: ignore[attr-defined]
    for name in ("summary.json", "summary.md", "summary.png"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob("report.*"))
    assert (run_dir / "shipped.onnx").is_file() and not (run_dir / "model.onnx").exists()
    assert RunDirectory.read(run_dir).model_path == run_dir / "shipped.onnx"
    shipped = json.loads((run_dir / "summary.json").read_text())
    assert RunDirectory.read(run_dir).report == shipped  # the reader finds the renamed report
    assert read_record(run_dir)["delivery"]["status"] == shipped["status"]

    capsys.readouterr()
    assert report.main([f"dir={run_dir}"]) == 0
    table = capsys.readouterr().out
    score, acc = record["best_checkpoint"]["score"], record["test_metrics"]["test/acc"]
    assert f"| 1 | completed | {score:.4f} | {acc:.4f} |" in table


def test_a_config_asking_the_layout_for_an_unknown_path_is_one_line_naming_the_key(tmp_path: Path) -> None:
    from kiln.config import compose
    from kiln.errors import describe_user_error
    from kiln.stages import train

    bad = "callbacks.model_checkpoint.dirpath=${kiln_run_path:weights,/somewhere}"
    cfg = compose("train", [*TINY_DIGITS, f"paths.output_dir={tmp_path / 'runs'}", bad])
    with pytest.raises(Exception) as caught:
        train.main.call(cfg)  # type: ignore[attr-defined]
    line = describe_user_error(caught.value)
    assert line is not None and "\n" not in line
    assert "${kiln_run_path:weights}: not a path of a run directory; one of best_checkpoint" in line
    assert "callbacks.model_checkpoint.dirpath" in line
    assert not list(tmp_path.rglob(RunLayout.RECORD))  # refused before the run started
