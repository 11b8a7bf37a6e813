"""Every `kiln ...` command the README shows, and every example of `kiln --help`, runs.

The commands are parsed out of README.md's code blocks and out of the CLI's help text, so a newly
documented command is picked up by itself: `test_every_documented_command_is_covered` fails until
it either runs here or names the test that runs it (COVERED_ELSEWHERE).

Each command runs through the real CLI in a temp directory, shortened where it would take long
(SHORTER: the command -> overrides appended after it, so they win; the default per stage is
DEFAULT_SHORTER), with placeholders (`runs/train/<run>`, `rows.csv`, `path/to/last.ckpt`, ...)
made real first: a copy of the session's trained penguins run, its rows, its last checkpoint.
SLURM commands are composed (`--cfg hydra`, one value of each sweep) rather than submitted: the
cluster tests in tests/test_slurm.py submit the same kinds of job.
"""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kilntest import ROOT, Output, copy_run, kiln_command, read_run, run_kiln, wait_for

README = ROOT / "README.md"

# -- what the documentation shows -----------------------------------------------------------------

_TOKEN = re.compile(r"""(?:[^\s'"]+|'[^']*'|"[^"]*")+""")
# Hydra's flags that take a value: any (a directory), or one of a few words
_VALUED_FLAGS: dict[str, tuple[str, ...] | None] = {
    "--config-dir": None,
    "-cd": None,
    "--cfg": ("job", "hydra", "all"),
    "-c": ("job", "hydra", "all"),
    "--info": ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath"),
    "-i": ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath"),
}


@dataclass(frozen=True)
class Documented:
    """One documented command: its arguments as written (quotes kept), and the output the
    documentation shows after it (a `$ kiln ...` line followed by what it prints), if any."""

    args: tuple[str, ...]
    shown: str = ""

    @property
    def text(self) -> str:
        return " ".join(("kiln", *self.args))

    @property
    def stage(self) -> str:
        return self.args[0] if self.args and not self.args[0].startswith("-") else ""

    @property
    def argv(self) -> list[str]:
        """The arguments as a shell would pass them (quotes removed)."""
        return [part for arg in self.args for part in shlex.split(arg)]


def parse_command(line: str) -> list[tuple[str, ...]]:
    """The commands in one documented line (`kiln train --help | --cfg job` is two), without the
    description that follows them; [] for a line that is not a command (`kiln train: error: ...`)."""
    tokens = [match.group(0) for match in _TOKEN.finditer(line)]
    if len(tokens) < 2 or tokens[0] != "kiln" or tokens[1].endswith(":"):
        return []
    args: list[str] = [tokens[1]]
    for index, token in enumerate(tokens[2:], start=2):
        previous = tokens[index - 1]
        values = _VALUED_FLAGS.get(previous, ())
        is_value = previous in _VALUED_FLAGS and (values is None or token in values)
        if token == "|" or token[0] in "-+~'" or "=" in token or is_value:
            args.append(token)
            continue
        break  # the description
    if "|" not in args:
        return [tuple(args)]
    stage = [args[0]] if not args[0].startswith("-") else []
    rest = args[len(stage) :]
    alternatives: list[list[str]] = [[]]
    for arg in rest:
        if arg == "|":
            alternatives.append([])
        else:
            alternatives[-1].append(arg)
    return [tuple([*stage, *alternative]) for alternative in alternatives if alternative]


def readme_commands(text: str) -> list[Documented]:
    commands = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
        lines = block.splitlines()
        index = 0
        while index < len(lines):
            line = lines[index].strip()
            index += 1
            prompt = line.startswith("$ ")
            line = line.removeprefix("$ ")
            while line.endswith("\\") and index < len(lines):
                line = line[:-1].rstrip() + " " + lines[index].strip()
                index += 1
            shown = []
            if prompt:  # what the documentation says the command prints
                while index < len(lines) and lines[index].strip() and not lines[index].startswith("$ "):
                    shown.append(lines[index].strip())
                    index += 1
            for args in parse_command(line):
                commands.append(Documented(args, "\n".join(shown)))
    return commands


