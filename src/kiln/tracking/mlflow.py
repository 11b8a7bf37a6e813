"""logger=mlflow: each run is sent to an MLflow tracking server as well (a tracker: kiln.tracking).

    kiln train experiment=digits_cnn logger=mlflow logger.tracking_uri=http://127.0.0.1:5000
    kiln train -m seed=1,2,3 logger=mlflow logger.tracking_uri=...      three runs under one parent
    kiln train logger=mlflow logger.tracking_uri=... logger.register_model=digits   + a model version

What a run sends (rank 0 only; TensorBoard's logs stay in <run_dir>/tensorboard as before):
the resolved config, flattened, as params (passwords masked); every epoch metric at the step
TensorBoard has it, and the test metrics (Lightning hands both loggers the same values); tags from
run.json (git commit and dirty flag, config hash, data fingerprint, kiln version, SLURM job id);
and, once the run is complete (kiln.tracking.finish_run), run.json, report.md/png/json and the
shipped model.onnx as artifacts, model.onnx registered as a version of `logger.register_model`.

Runs of one sweep (`-m`, the Hydra callback `ParentRun`), one search (`kiln search`) or one
cross-validation (`cv.folds`) are nested under one parent run: the parent's id travels to the
runs in the environment variable KILN_MLFLOW_PARENT_RUN_ID (a SLURM job inherits it).

The server is checked before anything trains (`check_server`): one line naming
logger.tracking_uri when it does not answer. A password in the URI (http://user:pw@host) never
reaches MLflow's own URI, its messages or any file: it is handed to MLflow as
MLFLOW_TRACKING_USERNAME/PASSWORD, and the URI is recorded without it.

mlflow is imported only when logger=mlflow (it costs about a second).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from kiln.errors import KilnError
from kiln.runs import RunLayout
from kiln.tracking.base import RunInfo, default_experiment

TRACKER = "kiln.tracking.mlflow.MLflowTracker"  # conf/logger/mlflow.yaml's trackers.mlflow
BUILDER = "kiln.tracking.tensorboard_and_mlflow"  # its _target_ before trackers (saved runs)
PARENT_RUN_VARIABLE = "KILN_MLFLOW_PARENT_RUN_ID"
RECORD_KEY = "mlflow"  # run.json: {"run_id", "experiment_id", "experiment", "tracking_uri"}
MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"
MLFLOW_GIT_TAGS = (MLFLOW_GIT_COMMIT, "mlflow.source.git.branch", "mlflow.source.git.repoURL")
_STATUS = {"completed": "FINISHED", "pruned": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}
_checked: set[str] = set()  # tracking URIs that answered in this process


@dataclasses.dataclass(frozen=True)
class Settings:
    """logger=mlflow's settings, the URI split from its credentials."""

    tracking_uri: str  # without credentials: what MLflow, messages and records see
    experiment: str
    register_model: str | None
    username: str | None = dataclasses.field(default=None, repr=False)
    password: str | None = dataclasses.field(default=None, repr=False)

    @property
    def is_http(self) -> bool:
        return self.tracking_uri.startswith(("http://", "https://"))


# -- settings ------------------------------------------------------------------------------------


def settings(cfg: Any) -> Settings | None:
    """The MLflow settings of a composed config; None unless its logger is logger=mlflow."""
    from omegaconf import OmegaConf

    node = OmegaConf.select(cfg, "logger", default=None)
    if not uses_mlflow(node):
        return None
    uri = OmegaConf.select(node, "tracking_uri", default=None)
    if not uri:
        raise KilnError(
            "logger.tracking_uri: logger=mlflow needs the tracking server, e.g. "
            "logger.tracking_uri=http://127.0.0.1:5000 (or sqlite:///mlflow.db), or set MLFLOW_TRACKING_URI"
        )
    clean, username, password = split_credentials(str(uri))
    experiment = OmegaConf.select(node, "experiment_name", default=None) or default_experiment(cfg)
    register = OmegaConf.select(node, "register_model", default=None)
    return Settings(clean, str(experiment), str(register) if register else None, username, password)


