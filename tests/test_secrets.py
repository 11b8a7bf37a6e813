"""No secret reaches a file kiln or Hydra writes, or the terminal: a URL's password (also as
pathlib leaves a URL: `http:/user:pw@host`), a secret query parameter (`?password=`, `token=`, ...),
the value of a secret-looking environment variable (`*_TOKEN`, ...). Not in a sweep's
multirun.yaml, not in what SLURM jobs are handed, not in hyperparameters Lightning writes
(hparams.yaml, TensorBoard, checkpoints), not in run.json's error or command; and a run whose
saved config lost its password says how to give it back."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kiln import runs, secrets
from kiln.errors import KilnError
from kilntest import TINY_DIGITS, kiln_cli, ok

MARKER = "Pa55w0rdMarker"
URL = f"mysql+pymysql://kiln:{MARKER}@db.example.com:3306/digits"

USER_DATA = '''
from typing import Any

from kiln.data.digits import DigitsDataModule


class UrlDigits(DigitsDataModule):
    """A user's DataModule that reads from a database: it needs the password in its URL."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        if "***" in url or "${" in url:
            raise ConnectionError(f"cannot connect to {url}: access denied")
        super().__init__(**kwargs)
        self.save_hyperparameters()  # Lightning logs these: hparams.yaml, TensorBoard, checkpoints