def help_commands() -> list[Documented]:
    from kiln.cli import usage

    examples = usage().split("examples:", 1)[1].split("\n\n", 1)[0]
    return [Documented(args) for line in examples.splitlines() for args in parse_command(line.strip())]


def documented_commands() -> list[Documented]:
    seen: dict[str, Documented] = {}
    for command in [*readme_commands(README.read_text()), *help_commands()]:
        seen.setdefault(command.text, command)
    return list(seen.values())


# -- how each one is run --------------------------------------------------------------------------

TRAIN_SHORTER = ["trainer.max_epochs=1", "compress=none", "export.after_training=false", "progress=lines"]
DEFAULT_SHORTER = {
    "train": TRAIN_SHORTER,
    "search": ["search.n_trials=1", *TRAIN_SHORTER],
    "compress": ["+compress.prune_structured.finetune_epochs=1", "export.latency_repeats=3"],
    "export": ["export.latency_repeats=3"],
    "tensorboard": ["port=0"],  # a free port: 6006 may be taken on a shared machine
}
PENGUINS = ["experiment=penguins_mlp"]
# Command (as the README writes it) -> overrides appended after it, instead of the default.
SHORTER: dict[str, list[str]] = {
    "kiln train data=synthetic data.num_samples=1000000 model=mlp": [*TRAIN_SHORTER, "data.num_samples=3000"],
    # continue the session's penguins run (3 epochs): the run's own experiment, one epoch more
    "kiln train resume=path/to/last.ckpt": [*TRAIN_SHORTER, *PENGUINS, "trainer.max_epochs=4"],
    # one fine-tune epoch of a 3-epoch run loses accuracy: the gate's budget is not what is tested here
    "kiln compress run=runs/train/<run> compress=prune_structured": [
        "compress.prune_structured.finetune_epochs=1",
        "compress.max_metric_drop=100",
        "++compress.metric_unit=points",  # 100 points: any loss passes (a loss budget is percent by default)
        "export.latency_repeats=3",
    ],
    "kiln search hparams_search=digits_cnn search.sampler=random search.n_trials=40": [  # one trial
        "search.n_trials=1",
        *TRAIN_SHORTER,
    ],
}
DEMO_EXPERIMENTS = "tests/test_train_e2e.py::test_the_demo_experiments_reach_their_test_accuracy_targets"
# Commands another test runs as written (or shortened the same way): command -> that test's node.
COVERED_ELSEWHERE: dict[str, str] = {
    # logger=mlflow: tests/test_mlflow.py runs these against a real `mlflow server` it starts
    "kiln train experiment=digits_cnn logger=mlflow logger.tracking_uri=http://127.0.0.1:5000": (
        "tests/test_mlflow.py::test_a_run_shows_its_config_metrics_tags_artifacts_and_model_version"
    ),
    "kiln train experiment=digits_cnn logger=mlflow logger.tracking_uri=http://127.0.0.1:5000 "
    "logger.register_model=digits": (
        "tests/test_mlflow.py::test_a_run_shows_its_config_metrics_tags_artifacts_and_model_version"
    ),
    "kiln train -m seed=1,2,3 logger=mlflow logger.tracking_uri=http://127.0.0.1:5000": (
        "tests/test_mlflow.py::test_cli_sweep_is_nested_under_one_parent_run"
    ),
    "kiln train cv.folds=5 logger=mlflow logger.tracking_uri=sqlite:///mlflow.db": (
        "tests/test_mlflow.py::test_cross_validation_folds_are_nested_under_one_parent"
    ),
    "kiln search hparams_search=digits_cnn logger=mlflow logger.tracking_uri=http://127.0.0.1:5000": (
        "tests/test_mlflow.py::test_search_trials_are_nested_under_one_parent"
    ),
    "kiln train data=table data.path=cars.csv data.target=Miles_per_Gallon": (
        "tests/data/test_table_input.py::test_the_readmes_cars_command_trains_on_a_table_with_missing_targets"
    ),
    "kiln train experiment=images_resnet": (
        "tests/test_images_e2e.py::test_a_resnet_trains_on_image_files_and_ships_a_pruned_int8_model"
    ),
    "kiln train data=image_folder data.path=DIR model=backbone model.net.name=resnet50 model.net.weights=W": (
        "tests/test_images_e2e.py::test_readme_commands_with_local_weights_and_predict_on_a_folder"
    ),
    "kiln train data=image_folder data.path=/data/pets model=backbone model.net.name=convnext_tiny "
    "model.net.weights=/models/convnext_tiny data.image_size=128 data.augment.horizontal_flip=0.5": (
        "tests/test_images_e2e.py::test_readme_commands_with_local_weights_and_predict_on_a_folder"
    ),
    "kiln predict model=runs/train/<run>/model.onnx input=photos/ output=predictions.csv": (
        "tests/test_images_e2e.py::test_readme_commands_with_local_weights_and_predict_on_a_folder"
    ),
    "kiln predict model=runs/train/<run>/model.onnx input=photos/ output=preds.csv": (
        "tests/test_images_e2e.py::test_readme_commands_with_local_weights_and_predict_on_a_folder"
    ),
    "kiln train trainer=ddp_cpu": "tests/test_ddp.py::test_two_cpu_ranks_write_one_run_with_unbiased_metrics",
    "kiln train cv.folds=5": "tests/test_cross_validation.py::test_three_folds_and_their_mean_and_std",
    "kiln train --config-dir my_configs model=my_net": (
        "tests/test_cli.py::test_a_users_config_dir_and_module_train_without_forking_kiln"
    ),
    "kiln train --config-dir my_configs model=my_lit data=my_images trainer.max_epochs=10": (
        "tests/test_open_framework.py::test_plain_lightning_code_trains_compresses_and_ships"
    ),
    "kiln predict model=runs/train/<run>/model.onnx input=test_images.npy output=preds.csv": (
        "tests/test_open_framework.py::test_predict_reproduces_test_accuracy"
    ),
    "kiln search run_dir=runs/search/<dir> hparams_search=digits_cnn": (
        "tests/test_search.py::test_an_interrupted_search_continues_where_it_stopped"
    ),
    "kiln train -m model.net.hidden_sizes=[64],[128]": (
        "tests/test_cli.py::test_multirun_sweeps_two_jobs_into_two_run_directories"
    ),
    "kiln compress run=runs/train/<run> compress=prune_structured compress.steps=[prune_structured,quantize_static]": (
        "tests/compression/test_compress_e2e.py::test_each_recipe_ships_a_checked_model"
    ),
    "kiln compress run=runs/train/<run> compress=auto compress.max_metric_drop=0.5": (
        "tests/compression/test_compress_e2e.py::test_auto_tries_every_candidate_and_ships_the_fastest_within_budget"
    ),
    # the demo experiments, as written (the test checks they reach 0.97 test accuracy); the
    # help's and README's variants differ only in trainer.max_epochs
    "kiln train experiment=digits_cnn": DEMO_EXPERIMENTS,
    "kiln train experiment=digits_cnn trainer.max_epochs=50": DEMO_EXPERIMENTS,
    "kiln train experiment=penguins_mlp": DEMO_EXPERIMENTS,
    "kiln train experiment=penguins_mlp trainer.max_epochs=50": DEMO_EXPERIMENTS,
    "kiln train run_dir=runs/train/<run> resume=auto": (
        "tests/test_resume.py::test_killed_mid_epoch_then_resumed_matches_an_uninterrupted_run"
    ),
    "kiln train -m model.optimizer.lr=1e-3,3e-3,1e-2 model.net.dropout=0.1,0.3": (  # a grid: the same sweep
        "tests/test_cli.py::test_multirun_sweeps_two_jobs_into_two_run_directories"
    ),
    # the same search with sampler=random and one trial runs here
    "kiln search hparams_search=digits_cnn": "tests/test_readme_commands.py::test_the_documented_command_runs",
}
# SLURM: composed here; submitted to a real cluster by these tests (marker slurm).
SLURM_TESTS = (
    "tests/test_slurm.py::test_sweep_of_two_configs_runs_as_a_job_array_and_returns_both",
    "tests/test_slurm.py::test_search_workers_as_slurm_jobs_share_one_study_in_mariadb",
)
# Placeholders a documented command may hold, and how they are made real (see Workspace.resolve).
PLACEHOLDERS = ("<run>", "<sweep>", "path/to/last.ckpt", "rows.csv")


