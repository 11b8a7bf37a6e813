"""kiln on a real SLURM cluster: sweeps as job arrays, preemption and requeue, cancelled jobs.

The cluster (slurmctld, slurmd, slurmdbd with MariaDB, munge on localhost) is brought up by
scripts/slurm_up.sh in the `slurm_cluster` fixture and torn down after the session. A machine
where it cannot start fails these tests; they are never skipped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kilntest import NO_COMPRESSION, ROOT, TINY_DIGITS, kiln_command, read_run, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SLURM_BASE = Path(os.environ.get("KILN_TEST_SLURM_BASE", "/tmp/kiln-slurm"))
# One CPU and 1 GB a job, so that two jobs of a sweep run side by side on this 2-core node.
SMALL_JOBS = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1"]
TINY = [*TINY_DIGITS, "progress=lines"]
# Long enough (about 3 s an epoch on one core) that a signal lands inside an epoch.
SLOW_EPOCHS = [
    "data=synthetic",
    "model=mlp",
    "data.num_samples=20000",
    "data.batch_size=32",
    "data.batches_per_chunk=1",
    "trainer.deterministic=true",
    "callbacks.early_stopping.patience=100",
    *NO_COMPRESSION,
]


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[dict[str, str]]:
    env = {**os.environ, "SLURM_BASE": str(SLURM_BASE)}
    up = subprocess.run(
        ["bash", str(ROOT / "scripts" / "slurm_up.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    if up.returncode != 0:
        pytest.fail(f"the SLURM test cluster did not start (scripts/slurm_up.sh):\n{up.stdout}\n{up.stderr}")
    env["SLURM_CONF"] = str(SLURM_BASE / "slurm.conf")
    env.pop("HYDRA_FULL_ERROR", None)
    yield env
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "slurm_down.sh")], env=env, capture_output=True, timeout=120
    )


def queued(env: dict[str, str]) -> set[str]:
    """The jobs SLURM still holds (pending, running or being stopped), by job id: an array job's
    tasks (`<array job>_<task>`) count as their array job."""
    squeue = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, check=True)
    return {name.split("_")[0] for name in squeue.stdout.split()}


def wait_until_idle(env: dict[str, str]) -> None:
    """Until no job of an earlier test holds the node's CPUs, so that a sweep's jobs start side by
    side (a job SLURM is stopping holds its CPU until its processes are gone)."""
    wait_for(lambda: not queued(env), "the SLURM queue to empty (jobs of earlier tests)")


def start_sweep(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    wait_until_idle(env)
    return subprocess.Popen(
        kiln_command("train", "-m", f"paths.output_dir={cwd / 'runs'}", *args),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str], timeout: float = 600) -> tuple[int, str, str]:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"the sweep did not end within {timeout} s:\n{stdout}\n{stderr}")
    return process.returncode, stdout, stderr


def sweep_dir(cwd: Path) -> Path:
    (directory,) = (cwd / "runs" / "train_multirun").iterdir()
    return directory


def array_task_id(cwd: Path, job_num: int) -> str:
    """The SLURM id (`<array job>_<task>`) of job `job_num` of the sweep, from submitit's folder."""
    folders = [p.name for p in (sweep_dir(cwd) / ".submitit").iterdir() if p.is_dir()]
    tasks = [name for name in folders if re.fullmatch(rf"\d+_{job_num}", name)]
    plain = [name for name in folders if name.isdigit()]  # a sweep of one job is a plain job
    return (tasks or plain)[0]


def job_stderr(cwd: Path, task: str = "train") -> str:
    """Every SLURM job's stderr so far (submitit's <job>_log.err), for failure messages: an error
    inside a job is reported there, not by the submitting process."""
    files = sorted((cwd / "runs").glob(f"{task}_multirun/*/.submitit/*/*_log.err"))
    return "\n".join(f"== {path.name}\n{path.read_text()[-3000:]}" for path in files)


def log_of(cwd: Path, job_num: int) -> str:
    """The job's train.log so far; empty until the job has started."""
    paths = list((cwd / "runs" / "train_multirun").glob(f"*/{job_num}/train.log"))
    return paths[0].read_text() if paths else ""