def uses_mlflow(node: Any) -> bool:
    """Whether a logger config names the MLflow tracker (or is a saved run's logger=mlflow)."""
    from omegaconf import OmegaConf

    if node is None:
        return False
    trackers = OmegaConf.select(node, "trackers", default=None) or {}
    named = {OmegaConf.select(tracker, "_target_", default=None) for tracker in trackers.values() if tracker}
    return TRACKER in named or OmegaConf.select(node, "_target_", default=None) == BUILDER


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """`http://user:pw@host:5000/x` -> (`http://host:5000/x`, user, pw); other URIs unchanged."""
    from urllib.parse import unquote

    scheme, separator, rest = uri.partition("://")
    if not separator or "@" not in rest:
        return uri, None, None
    userinfo, _, host = rest.rpartition("@")  # the last '@': a password may hold '@' or '/'
    if "/" in userinfo and ":" not in userinfo:  # an '@' in the path, not credentials
        return uri, None, None
    username, _, password = userinfo.partition(":")
    return f"{scheme}://{host}", unquote(username) or None, unquote(password) or None


def _use_credentials(found: Settings) -> None:
    """MLflow reads basic-auth credentials from these variables (unless the user set them)."""
    if found.username is not None:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", found.username)
    if found.password is not None:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", found.password)


# -- the server ----------------------------------------------------------------------------------


def check_server(cfg: Any) -> Settings | None:
    """logger=mlflow: the tracking server answers, or one KilnError naming logger.tracking_uri.
    Checked once per URI and process, before anything trains."""
    found = settings(cfg)
    if found is None:
        return None
    _use_credentials(found)
    if found.tracking_uri in _checked:
        return found
    if found.is_http:
        _check_http(found)
    else:
        try:
            client(found).search_experiments(max_results=1)
        except Exception as exc:
            raise KilnError(
                f"logger.tracking_uri={found.tracking_uri}: MLflow cannot open it "
                f"({type(exc).__name__}: {_first_line(exc)}); give a writable sqlite:///path/mlflow.db, "
                "or the http:// address of a tracking server"
            ) from exc
    _checked.add(found.tracking_uri)
    return found


def _check_http(found: Settings) -> None:
    import requests

    uri = found.tracking_uri.rstrip("/")
    auth = (found.username or "", found.password or "") if found.username or found.password else None
    fix = (
        "start the server (mlflow server --host 127.0.0.1 --port 5000) or give the address of a "
        "running one, or train without it (logger=tensorboard)"
    )
    try:
        answer = requests.get(f"{uri}/health", timeout=10, auth=auth)
    except requests.RequestException as exc:
        reason = "connection refused" if isinstance(exc, requests.ConnectionError) else type(exc).__name__
        raise KilnError(
            f"logger.tracking_uri={found.tracking_uri}: no MLflow tracking server answers there ({reason}); {fix}"
        ) from None
    if answer.status_code in (401, 403):
        raise KilnError(
            f"logger.tracking_uri={found.tracking_uri}: the server refused the credentials (HTTP "
            f"{answer.status_code}); give them as http://USER:PASSWORD@host or in MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD"
        )
    if answer.status_code != 200:
        raise KilnError(
            f"logger.tracking_uri={found.tracking_uri}: answered HTTP {answer.status_code} on /health, "
            f"so it is no MLflow tracking server; {fix}"
        )


def client(found: Settings) -> Any:
    from mlflow.tracking import MlflowClient

    _use_credentials(found)
    return MlflowClient(found.tracking_uri)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else ""


def experiment_id(mlflow_client: Any, name: str) -> str:
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage != "deleted":
        return str(experiment.experiment_id)
    try:
        return str(mlflow_client.create_experiment(name))
    except Exception:  # created by another job of the sweep meanwhile
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return str(experiment.experiment_id)


# -- the loggers ---------------------------------------------------------------------------------