def is_slurm(command: Documented) -> bool:
    return "hydra/launcher=slurm" in command.args


def is_hydra_flag_only(command: Documented) -> bool:
    return any(arg in ("--help", "--cfg", "--info") for arg in command.args)


def node_exists(node: str) -> bool:
    path, _, name = node.partition("::")
    file = ROOT / path
    if not file.is_file():
        return False
    functions = {n.name for n in ast.walk(ast.parse(file.read_text())) if isinstance(n, ast.FunctionDef)}
    return name.split("[")[0] in functions


def unresolved(command: Documented) -> list[str]:
    """Words of the command that look like a placeholder this file cannot make real."""
    text = command.text
    for placeholder in PLACEHOLDERS:
        text = text.replace(placeholder, "")
    return re.findall(r"<[^>]*>", text)


# -- the tests ------------------------------------------------------------------------------------


def test_every_documented_command_is_covered():
    commands = documented_commands()
    assert len(commands) >= 20, [c.text for c in commands]
    assert "kiln export run=runs/train/<run>" in {c.text for c in commands}
    assert any(c.shown for c in commands), "the README's `$ kiln ...` example and its output"
    uncovered = [
        c.text
        for c in commands
        if c.text not in COVERED_ELSEWHERE
        and (c.stage not in RUNNERS or unresolved(c))
        and not (c.stage == "" and c.args == ("--help",))
    ]
    assert uncovered == [], "documented commands that no test runs: run them here or name the test"
    texts = {c.text for c in commands}
    stale = [key for key in [*SHORTER, *COVERED_ELSEWHERE] if key not in texts]
    assert stale == [], "entries for commands the documentation no longer shows"
    for node in [*COVERED_ELSEWHERE.values(), *SLURM_TESTS]:
        assert node_exists(node), node