def test_sweep_of_two_configs_runs_as_a_job_array_and_returns_both(
    slurm_cluster: dict[str, str], tmp_path: Path
) -> None:
    code, stdout, stderr = finish(start_sweep([*SMALL_JOBS, *TINY, "seed=1,2"], tmp_path, slurm_cluster))
    assert code == 0, f"{stdout}\n{stderr}"
    sweep = sweep_dir(tmp_path)
    records = {num: read_run(sweep / str(num)) for num in (0, 1)}
    array_jobs = set()  # both jobs are tasks of one job array
    for num, record in records.items():
        assert record["status"] == "completed"
        assert record["seed"] == num + 1
        assert record["slurm_job_id"], "the job did not run under SLURM"
        assert 0.2 < record["test_metrics"]["test/acc"] <= 1.0  # 10 classes: chance is 0.1
        array_jobs.add(array_task_id(tmp_path, num).split("_")[0])
    assert len(array_jobs) == 1, "both jobs belong to one job array"
    # The submitting process tables both results, best first, and names the best run.
    assert stdout.count("| completed |") == 2, stdout
    assert f"best run: {sweep}" in stdout
    assert (sweep / "runs.csv").read_text().count("completed") == 2


def test_preempted_job_requeues_and_resumes_to_the_uninterrupted_result(
    slurm_cluster: dict[str, str], tmp_path: Path
) -> None:
    # Two identical trainings (progress only changes how epochs are shown); job 0 is preempted.
    epochs = 4
    process = start_sweep(
        [*SMALL_JOBS, *SLOW_EPOCHS, f"trainer.max_epochs={epochs}", "progress=lines,auto"],
        tmp_path,
        slurm_cluster,
    )
    wait_for(lambda: "epoch 1/" in log_of(tmp_path, 0), "job 0 to finish its first epoch", process=process)
    # Signalled now, after epoch 1: Preemption saves at the end of the next training step, so the
    # save lands inside epoch 2 (chunks_done >= 1) with three epochs still to train.
    job = array_task_id(tmp_path, 0)
    # What SLURM sends signal_delay_s before the time limit, sent now.
    subprocess.run(["scancel", "--signal=USR2", job], env=slurm_cluster, check=True)
    code, stdout, stderr = finish(process)
    assert code == 0, f"{stdout}\n{stderr}"

    sweep = sweep_dir(tmp_path)
    preempted, uninterrupted = read_run(sweep / "0"), read_run(sweep / "1")
    log = log_of(tmp_path, 0)
    assert "kiln: preempted (warned of the time limit)" in log and f"requeued SLURM job {job}" in log, log
    assert preempted["resumed_from"].endswith("checkpoints/preempted.ckpt")
    assert len(preempted["attempts"]) == 1, "one earlier attempt, then the requeued one"
    # saved inside an epoch; the file itself goes once the requeued job has trained past it
    assert re.search(
        r"kiln: preempted \(warned of the time limit\) at epoch \d+, step [1-9]\d*; saved", log
    ), log
    assert not (sweep / "0" / "checkpoints" / "preempted.ckpt").exists()
    assert (sweep / "0" / "checkpoints" / "last.ckpt").is_file()
    assert preempted["epochs"] == uninterrupted["epochs"] == epochs
    assert preempted["status"] == uninterrupted["status"] == "completed"
    for name, value in uninterrupted["test_metrics"].items():
        assert preempted["test_metrics"][name] == pytest.approx(value, abs=1e-6), name


def test_requeue_by_scontrol_saves_before_the_job_is_stopped(
    slurm_cluster: dict[str, str], tmp_path: Path
) -> None:
    process = start_sweep([*SMALL_JOBS, *SLOW_EPOCHS, "trainer.max_epochs=3"], tmp_path, slurm_cluster)
    wait_for(lambda: "epoch 1/" in log_of(tmp_path, 0), "the job to finish its first epoch", process=process)
    job = array_task_id(tmp_path, 0)
    subprocess.run(["scontrol", "requeue", job], env=slurm_cluster, check=True)  # SIGTERM, then KILL
    code, stdout, stderr = finish(process)
    assert code == 0, f"{stdout}\n{stderr}"
    record = read_run(sweep_dir(tmp_path) / "0")
    assert "kiln: preempted (stopped by SLURM)" in log_of(tmp_path, 0)
    assert record["resumed_from"].endswith("checkpoints/preempted.ckpt")
    assert record["status"] == "completed" and record["epochs"] == 3