def tensorboard_and_mlflow(
    save_dir: str,
    tracking_uri: str | None = None,
    experiment_name: str | None = None,
    run_name: str | None = None,
    register_model: str | None = None,
    name: str = RunLayout.TENSORBOARD,
    version: str = "",
    default_hp_metric: bool = False,
    log_graph: bool = False,
    run_id: str | None = None,
) -> list[Any]:
    """A saved run's logger=mlflow from before trackers (a config may still name it; kiln builds
    MLflowTracker instead): TensorBoard exactly as logger=tensorboard, and MLflow beside it
    (Lightning's MLFlowLogger; kiln ends its run once the run is complete, `finish_run`).
    `run_id` is the MLflow run of a run being resumed (from its run.json)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    tensorboard = TensorBoardLogger(
        save_dir=save_dir,
        name=name,
        version=version,
        default_hp_metric=default_hp_metric,
        log_graph=log_graph,
    )
    if not tracking_uri:
        raise KilnError(
            "logger.tracking_uri: logger=mlflow needs the tracking server, e.g. http://127.0.0.1:5000"
        )
    clean, username, password = split_credentials(tracking_uri)
    _use_credentials(Settings(clean, "", None, username, password))
    mlflow = kiln_mlflow_logger(
        experiment_name=experiment_name or default_experiment(None),
        run_name=run_name or Path(save_dir).name,
        tracking_uri=clean,
        run_id=run_id,
    )
    return [tensorboard, mlflow]  # TensorBoard first: trainer.logger stays the writer kiln's extras use


@functools.cache
def _mlflow_logger_class() -> type:
    from lightning.pytorch.loggers import MLFlowLogger

    class _KilnMLFlowLogger(MLFlowLogger):
        """Lightning's MLFlowLogger, nested under the parent run of the environment, and left
        open when Lightning finishes fitting and testing: kiln ends the run once its record and
        the shipped model are complete (`finish_run`). A failure Lightning sees ends it at once."""

        def __init__(self, **kwargs: Any) -> None:
            parent = os.environ.get(PARENT_RUN_VARIABLE)
            tags = {"mlflow.parentRunId": parent} if parent and not kwargs.get("run_id") else None
            super().__init__(tags=tags, **kwargs)

        def finalize(self, status: str = "success") -> None:
            if status == "failed":
                super().finalize(status)

    return _KilnMLFlowLogger


def kiln_mlflow_logger(**kwargs: Any) -> Any:  # the class is made on first use: mlflow imports late
    return _mlflow_logger_class()(**kwargs)


def previous_run_id(record: Mapping[str, Any]) -> str | None:
    """The MLflow run of a run directory's earlier attempt, continued when it is resumed."""
    info = record.get(RECORD_KEY)
    return str(info["run_id"]) if isinstance(info, dict) and info.get("run_id") else None


# -- one run -------------------------------------------------------------------------------------