def test_the_help_examples_and_the_readme_are_parsed():
    texts = {c.text for c in documented_commands()}
    for line in help_commands():
        assert line.text in texts
    assert "kiln train --cfg job" in texts and "kiln train --info" in texts  # `--help | --cfg job | --info`
    assert "kiln train: error:" not in " ".join(texts)  # output lines are not commands


@dataclass
class Workspace:
    """A temp directory in which placeholders become real files."""

    root: Path
    penguins_run: Path
    made: dict[str, Path] = field(default_factory=dict)

    def run(self, name: str = "penguins") -> Path:
        """A private copy of the trained penguins run at runs/train/<name>."""
        if name not in self.made:
            target = self.root / "runs" / "train"
            target.mkdir(parents=True, exist_ok=True)
            copied = copy_run(self.penguins_run, target)
            self.made[name] = copied.rename(target / name)
        return self.made[name]

    def resolve(self, command: Documented) -> list[str]:
        text = command.text
        if "runs/train/<run>/model.onnx" in text:
            shutil.copy2(exported_run(self.penguins_run) / "model.onnx", self.run() / "model.onnx")
        if "<sweep>" in text:
            sweep = self.root / "runs" / "train_multirun" / "sweep"
            for job in ("0", "1"):
                shutil.copytree(self.penguins_run, sweep / job, ignore=shutil.ignore_patterns("tensorboard"))
        if "path/to/last.ckpt" in text:
            target = self.root / "path" / "to" / "last.ckpt"
            target.parent.mkdir(parents=True)
            shutil.copy2(self.penguins_run / "checkpoints" / "last.ckpt", target)
        if "input=rows.csv" in text:
            penguin_rows(self.root / "rows.csv")
        names = {"<run>": self.run().name if "<run>" in text else "", "<sweep>": "sweep"}
        argv = []
        for arg in command.argv:
            for placeholder, name in names.items():
                arg = arg.replace(placeholder, name)
            argv.append(arg)
        return argv