def test_cancelled_job_ends_the_sweep_with_a_clear_error(
    slurm_cluster: dict[str, str], tmp_path: Path
) -> None:
    process = start_sweep(
        [*SMALL_JOBS, *SLOW_EPOCHS, "trainer.max_epochs=50", "seed=1,2"], tmp_path, slurm_cluster
    )
    wait_for(lambda: "epoch 1/" in log_of(tmp_path, 0), "job 0 to start training", process=process)
    job = array_task_id(tmp_path, 0)
    array_job = job.split("_")[0]
    try:
        subprocess.run(["scancel", job], env=slurm_cluster, check=True)
        code, stdout, stderr = finish(process, timeout=180)
    finally:
        subprocess.run(["scancel", array_job], env=slurm_cluster)  # job 1 would train on for minutes
        # scancel only asks: the jobs hold their CPUs until their processes are gone
        wait_for(lambda: array_job not in queued(slurm_cluster), f"the cancelled jobs of {array_job} to end")
    assert code == 2, f"{stdout}\n{stderr}"
    errors = [line for line in stderr.splitlines() if line.startswith("kiln train: error:")]
    assert len(errors) == 1, stderr
    assert f"SLURM job {job} of the sweep ended without a result (state: CANCELLED" in errors[0], errors[0]
    assert "_log.out/.err" in errors[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["trainer=ddp_cpu", "hydra.launcher.tasks_per_node=1"], "hydra.launcher.tasks_per_node=1"),
        (["trainer=gpu", "hydra.launcher.gpus_per_node=0"], "hydra.launcher.gpus_per_node=0"),
        (["trainer=ddp", "trainer.devices=4", "hydra.launcher.gpus_per_node=2"], "gpus_per_node=2"),
    ],
)
def test_settings_that_cannot_fit_are_refused_before_submission(
    slurm_cluster: dict[str, str], tmp_path: Path, overrides: list[str], named: str
) -> None:
    before = queued(slurm_cluster)
    code, stdout, stderr = finish(start_sweep([*SMALL_JOBS, *TINY, *overrides], tmp_path, slurm_cluster))
    assert code == 2, f"{stdout}\n{stderr}"
    errors = [line for line in stderr.splitlines() if line.startswith("kiln train: error:")]
    assert len(errors) == 1 and named in errors[0], stderr
    assert not list(tmp_path.rglob(".submitit")), "nothing may be submitted"
    # No new job; one of an earlier test may have ended meanwhile.
    assert queued(slurm_cluster) <= before


def test_search_workers_as_slurm_jobs_share_one_study_in_mariadb(
    slurm_cluster: dict[str, str], tmp_path: Path
) -> None:
    import optuna

    # The test cluster's own MariaDB (slurmdbd's) holds the study: a real database server. The
    # database starts empty, so both workers race to create Optuna's tables and stamp their schema
    # version; the loser sees "already exists" or a duplicate version row, and kiln retries.
    socket = SLURM_BASE / "run" / "mysql.sock"
    setup = (
        "DROP DATABASE IF EXISTS kiln_optuna; CREATE DATABASE kiln_optuna; "
        "CREATE USER IF NOT EXISTS 'kiln'@'127.0.0.1' IDENTIFIED BY 'kilnpw'; "
        "GRANT ALL ON kiln_optuna.* TO 'kiln'@'127.0.0.1'; FLUSH PRIVILEGES;"
    )
    subprocess.run(["mariadb", "--no-defaults", "-S", str(socket), "-uroot", "-e", setup], check=True)
    url = f"mysql+pymysql://kiln:kilnpw@127.0.0.1:{os.environ.get('SLURM_DB_PORT', '3307')}/kiln_optuna"
    wait_until_idle(slurm_cluster)  # both workers start side by side, each on its own CPU
    process = subprocess.Popen(
        kiln_command(
            "search",
            "-m",
            f"paths.output_dir={tmp_path / 'runs'}",
            *SMALL_JOBS,
            *TINY,
            "trainer.max_epochs=3",
            'search.params={model.optimizer.lr:"tag(log, interval(1e-3, 1e-1))"}',
            "search.n_trials=6",
            "search.startup_trials=2",
            f"search.storage={url}",
            "search.worker=0,1",
        ),
        cwd=tmp_path,
        env=slurm_cluster,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    code, stdout, stderr = finish(process)
    assert code == 0, f"{stdout}\n{stderr}\n{job_stderr(tmp_path, 'search')}"
    study = optuna.load_study(study_name="kiln", storage=url)
    complete = {t.number for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    # Each worker checks the shared count before it starts a trial: at most one extra between two.
    assert 6 <= len(complete) <= 7, [(t.number, t.state) for t in study.trials]
    (sweep,) = (tmp_path / "runs" / "search_multirun").iterdir()
    by_worker = {w: {int(p.name.split("_")[1]) for p in (sweep / str(w)).glob("trial_*")} for w in (0, 1)}
    assert by_worker[0] and by_worker[1], f"both workers trained trials: {by_worker}"
    assert not by_worker[0] & by_worker[1], "a trial number belongs to one worker"
    assert by_worker[0] | by_worker[1] == complete
    for worker, numbers in by_worker.items():
        for number in numbers:
            record = read_run(sweep / str(worker) / f"trial_{number:03d}")
            assert record["slurm_job_id"] and record["status"] == "completed"
    recorded = json.loads((sweep / "0" / "search.json").read_text())["storage"]
    assert recorded == url.replace("kilnpw", "***")  # the record names the database, not its password