'''


def leaks(root: Path) -> list[str]:
    return [str(path) for path in root.rglob("*") if path.is_file() and MARKER.encode() in path.read_bytes()]


@pytest.fixture
def secret_variables(monkeypatch):
    """Environment variables set by kiln.secrets.secrets_to_environment, removed afterwards."""
    yield
    for name in secrets._secret_variables.values():
        os.environ.pop(name, None)
    secrets._secret_variables.clear()


def test_a_sweep_hands_its_jobs_no_password_and_they_still_get_it(secret_variables):
    cfg = OmegaConf.create(
        {
            "data": {"url": URL, "hosts": [URL]},
            "seed": 1,
            "hydra": {
                "overrides": {"task": [f"+data.url={URL}", "seed=1,2"]},
                "job": {"override_dirname": f"+data.url={URL},seed=1,2"},
            },
        }
    )
    runs.secrets_to_environment(cfg)
    # what Hydra writes (multirun.yaml) and what submitit pickles for SLURM jobs
    assert MARKER not in OmegaConf.to_yaml(cfg) and MARKER.encode() not in pickle.dumps(cfg)
    reference = "mysql+pymysql://kiln:${oc.env:KILN_SECRET_DATA_URL}@db.example.com:3306/digits"
    task = OmegaConf.to_container(cfg.hydra.overrides.task, resolve=False)  # as Hydra's sweeper reads it
    assert task == [f"+data.url={reference}", "seed=1,2"]
    assert os.environ["KILN_SECRET_DATA_URL"] == MARKER  # sbatch exports it to the job
    assert cfg.data.url == URL and cfg.data.hosts[0] == URL  # resolved where it is used
    from hydra.core.override_parser.overrides_parser import OverridesParser

    assert OverridesParser.create().parse_override(task[0]).value() == reference


def saved_run(tmp_path: Path, url: str) -> runs.RunDirectory:
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    runs.write_atomically(
        run / ".hydra" / "config.yaml", OmegaConf.to_yaml({"data": {"url": url}, "model": {}})
    )
    (run / "run.json").write_text('{"status": "completed", "stage": "train", "config_hash": "x"}')
    return runs.RunDirectory.read(run)


@pytest.mark.parametrize("saved", [URL, URL.replace(MARKER, "${oc.env:KILN_SECRET_DATA_URL}")])
def test_a_masked_password_is_asked_for_in_one_line_and_taken_from_the_environment(
    tmp_path, monkeypatch, saved
):
    monkeypatch.delenv("KILN_SECRET_DATA_URL", raising=False)
    run = saved_run(tmp_path, saved)
    assert MARKER not in (run.directory / ".hydra" / "config.yaml").read_text()
    with pytest.raises(KilnError) as raised:
        run.saved_config()
    assert str(raised.value) == (
        f"data.url: the run's saved config ({run.directory}/.hydra/config.yaml) holds this URL without its "
        "password (mysql+pymysql://kiln:***@...): kiln never saves passwords; give it in the environment "
        "variable KILN_SECRET_DATA_URL, e.g. `export KILN_SECRET_DATA_URL=...` and run the command again"
    )
    monkeypatch.setenv("KILN_SECRET_DATA_URL", MARKER)
    assert run.saved_config().data.url == URL


def user_data_importable(tmp_path: Path) -> dict[str, str]:
    """USER_DATA written as the user's module url_data.py; the environment that makes a child
    `kiln` import it."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "url_data.py").write_text(USER_DATA)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))}


@pytest.mark.slow
def test_no_password_reaches_any_file_of_a_sweep_or_the_terminal(tmp_path):
    env = user_data_importable(tmp_path)
    output = tmp_path / "runs"
    result = ok(
        kiln_cli(
            "train",
            "-m",
            *TINY_DIGITS,
            "data._target_=url_data.UrlDigits",
            f"+data.url={URL}",
            f"paths.output_dir={output}",
            cwd=tmp_path,
            env=env,
        )
    )
    assert MARKER not in result.stdout + result.stderr
    names = {path.name for path in output.rglob("*") if path.is_file()}
    assert {"multirun.yaml", "hparams.yaml", "best.ckpt", "run.json", "config.yaml"} <= names
    assert any(name.startswith("events.out.tfevents") for name in names)
    assert leaks(output) == []
    (job,) = [path.parent for path in output.rglob("run.json")]
    assert (
        "url: mysql+pymysql://kiln:${oc.env:KILN_SECRET_DATA_URL}@"
        in (job / ".hydra" / "config.yaml").read_text()
    )
    assert "kiln:***@" in (job / "tensorboard" / "hparams.yaml").read_text()

    # a later stage, from the run's saved config: one line saying how to give the password...
    refused = kiln_cli("export", f"run={job}", cwd=tmp_path, env=env)
    assert refused.returncode == 2
    assert (
        "give it in the environment variable KILN_SECRET_DATA_URL" in refused.stderr.strip().splitlines()[-1]
    )
    # ...and given so, it runs; still nothing written holds it
    exported = ok(kiln_cli("export", f"run={job}", cwd=tmp_path, env={**env, "KILN_SECRET_DATA_URL": MARKER}))
    assert MARKER not in exported.stdout + exported.stderr
    assert (job / "model.onnx").is_file()
    assert leaks(output) == []


# -- every form of secret, masked by the one masker ------------------------------------------------

ENV_SECRET = f"{MARKER}Env"
SECRET_ENV = {"KILN_TEST_SERVICE_TOKEN": ENV_SECRET}  # a `*_TOKEN` variable the user has set


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (URL, "mysql+pymysql://kiln:***@db.example.com:3306/digits"),
        # pathlib makes 'http://' 'http:/' (a URL given as a path, quoted in an error)
        (
            f"data.path=http:/kiln:{MARKER}@host/f.csv (looked at /w/http:/kiln:{MARKER}@host/f.csv)",
            "data.path=http:/kiln:***@host/f.csv (looked at /w/http:/kiln:***@host/f.csv)",
        ),
        (f"mysql://host/db?user=bob&password={MARKER}", "mysql://host/db?user=bob&password=***"),
        (f"'mysql://h/db?PassWord={MARKER}&x=1'", "'mysql://h/db?PassWord=***&x=1'"),
        (f"+db.password={MARKER}", "+db.password=***"),
        # a reference to the variable that holds a secret is no secret
        ("db?password=${oc.env:KILN_SECRET_DB}", "db?password=${oc.env:KILN_SECRET_DB}"),
        ("bypass=on compass=north", "bypass=on compass=north"),  # no secret's name
    ],
)
def test_a_url_password_and_a_secret_parameter_are_masked(text, masked):
    assert secrets.without_credentials(text) == masked


@pytest.mark.parametrize("name", secrets.SECRET_PARAMETERS)
def test_each_secret_query_parameter_is_masked_whatever_its_case(name):
    for spelled in (name, name.upper()):
        text = f"https://host/api?user=bob&{spelled}={MARKER}&page=2"
        assert secrets.without_credentials(text) == f"https://host/api?user=bob&{spelled}=***&page=2"


@pytest.mark.parametrize(
    "variable",
    ["MLFLOW_TRACKING_PASSWORD", "HF_TOKEN", "app_secret", "OPENAI_API_KEY", "KILN_SECRET_DATA_URL"],
)
def test_the_value_of_a_secret_looking_variable_is_masked(monkeypatch, variable):
    monkeypatch.setenv(variable, MARKER)
    monkeypatch.setenv("KILN_TEST_TOKEN", "on")  # too short to hunt for: words stay words
    text = f"connect with key {MARKER}, on port 5432"
    assert secrets.without_credentials(text) == "connect with key ***, on port 5432"


def test_a_structure_is_masked_in_every_string_and_left_alone_when_clean(monkeypatch):
    monkeypatch.setenv("KILN_TEST_API_KEY", ENV_SECRET)
    clean = {"lr": 0.1, "hosts": ["a", "b"]}
    assert secrets.mask_secrets(clean) is clean
    masked = secrets.mask_secrets(
        OmegaConf.create({"url": f"db?token={MARKER}", "keys": [ENV_SECRET], "n": 3})
    )
    assert OmegaConf.to_container(masked) == {"url": "db?token=***", "keys": ["***"], "n": 3}


def test_a_one_line_error_holds_no_secret(monkeypatch):
    from kiln.errors import describe_user_error

    monkeypatch.setenv("KILN_TEST_SERVICE_TOKEN", ENV_SECRET)
    error = KilnError(
        f"search.storage=mysql://h/db?user=bob&passwd={MARKER}: cannot open it (key {ENV_SECRET}); "
        f"data.path=http:/kiln:{MARKER}@host/f.csv"
    )
    # the mask takes what follows up to a space: a password may end in ':'
    assert describe_user_error(error) == (
        "search.storage=mysql://h/db?user=bob&passwd=*** cannot open it (key ***); "
        "data.path=http:/kiln:***@host/f.csv"
    )


def test_a_sweep_hands_its_jobs_no_secret_parameter_and_they_still_get_it(secret_variables):
    storage = f"mysql+pymysql://db.example.com/optuna?user=bob&password={MARKER}"
    override = f"search.storage='{storage}'"
    cfg = OmegaConf.create(
        {"search": {"storage": storage}, "hydra": {"overrides": {"task": [override, "seed=1,2"]}}}
    )
    assert secrets.secrets_to_environment(cfg) == ["KILN_SECRET_SEARCH_STORAGE"]
    assert MARKER not in OmegaConf.to_yaml(cfg) and MARKER.encode() not in pickle.dumps(cfg)
    reference = "mysql+pymysql://db.example.com/optuna?user=bob&password=${oc.env:KILN_SECRET_SEARCH_STORAGE}"
    assert OmegaConf.to_container(cfg.search, resolve=False) == {"storage": reference}
    assert os.environ["KILN_SECRET_SEARCH_STORAGE"] == MARKER
    assert cfg.search.storage == storage  # resolved where it is used
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (task, _) = OmegaConf.to_container(cfg.hydra.overrides.task, resolve=False)
    assert OverridesParser.create().parse_override(task).value() == reference


# -- through a real kiln train: every byte it writes and prints --------------------------------------

SECRET_URL = (  # a URL password, two secret query parameters, and the value of KILN_TEST_SERVICE_TOKEN
    f"mysql+pymysql://kiln:{MARKER}Url@db.example.com:3306/digits"
    f"?user=kiln&password={MARKER}Query&api_key={MARKER}Key&sig={ENV_SECRET}"
)


def written_or_printed(root: Path, result) -> list[str]:
    """Where the marker is: files under `root`, and 'stdout'/'stderr' of `result`."""
    printed = [name for name in ("stdout", "stderr") if MARKER in getattr(result, name)]
    return leaks(root) + printed


@pytest.mark.slow
def test_a_failing_run_writes_and_prints_no_secret(tmp_path):
    """A data.path that is a URL with a password: pathlib turns it into http:/kiln:PW@host, quoted
    by the error in run.json and on stderr."""
    output = tmp_path / "runs"
    result = kiln_cli(
        "train",
        "data=table",
        f"data.path=http://kiln:{MARKER}Path@files.example.com/cars.csv",
        "data.target=mpg",
        f"+notes.storage='{SECRET_URL}'",
        f"paths.output_dir={output}",
        cwd=tmp_path,
        env=SECRET_ENV,
    )
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("kiln train: error: data.path=http:/kiln:***@files.example.com/cars.csv: ")
    (run,) = [path.parent for path in output.rglob("run.json")]
    record = runs.Run.read_record(run)
    assert record["status"] == "failed"
    assert "http:/kiln:***@files.example.com/cars.csv" in record["error"]
    assert written_or_printed(output, result) == []


@pytest.mark.slow
def test_a_run_that_trains_writes_and_prints_no_secret(tmp_path):
    """The secrets are in the config the user's DataModule gets (it needs them: it refuses a masked
    URL), so Lightning has them in its hyperparameters too. (No export: a later stage reads the
    masked saved config, see test_no_password_reaches_any_file_of_a_sweep_or_the_terminal.)"""
    env = user_data_importable(tmp_path)
    output = tmp_path / "runs"
    result = ok(
        kiln_cli(
            "train",
            *TINY_DIGITS,
            "data._target_=url_data.UrlDigits",
            f"+data.url='{SECRET_URL}'",
            f"paths.output_dir={output}",
            cwd=tmp_path,
            env={**env, **SECRET_ENV},
        )
    )
    (run,) = [path.parent for path in output.rglob("run.json")]
    names = {path.name for path in run.rglob("*") if path.is_file()}
    assert {"config.yaml", "overrides.yaml", "hydra.yaml", "run.json", "train.log", "hparams.yaml"} <= names
    assert "best.ckpt" in names and any(name.startswith("events.out.tfevents") for name in names)
    masked = "mysql+pymysql://kiln:***@db.example.com:3306/digits?user=kiln&password=***&api_key=***&sig=***"
    assert masked in (run / ".hydra" / "config.yaml").read_text()
    assert masked in (run / "tensorboard" / "hparams.yaml").read_text()
    assert any(masked in part for part in runs.Run.read_record(run)["command"])
    assert written_or_printed(output, result) == []