_exported: dict[Path, Path] = {}


def exported_run(penguins_run: Path) -> Path:
    """The README's `kiln export run=runs/train/<run>`, run once on a copy of the penguins run
    (its test checks what it left; predict serves its model.onnx)."""
    if penguins_run not in _exported:
        base = penguins_run.parent.parent.parent.parent / "readme-exported"
        shutil.rmtree(base, ignore_errors=True)
        (base / "runs" / "train").mkdir(parents=True)
        copy_run(penguins_run, base / "runs" / "train").rename(base / "runs" / "train" / "penguins")
        (command,) = [c for c in documented_commands() if c.stage == "export"]
        args = [arg.replace("<run>", "penguins") for arg in command.argv]
        result = run_kiln([*args, *DEFAULT_SHORTER["export"]], base)
        assert result.returncode == 0, result.stderr
        _exported[penguins_run] = base / "runs" / "train" / "penguins"
    return _exported[penguins_run]


def penguin_rows(path: Path) -> None:
    import pandas as pd
    from palmerpenguins import load_penguins

    pd.concat([load_penguins()] * 2, ignore_index=True).to_csv(path, index=False)


def shorter(command: Documented) -> list[str]:
    if command.text in SHORTER:
        return SHORTER[command.text]
    if is_hydra_flag_only(command):
        return []
    return DEFAULT_SHORTER.get(command.stage, [])


def new_runs(root: Path) -> list[Path]:
    return sorted(p.parent for p in (root / "runs").rglob("run.json") if "readme" not in p.parts)


def check_train(command: Documented, result: subprocess.CompletedProcess[str], space: Workspace) -> None:
    if "--cfg" in command.args:
        assert "trainer:" in result.stdout and not (space.root / "runs").exists()
        return
    if "--help" in command.args or "--info" in command.args:
        assert result.stdout.strip()
        return
    runs = [
        run for run in new_runs(space.root) if run not in space.made.values() or "resume=" in command.text
    ]
    if command.stage == "search":
        (search,) = (space.root / "runs" / "search").iterdir()
        assert (search / "search.json").is_file(), result.stdout
        return
    assert runs, f"no run directory under {space.root / 'runs'}"
    expected = 2 if "-m" in command.args else 1
    assert len(runs) >= expected
    for run in runs:
        assert read_run(run)["status"] == "completed", run
        assert (run / "checkpoints" / "best.ckpt").is_file()


def check_delivered(command: Documented, result: subprocess.CompletedProcess[str], space: Workspace) -> None:
    run = space.run() if command.stage == "compress" else exported_run(space.penguins_run)
    assert (run / "model.onnx").is_file() and (run / "report.json").is_file()
    assert read_run(run)["delivery"]["status"] == "passed"


def check_predict(command: Documented, result: subprocess.CompletedProcess[str], space: Workspace) -> None:
    output = next(arg.split("=", 1)[1] for arg in command.argv if arg.startswith("output="))
    lines = (space.root / output).read_text().splitlines()
    assert lines[0].startswith("prediction,probability_") and len(lines) > 100
    assert (space.root / output).with_suffix(".drift.json").is_file()