class MLflowTracker:
    """One kiln run as one MLflow run (kiln.tracking.base.Tracker). Lightning's MLFlowLogger sends
    the metrics; `start` adds the params and provenance tags and names the run in run.json,
    `log_artifacts` sends the run's files, `finish` the best score, the model version, the status.

    `run_dir`, `previous_record` (run.json before this attempt, {} for a new run) and `experiment` (the
    default experiment's name: the experiment= choice, else kiln-<task_name>) come from kiln. A resumed run continues
    its MLflow run when it was on the same server."""

    def __init__(
        self,
        run_dir: str,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        run_name: str | None = None,
        register_model: str | None = None,
        previous_record: Mapping[str, Any] | None = None,
        experiment: str | None = None,
    ) -> None:
        if not tracking_uri:
            raise KilnError(
                "logger.tracking_uri: logger=mlflow needs the tracking server, e.g. "
                "logger.tracking_uri=http://127.0.0.1:5000 (or sqlite:///mlflow.db), or set MLFLOW_TRACKING_URI"
            )
        clean, username, password = split_credentials(tracking_uri)
        self.found = Settings(
            clean,
            experiment_name or experiment or default_experiment(None),
            register_model,
            username,
            password,
        )
        _use_credentials(self.found)
        self.run_dir = Path(run_dir)
        record = previous_record or {}
        earlier = record.get(RECORD_KEY) or {}
        same_server = isinstance(earlier, dict) and earlier.get("tracking_uri") == clean
        self.run_id = previous_run_id(record) if same_server else None  # else a new run on this server
        self.logger = kiln_mlflow_logger(
            experiment_name=self.found.experiment,
            run_name=run_name or self.run_dir.name,
            tracking_uri=clean,
            run_id=self.run_id,
        )

    @property
    def lightning_logger(self) -> Any:
        return self.logger

    def start(self, run: RunInfo) -> None:
        """The MLflow run exists, holds the config as params and the provenance as tags, and
        run.json names it."""
        from mlflow.entities import Param, RunTag

        mlflow_client = self.logger.experiment  # creates the run (or finds the resumed one)
        run_id = self.run_id = self.logger.run_id
        existing = mlflow_client.get_run(run_id)
        if existing.info.status != "RUNNING":  # a resumed run (its earlier attempt ended it) runs again
            mlflow_client.update_run(run_id, status="RUNNING")
        known = existing.data.params  # a resumed run has them already: MLflow never changes a param
        params = [Param(key, value) for key, value in run.params.items() if key not in known]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a request
            mlflow_client.log_batch(run_id, params=params[start : start + 100])
        for key in stray_git_tags(existing.data.tags, run.record):
            mlflow_client.delete_tag(run_id, key)
        tags = [RunTag(key, value) for key, value in provenance_tags(run.record, run.directory).items()]
        mlflow_client.log_batch(run_id, tags=tags)
        record = {
            "run_id": run_id,
            "experiment_id": self.logger.experiment_id,
            "experiment": self.found.experiment,
            "tracking_uri": self.found.tracking_uri,
            "parent_run_id": os.environ.get(PARENT_RUN_VARIABLE),
        }
        run.update_record(**{RECORD_KEY: record})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.logger.log_metrics(dict(metrics), step)

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        if self.run_id is None:  # the run never reached MLflow
            return
        mlflow_client = client(self.found)
        for path in paths:
            mlflow_client.log_artifact(self.run_id, str(path))

    def finish(self, status: str) -> None:
        """The best score, kiln's status and delivery as tags, the model version (a complete run
        only), then the MLflow run's own status."""
        from mlflow.entities import Metric, RunTag

        from kiln.runs import RunLayout, read_record

        if self.run_id is None:
            return
        record = read_record(self.run_dir)
        mlflow_status = _STATUS.get(status, "FAILED")
        mlflow_client = client(self.found)
        best = (record.get("best_checkpoint") or {}).get("score")
        metrics = [Metric("best/score", float(best), _now_ms(), 0)] if isinstance(best, int | float) else []
        tags = [RunTag("kiln.status", status)]
        delivery = record.get("delivery") or {}
        if delivery.get("status"):
            tags.append(RunTag("kiln.delivery", str(delivery["status"])))
        mlflow_client.log_batch(self.run_id, metrics=metrics, tags=tags)
        registering = self.found.register_model and RunLayout(self.run_dir).model.is_file()
        if registering and mlflow_status == "FINISHED":
            register(mlflow_client, str(self.found.register_model), self.run_id)
        mlflow_client.set_terminated(self.run_id, mlflow_status)

    def describe_failure(self, exc: BaseException) -> str:
        """The line kiln prints when sending the run's end to the server failed."""
        return (
            f"logger.tracking_uri={self.found.tracking_uri}: could not complete MLflow run {self.run_id} "
            f"({type(exc).__name__}: {_first_line(exc)})"
        )


def stray_git_tags(tags: dict[str, str], record: Mapping[str, Any]) -> list[str]:
    """MLflow's own git tags on a new run that do not describe the commit run.json records.
    MLflow reads them from the directory of the program it runs in (the `kiln` script: kiln's
    own checkout, for an editable install), not from the user's project: unless its commit is
    the recorded one, they go, and the recorded commit (if any) is what the run shows."""
    recorded = (record.get("git") or {}).get("commit")
    if recorded and tags.get(MLFLOW_GIT_COMMIT) == recorded:
        return []
    return [key for key in MLFLOW_GIT_TAGS if key in tags]


def provenance_tags(record: Mapping[str, Any], directory: Path) -> dict[str, str]:
    """What run.json records about where the run came from, as MLflow tags."""
    git = record.get("git") or {}
    versions = record.get("versions") or {}
    tags = {
        MLFLOW_GIT_COMMIT: git.get("commit"),
        "kiln.git_commit": git.get("commit"),
        "kiln.git_dirty": git.get("dirty"),
        "kiln.config_hash": record.get("config_hash"),
        "kiln.data_fingerprint": record.get("data_fingerprint"),
        "kiln.version": versions.get("kiln"),
        "kiln.slurm_job_id": record.get("slurm_job_id"),
        "kiln.seed": record.get("seed"),
        "kiln.monitor": (record.get("monitor") or {}).get("metric"),
        "kiln.run_dir": str(directory.resolve()),
    }
    return {key: str(value) for key, value in tags.items() if value is not None}


