"""logger=mlflow against a real MLflow tracking server (kiln.tracking), checked through the
server's REST API: what a person opening the MLflow UI would see.

A session-scoped `mlflow server` (sqlite backend, artifacts served by the server) is started on a
free port and waited for on /health; every test uses its own experiment."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kilntest import ROOT, read_run, run_kiln, wait_for

requests = pytest.importorskip("requests")
pytest.importorskip("mlflow")

SECRET = "SECRETMARK"
TINY = [
    "data=digits",
    "model=mlp",
    "model.net.hidden_sizes=[16]",
    "trainer.max_epochs=2",
    "progress=lines",
]
NO_EXPORT = ["compress=none", "export.after_training=false"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on a free port, answering on /health; stopped (its process group) at the end."""
    home = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = (home / "server.log").open("w")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{home / 'mlflow.db'}",
            "--artifacts-destination",
            str(home / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=home,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the workers it starts end with it
    )
    uri = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return requests.get(f"{uri}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_for(answers, "the MLflow server to answer on /health", process=server)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


# -- the REST API, as the UI uses it --------------------------------------------------------------


def api(uri: str, endpoint: str, **params: Any) -> dict[str, Any]:
    answer = requests.get(f"{uri}/api/2.0/mlflow/{endpoint}", params=params, timeout=30)
    assert answer.status_code == 200, f"{endpoint}: HTTP {answer.status_code} {answer.text[:300]}"
    result: dict[str, Any] = answer.json()
    return result


def runs_of(uri: str, experiment: str, filter_string: str = "") -> list[dict[str, Any]]:
    experiment_id = api(uri, "experiments/get-by-name", experiment_name=experiment)["experiment"][
        "experiment_id"
    ]
    answer = requests.post(
        f"{uri}/api/2.0/mlflow/runs/search",
        json={"experiment_ids": [experiment_id], "filter": filter_string, "max_results": 100},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text[:300]
    runs: list[dict[str, Any]] = answer.json().get("runs", [])
    return runs


def tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def params(run: dict[str, Any]) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    metrics = api(uri, "metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])
    return sorted((int(m["step"]), float(m["value"])) for m in metrics)


# -- training in this process -------------------------------------------------------------------


@contextmanager
def captured(path: Path) -> Iterator[None]:
    """Everything this process writes to stdout and stderr (Python's streams and the file
    descriptors under them) goes to `path` for the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = os.dup(1), os.dup(2)
    saved_streams = sys.stdout, sys.stderr
    with path.open("wb") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        stream = io.TextIOWrapper(os.fdopen(os.dup(1), "wb"), write_through=True)
        sys.stdout = sys.stderr = stream
        try:
            yield
        finally:
            stream.flush()
            sys.stdout, sys.stderr = saved_streams
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)
            stream.close()


def train_in_process(output_dir: Path, *overrides: str) -> tuple[Path, Any]:
    """`kiln train <overrides>` in this process (kiln.config.compose and the stage's `call`)."""
    from hydra.core.hydra_config import HydraConfig

    from kiln.config import compose
    from kiln.stages import train as train_stage

    cfg = compose("train", [f"paths.output_dir={output_dir}", *overrides])
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    return run_dir, train_stage.main.call(cfg)


def tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return sorted((int(e.step), float(e.value)) for e in events.Scalars(tag))


@pytest.fixture(scope="module")
def tracked(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run with export and a registered model, sent to the server through a URI holding a
    password; its stdout and stderr kept."""
    home = tmp_path_factory.mktemp("tracked")
    uri_with_password = mlflow_server.replace("http://", f"http://kiln:{SECRET}@")
    output = home / "output.txt"
    with captured(output):
        run_dir, _ = train_in_process(
            home / "runs",
            *TINY,
            "compress=none",
            "export.latency_repeats=3",
            "logger=mlflow",
            f"logger.tracking_uri={uri_with_password}",
            "logger.experiment_name=tracked",
            "logger.register_model=tiny-digits",
        )
    (run,) = runs_of(mlflow_server, "tracked")
    return {"run_dir": run_dir, "run": run, "output": output.read_bytes(), "uri": mlflow_server}


@pytest.mark.slow
def test_a_run_shows_its_config_metrics_tags_artifacts_and_model_version(tracked: dict[str, Any]) -> None:
    uri, run, run_dir = tracked["uri"], tracked["run"], tracked["run_dir"]
    record = read_run(run_dir)
    assert record["mlflow"]["run_id"] == run["info"]["run_id"]
    assert run["info"]["status"] == "FINISHED"
    assert run["info"]["run_name"] == run_dir.name

    shown = params(run)
    assert shown["trainer.max_epochs"] == "2"
    assert shown["model.net.hidden_sizes"] == "[16]"
    assert shown["monitor.metric"] == "val/loss"
    assert shown["logger.tracking_uri"] == tracked["uri"].replace("http://", "http://kiln:***@")

    # the epoch curve MLflow shows is TensorBoard's, point for point
    tensorboard = tensorboard_scalars(run_dir, "val/loss")
    assert len(tensorboard) == 2
    shown_curve = history(uri, run["info"]["run_id"], "val/loss")
    assert [step for step, _ in shown_curve] == [step for step, _ in tensorboard]
    assert [value for _, value in shown_curve] == pytest.approx([value for _, value in tensorboard], rel=1e-6)
    latest = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    for name, value in record["test_metrics"].items():
        assert latest[name] == pytest.approx(value, rel=1e-6), name

    seen = tags(run)
    assert seen["kiln.git_commit"] == record["git"]["commit"]
    assert seen["kiln.git_dirty"] == str(record["git"]["dirty"])
    assert seen["kiln.config_hash"] == record["config_hash"]
    assert seen["kiln.data_fingerprint"] == record["data_fingerprint"]
    assert seen["kiln.version"] == record["versions"]["kiln"]
    assert seen["kiln.status"] == "completed"
    assert "mlflow.parentRunId" not in seen

    files = {f["path"] for f in api(uri, "artifacts/list", run_id=run["info"]["run_id"])["files"]}
    assert {"run.json", "report.md", "report.png", "model.onnx"} <= files
    served = requests.get(
        f"{uri}/get-artifact", params={"run_id": run["info"]["run_id"], "path": "model.onnx"}, timeout=30
    )
    assert served.content == (run_dir / "model.onnx").read_bytes()

    assert api(uri, "registered-models/get", name="tiny-digits")["registered_model"]["name"] == "tiny-digits"
    (version,) = api(uri, "model-versions/search", filter="name='tiny-digits'")["model_versions"]
    assert version["run_id"] == run["info"]["run_id"]
    assert version["source"].endswith("/model.onnx")


def test_the_password_in_the_uri_is_written_and_printed_nowhere(tracked: dict[str, Any]) -> None:
    assert b"kiln" in tracked["output"]  # the output was captured
    assert SECRET.encode() not in tracked["output"]
    leaks = [p for p in tracked["run_dir"].rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == []
    assert SECRET not in str(tracked["run"])  # nor in what the server holds


@pytest.mark.slow
def test_cross_validation_folds_are_nested_under_one_parent(mlflow_server: str, tmp_path: Path) -> None:
    run_dir, _ = train_in_process(
        tmp_path / "runs",
        *TINY,
        *NO_EXPORT,
        "trainer.max_epochs=1",
        "cv.folds=2",
        "logger=mlflow",
        f"logger.tracking_uri={mlflow_server}",
        "logger.experiment_name=cv",
    )
    runs = runs_of(mlflow_server, "cv")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in tags(r)]
    children = [r for r in runs if tags(r).get("mlflow.parentRunId") == parent["info"]["run_id"]]
    assert sorted(r["info"]["run_name"] for r in children) == ["fold_0", "fold_1"]
    assert all(r["info"]["status"] == "FINISHED" for r in [parent, *children])
    assert tags(parent)["kiln.kind"] == "cross-validation"
    means = {m["key"] for m in parent["data"]["metrics"]}
    assert "mean/test/acc" in means and "std/test/acc" in means
    files = {
        f["path"] for f in api(mlflow_server, "artifacts/list", run_id=parent["info"]["run_id"])["files"]
    }
    assert "cv.json" in files
    for child in children:
        assert read_run(run_dir / child["info"]["run_name"])["mlflow"]["run_id"] == child["info"]["run_id"]


@pytest.mark.slow
def test_search_trials_are_nested_under_one_parent(mlflow_server: str, tmp_path: Path) -> None:
    from hydra.core.hydra_config import HydraConfig

    from kiln.config import compose
    from kiln.stages import search

    cfg = compose(
        "search",
        [
            f"paths.output_dir={tmp_path / 'runs'}",
            *TINY,
            *NO_EXPORT,
            "trainer.max_epochs=1",
            'search.params={model.optimizer.lr:"choice(0.01,0.001)"}',
            "search.n_trials=2",
            "logger=mlflow",
            f"logger.tracking_uri={mlflow_server}",
            "logger.experiment_name=search",
        ],
    )
    search_dir = Path(HydraConfig.get().runtime.output_dir)
    search.main.call(cfg)
    runs = runs_of(mlflow_server, "search")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in tags(r)]
    children = [r for r in runs if tags(r).get("mlflow.parentRunId") == parent["info"]["run_id"]]
    assert sorted(r["info"]["run_name"] for r in children) == ["trial_000", "trial_001"]
    assert {params(r)["model.optimizer.lr"] for r in children} <= {"0.01", "0.001"}
    assert tags(parent)["kiln.kind"] == "search"
    assert all(r["info"]["status"] == "FINISHED" for r in [parent, *children])
    files = {
        f["path"] for f in api(mlflow_server, "artifacts/list", run_id=parent["info"]["run_id"])["files"]
    }
    assert "search.json" in files
    assert (search_dir / "search.json").is_file()


def test_an_unreachable_server_is_one_line_before_anything_is_written(tmp_path: Path) -> None:
    from kiln.errors import KilnError

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(KilnError) as raised:
        train_in_process(tmp_path / "runs", *TINY, *NO_EXPORT, "logger=mlflow", f"logger.tracking_uri={uri}")
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"logger.tracking_uri={uri}: no MLflow tracking server answers there")
    assert "mlflow server" in message and "logger=tensorboard" in message
    assert not list((tmp_path / "runs").rglob("run.json"))
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


@pytest.mark.slow
def test_cli_unreachable_server_exits_with_one_line(tmp_path: Path) -> None:
    uri = f"http://kiln:{SECRET}@127.0.0.1:{free_port()}"
    result = run_kiln(
        [
            "train",
            f"paths.output_dir={tmp_path / 'runs'}",
            *TINY,
            *NO_EXPORT,
            "logger=mlflow",
            f"logger.tracking_uri={uri}",
        ],
        tmp_path,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kiln train: error: logger.tracking_uri=http://127.0.0.1:")
    assert SECRET not in result.stdout + result.stderr
    assert not list(tmp_path.rglob("run.json"))


@pytest.mark.slow
def test_cli_sweep_is_nested_under_one_parent_run(mlflow_server: str, tmp_path: Path) -> None:
    result = run_kiln(
        [
            "train",
            "-m",
            "seed=1,2",
            f"paths.output_dir={tmp_path / 'runs'}",
            *TINY,
            *NO_EXPORT,
            "trainer.max_epochs=1",
            "logger=mlflow",
            f"logger.tracking_uri={mlflow_server}",
            "logger.experiment_name=sweep",
        ],
        ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    runs = runs_of(mlflow_server, "sweep")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in tags(r)]
    children = [r for r in runs if tags(r).get("mlflow.parentRunId") == parent["info"]["run_id"]]
    assert sorted(params(r)["seed"] for r in children) == ["1", "2"]
    assert tags(parent)["kiln.kind"] == "sweep"
    assert all(r["info"]["status"] == "FINISHED" for r in [parent, *children])


def test_a_store_mlflow_cannot_open_is_one_line(tmp_path: Path) -> None:
    from kiln import tracking
    from kiln.config import compose
    from kiln.errors import KilnError

    cfg = compose(
        "train",
        [f"paths.output_dir={tmp_path}", "logger=mlflow", f"logger.tracking_uri=file:{tmp_path}/mlruns"],
    )
    with pytest.raises(
        KilnError, match=rf"^logger\.tracking_uri=file:{tmp_path}/mlruns: MLflow cannot open it"
    ) as raised:
        tracking.check_server(cfg)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("http://127.0.0.1:5000", ("http://127.0.0.1:5000", None, None)),
        ("https://me:p%40ss/w@host:443/mlflow", ("https://host:443/mlflow", "me", "p@ss/w")),
        ("http://me@host", ("http://host", "me", None)),
        ("sqlite:///runs/mlflow.db", ("sqlite:///runs/mlflow.db", None, None)),
    ],
)
def test_credentials_are_taken_out_of_the_uri(uri: str, expected: tuple[Any, ...]) -> None:
    from kiln.tracking import split_credentials

    assert split_credentials(uri) == expected


# -- git provenance: what run.json records, nothing of kiln's own checkout ---------------------------


@pytest.fixture
def fresh_git_context() -> Iterator[None]:
    """MLflow reads git once a process (its GitRunContext caches it): read again in the test and
    after it."""
    from mlflow.tracking.context.git_context import GitRunContext
    from mlflow.tracking.context.registry import _run_context_provider_registry

    def forget() -> None:
        for provider in _run_context_provider_registry:
            if isinstance(provider, GitRunContext):
                provider._cache.clear()

    forget()
    yield
    forget()


@pytest.mark.slow
def test_a_project_outside_git_gets_no_git_tags_of_kilns_checkout(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_git_context: None
) -> None:
    """run.json records no commit for a project outside git (kiln.runs.git_state finds none, as
    for kiln installed from a wheel). MLflow reads git from where the program lives (sys.argv[0]:
    here a script in a git checkout of its own, as `python -m kiln` from kiln's checkout is); the
    run shows what run.json records, so no git tag at all."""
    from kiln import runs

    checkout = tmp_path / "kiln-checkout"
    checkout.mkdir()
    (checkout / "__main__.py").write_text("# the program MLflow sees\n")
    for command in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "kiln"]):
        git = ["git", "-c", "user.name=k", "-c", "user.email=k@example.com", *command]
        subprocess.run(git, cwd=checkout, check=True, capture_output=True)
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.setattr(
        runs, "git_state", lambda directory: {"commit": None, "dirty": None, "repository": None}
    )
    monkeypatch.setattr(sys, "argv", [str(checkout / "__main__.py"), "train"])
    run_dir, _ = train_in_process(
        tmp_path / "runs",
        *TINY,
        *NO_EXPORT,
        "logger=mlflow",
        f"logger.tracking_uri={mlflow_server}",
        "logger.experiment_name=outside-git",
    )
    assert read_run(run_dir)["git"]["commit"] is None
    (run,) = runs_of(mlflow_server, "outside-git")
    assert tags(run)["kiln.status"] == "completed"  # the tags were read
    assert sorted(key for key in tags(run) if "git" in key) == []


@pytest.mark.parametrize(
    ("mlflow_commit", "recorded", "stray"),
    [
        ("abc", "abc", []),  # MLflow's tags describe the recorded commit: kept
        ("kiln", "abc", ["mlflow.source.git.commit", "mlflow.source.git.branch"]),  # another repository
        (None, None, ["mlflow.source.git.branch"]),  # a branch of kiln's checkout, no commit
    ],
)
def test_mlflow_git_tags_are_kept_only_for_the_recorded_commit(
    mlflow_commit: str | None, recorded: str | None, stray: list[str]
) -> None:
    from kiln.tracking import stray_git_tags

    found = {"mlflow.source.git.branch": "main", "mlflow.user": "me"}
    if mlflow_commit:
        found["mlflow.source.git.commit"] = mlflow_commit
    assert stray_git_tags(found, {"git": {"commit": recorded}}) == stray
