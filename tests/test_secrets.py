"""No password from a URL reaches a file kiln or Hydra writes, or the terminal: not in a sweep's
multirun.yaml, not in what SLURM jobs are handed, not in hyperparameters Lightning writes
(hparams.yaml, TensorBoard, checkpoints); and a run whose saved config lost its password says how
to give it back."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kiln import runs
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
    """Environment variables set by kiln.runs.secrets_to_environment, removed afterwards."""
    yield
    for name in runs._secret_variables.values():
        os.environ.pop(name, None)
    runs._secret_variables.clear()


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


def test_no_password_reaches_any_file_of_a_sweep_or_the_terminal(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "url_data.py").write_text(USER_DATA)
    output = tmp_path / "runs"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))}
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