def register(mlflow_client: Any, name: str, run_id: str) -> Any:
    """model.onnx, as the run logged it, as a new version of the registered model `name`."""
    import logging

    from mlflow.exceptions import MlflowException

    # "Waiting up to 300 seconds for model version to finish creation": kiln says what it registered
    logging.getLogger("mlflow.store.model_registry.abstract_store").setLevel(logging.WARNING)
    try:
        mlflow_client.create_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    shipped = RunLayout.MODEL  # log_artifacts sent it under its own name
    source = f"{mlflow_client.get_run(run_id).info.artifact_uri.rstrip('/')}/{shipped}"
    version = mlflow_client.create_model_version(name, source, run_id=run_id)
    print(f"kiln: registered {shipped} as {name} version {version.version}", flush=True)
    return version


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


# -- parent runs ---------------------------------------------------------------------------------


@contextmanager
def parent_run(cfg: Any, name: str, kind: str) -> Iterator[str | None]:
    """A parent run for the runs started inside the block (folds, trials), nested itself under the
    parent of the environment (a sweep's); its id is None unless logger=mlflow (and on rank > 0)."""
    from kiln.config import is_rank_zero
    from kiln.interrupts import Interrupted

    found = check_server(cfg)
    if found is None or not is_rank_zero():
        yield None
        return
    run_id = create_parent(found, name, kind)
    previous = os.environ.get(PARENT_RUN_VARIABLE)
    os.environ[PARENT_RUN_VARIABLE] = run_id
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    except (Interrupted, KeyboardInterrupt):
        status = "KILLED"
        raise
    finally:
        if previous is None:
            os.environ.pop(PARENT_RUN_VARIABLE, None)
        else:
            os.environ[PARENT_RUN_VARIABLE] = previous
        end_parent(found, run_id, status)


def create_parent(found: Settings, name: str, kind: str) -> str:
    mlflow_client = client(found)
    tags = {"mlflow.runName": name, "kiln.kind": kind}
    if os.environ.get(PARENT_RUN_VARIABLE):
        tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_VARIABLE]
    created = mlflow_client.create_run(experiment_id(mlflow_client, found.experiment), tags=tags)
    return str(created.info.run_id)


def end_parent(found: Settings, run_id: str, status: str) -> None:
    try:
        client(found).set_terminated(run_id, status)
    except Exception as exc:
        print(
            f"kiln: warning: could not end MLflow parent run {run_id} ({type(exc).__name__}: {_first_line(exc)})",
            file=sys.stderr,
            flush=True,
        )


def log_summary(cfg: Any, run_id: str | None, directory: Path, metrics: dict[str, float]) -> None:
    """A parent run's results (the folds' mean and std, a search's best score) and its record
    files (cv.json, search.json)."""
    found = settings(cfg)
    if found is None or run_id is None:
        return
    from mlflow.entities import Metric

    now = _now_ms()
    mlflow_client = client(found)
    batch = [Metric(key, float(value), now, 0) for key, value in metrics.items()]
    if batch:
        mlflow_client.log_batch(run_id, metrics=batch)
    parent = RunLayout(directory)
    for path in (parent.cv_record, parent.search_record):  # a parent's records
        if path.is_file():
            mlflow_client.log_artifact(run_id, str(path))


class ParentRun(Callback):
    """hydra.callbacks.mlflow in conf/train.yaml: with logger=mlflow, a sweep (`-m`) gets one parent
    run that every job's run is nested under (through PARENT_RUN_VARIABLE), created once the
    server is known to answer; nothing otherwise."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.found: Settings | None = None
        self.previous: str | None = None

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from kiln.errors import SweepRefused

        try:
            found = check_server(config)
        except KilnError as exc:  # a BaseException stops Hydra before any job starts
            raise SweepRefused(str(exc)) from exc
        if found is None:
            return
        self.found = found
        self.previous = os.environ.get(PARENT_RUN_VARIABLE)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        self.run_id = create_parent(found, f"sweep {sweep_dir.name}", "sweep")
        os.environ[PARENT_RUN_VARIABLE] = self.run_id
        print(f"kiln: MLflow parent run {self.run_id} for the sweep in {sweep_dir}", flush=True)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        if self.run_id is None or self.found is None:
            return
        if self.previous is None:
            os.environ.pop(PARENT_RUN_VARIABLE, None)
        else:
            os.environ[PARENT_RUN_VARIABLE] = self.previous
        end_parent(self.found, self.run_id, "FINISHED")
        self.run_id = None