def check_report(command: Documented, result: subprocess.CompletedProcess[str], space: Workspace) -> None:
    assert (space.root / "runs" / "train_multirun" / "sweep" / "runs.md").is_file()


RUNNERS = {
    "": lambda command, result, space: None,  # kiln --help: the stages are listed (checked below)
    "train": check_train,
    "search": check_train,
    "compress": check_delivered,
    "export": check_delivered,
    "predict": check_predict,
    "report": check_report,
    "tensorboard": None,  # a server: started and stopped (run_server)
}


def run_server(command: Documented, args: list[str], cwd: Path) -> None:
    """Start it, wait for the line with its address, stop it as a user does (Ctrl-C)."""
    process = subprocess.Popen(
        kiln_command(*args), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = Output(process.stdout)
    try:
        wait_for(
            lambda: output.search(r"kiln tensorboard: http://127\.0\.0\.1:\d+ \(Ctrl-C stops it\)"),
            f"the address from {command.text}",
            timeout=120,
            process=process,
            output=output,
        )
        process.send_signal(2)
        assert process.wait(timeout=60) == 0, output.finish()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def compose_slurm(command: Documented, cwd: Path) -> None:
    """A SLURM command composed, not submitted: `-m` becomes `--cfg hydra` (Hydra takes one of
    them), each sweep its first value; the launcher must be submitit's SLURM one with the settings."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [arg for arg in command.argv[1:] if arg != "-m"]
    parsed = OverridesParser.create().parse_overrides(overrides)
    single = [
        f"{o.get_key_element()}={next(o.sweep_string_iterator())}" if o.is_sweep_override() else text
        for o, text in zip(parsed, overrides, strict=True)
    ]
    result = run_kiln([command.stage, "--cfg", "hydra", *single], cwd)
    assert result.returncode == 0, result.stderr
    assert "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in result.stdout
    for override in single:
        if override.lstrip("+").startswith("hydra.launcher.") and "{" not in override:
            key, value = override.lstrip("+").removeprefix("hydra.launcher.").split("=", 1)
            key = key.rsplit(".", 1)[-1]
            assert re.search(rf"^\s+{re.escape(key)}: {re.escape(value)}$", result.stdout, re.M), override


RUN_HERE = [c for c in documented_commands() if c.text not in COVERED_ELSEWHERE]


@pytest.mark.slow
@pytest.mark.parametrize("command", RUN_HERE, ids=[c.text.removeprefix("kiln ")[:60] for c in RUN_HERE])
def test_the_documented_command_runs(command: Documented, tmp_path: Path, request: pytest.FixtureRequest):
    needs_run = (
        any(placeholder in command.text for placeholder in PLACEHOLDERS) or command.stage == "tensorboard"
    )
    space = Workspace(tmp_path, request.getfixturevalue("penguins_run") if needs_run else tmp_path)
    if is_slurm(command):
        compose_slurm(command, tmp_path)
        return
    if command.stage == "export":  # run once, on its own copy: predict serves what it ships
        RUNNERS["export"](command, None, space)  # type: ignore[misc]
        return
    args = [*space.resolve(command), *shorter(command)]
    if command.stage in ("train", "search") and not is_hydra_flag_only(command):
        args.append(f"paths.output_dir={tmp_path / 'runs'}")
    if command.stage == "tensorboard":
        if args[1] == "dir=runs/train":
            space.run()  # something to serve
        run_server(command, args, tmp_path)
        return
    result = run_kiln(args, tmp_path)
    if command.shown:  # the documentation shows what it prints: exactly that
        assert result.stdout.strip() + result.stderr.strip() == command.shown
        assert result.returncode == (2 if ": error:" in command.shown else 0)
        return
    assert result.returncode == 0, f"{' '.join(args)}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    if command.stage == "":
        from kiln.cli import STAGES

        assert all(name in result.stdout for name in STAGES)
        return
    RUNNERS[command.stage](command, result, space)  # type: ignore[misc]
