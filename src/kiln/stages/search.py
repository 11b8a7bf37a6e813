"""`kiln search`: hyperparameter search with Optuna; every trial is a complete kiln run.

    kiln search hparams_search=digits_cnn                      TPE, 20 trials, pruning, sqlite
    kiln search hparams_search=digits_cnn search.sampler=random search.n_trials=50
    kiln search run_dir=runs/search/<dir>                      continue an interrupted search
    kiln search -m hydra/launcher=slurm hparams_search=digits_cnn search.worker=0,1,2,3 \\
        search.storage=mysql+pymysql://user:pw@dbhost/optuna   four SLURM jobs, one study

Steps: check the settings (every searched key must exist in the composed config) -> open the study
in its storage (a sqlite file in the search directory unless search.storage names a database) ->
enqueue the composed config as the first trial (the baseline to beat) -> until the study holds
search.n_trials finished trials (all workers together): sample a trial, train it with `train_once`
in `<dir>/trial_NNN/` (a run directory like any other), reporting the monitored metric after
every validation so the pruner can stop a poor trial early -> print the table of trials (kiln
report), write search.json with the best trial and the command that trains it.

The objective is the declared monitor (monitor.metric, monitor.mode): the best validation score a
trial reached. Test metrics are recorded for every trial but never steer the search.

Why not hydra-optuna-sweeper: it pins optuna<3 and never hands the trial to the job, so it cannot
prune (DESIGN.md). Here the trial lives in the process that trains it.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf, open_dict

from kiln.errors import KilnError
from kiln.stages.runner import stage

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "none")


@stage("search")
def main(cfg: DictConfig) -> dict[str, Any]:
    import optuna
    from hydra.core.hydra_config import HydraConfig

    from kiln import tracking
    from kiln.runs import find_runs, save_run_config
    from kiln.sweep import report_sweep

    hydra = HydraConfig.get()
    run_dir = Path(hydra.runtime.output_dir)
    settings = cfg.search
    space = search_space(cfg)
    check_search_settings(cfg, space)
    tracking.check_server(cfg)  # logger=mlflow: a server that does not answer stops the search here
    save_run_config(run_dir, cfg, list(hydra.overrides.task), hydra)  # masked: Hydra's own writing is off
    monitor = {"metric": str(cfg.monitor.metric), "mode": str(cfg.monitor.mode)}
    study = open_study(cfg, space, run_dir)
    if settings.include_defaults and not study.trials and not settings.worker:
        baseline = baseline_params(cfg, space)
        if baseline:
            study.enqueue_trial(baseline, user_attrs={"baseline": True})

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # kiln prints each trial's outcome itself
    started = time.perf_counter()
    # logger=mlflow: the trials' runs nested under one parent run of this search (of this worker)
    with tracking.parent_run(cfg, f"search {settings.study_name} {run_dir.name}", "search") as parent:
        if finished_trials(study) < int(settings.n_trials):
            study.optimize(
                lambda trial: run_trial(cfg, trial, space, run_dir, monitor),
                callbacks=[StopAfter(int(settings.n_trials))],
                # a failed trial is recorded (its run.json says why) and the search goes on
                catch=(KilnError,),
                gc_after_trial=True,
            )
        if find_runs(run_dir):
            report_sweep(run_dir)
        result = summarize(study, cfg, run_dir, time.perf_counter() - started)
        best = (result["best"] or {}).get("score")
        tracking.log_summary(cfg, parent, run_dir, {"best/score": best} if best is not None else {})
    if result["best"] is None:
        raise KilnError(
            f"no trial of the search completed ({result['states']}); the table above says why each failed"
        )
    return result


# -- settings ------------------------------------------------------------------------------------


def search_space(cfg: DictConfig) -> dict[str, Any]:
    """search.params (`key: Hydra sweep syntax`) as Optuna distributions."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = cfg.search.params or {}
    if not params:
        raise KilnError(
            "search.params: nothing to search; give keys and ranges, e.g. "
            "search.params={model.optimizer.lr:'tag(log, interval(1e-4, 1e-1))'} or hparams_search=digits_cnn"
        )
    parser = OverridesParser.create()
    space = {}
    for key, expression in params.items():
        try:
            (override,) = parser.parse_overrides([f"{key}={expression}"])
        except Exception as exc:
            raise KilnError(
                f"search.params.{key}={expression}: not a sweep; use choice(a,b), range(1,10), "
                f"interval(0.0,0.5) or tag(log, interval(1e-4,1e-1)) ({exc})"
            ) from exc
        space[str(key)] = distribution(str(key), override)
    return space


def distribution(key: str, override: Any) -> Any:
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    sweep = override.value()
    if isinstance(sweep, ChoiceSweep):
        # lists are not hashable choices for Optuna: each choice travels as its JSON text
        return CategoricalDistribution([_choice(v) for v in sweep.list])
    if isinstance(sweep, RangeSweep):
        start, stop, step = float(sweep.start or 0), float(sweep.stop or 0), float(sweep.step or 1)
        if all(x.is_integer() for x in (start, stop, step)):
            return IntDistribution(int(start), int(stop) - 1, step=int(step))
        return CategoricalDistribution(list(override.sweep_iterator()))
    if isinstance(sweep, IntervalSweep):
        log = "log" in sweep.tags
        low, high = sweep.start, sweep.end
        if isinstance(low, int) and isinstance(high, int) and not log:
            return IntDistribution(low, high)
        return FloatDistribution(float(low or 0.0), float(high or 0.0), log=log)
    raise KilnError(
        f"search.params.{key}: give a range to search, e.g. choice(a,b) or interval(0.0,0.5), not one value"
    )


def _choice(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool) or value is None else json.dumps(value)


def _value(value: Any) -> Any:
    """A sampled value as the config takes it (choices that are lists travel as JSON text)."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def check_search_settings(cfg: DictConfig, space: dict[str, Any]) -> None:
    settings = cfg.search
    missing = object()
    for key in space:
        if OmegaConf.select(cfg, key, default=missing) is missing:
            raise KilnError(
                f"search.params.{key}: no such config key; check the spelling "
                f"(`kiln search --cfg job` prints every key)"
            )
    if settings.sampler not in SAMPLERS:
        raise KilnError(f"search.sampler={settings.sampler}: must be one of {', '.join(SAMPLERS)}")
    if settings.pruner not in PRUNERS:
        raise KilnError(f"search.pruner={settings.pruner}: must be one of {', '.join(PRUNERS)}")
    if not isinstance(settings.n_trials, int) or settings.n_trials < 1:
        raise KilnError(f"search.n_trials={settings.n_trials}: must be a positive number of trials")
    if settings.sampler == "grid":
        from optuna.distributions import CategoricalDistribution, IntDistribution

        continuous = [
            k for k, d in space.items() if not isinstance(d, CategoricalDistribution | IntDistribution)
        ]
        if continuous:
            raise KilnError(
                f"search.sampler=grid: {', '.join(continuous)} is an interval; a grid takes choice() or range()"
            )
    if OmegaConf.select(cfg, "cv.folds") is not None:
        raise KilnError("cv.folds: kiln search trains single runs; cross-validate the best config afterwards")
    if str(OmegaConf.select(cfg, "trainer.strategy", default="auto")).startswith("ddp"):
        raise KilnError(
            f"trainer.strategy={cfg.trainer.strategy}: a search trains its trials in one process; run trials in "
            "parallel as workers instead (kiln search -m search.worker=0,1 with a shared search.storage)"
        )


def space_file_overrides() -> list[str]:
    """What the chosen hparams_search file sets besides search.*, as `kiln train` overrides (its
    `override /experiment: x` as experiment=x, its values as key=value), so that a trial's
    overrides.yaml trains that trial with `kiln train` alone."""
    import yaml
    from hydra.core.hydra_config import HydraConfig

    runtime = HydraConfig.get().runtime
    name = runtime.choices.get("hparams_search")
    if not name:
        return []
    files = [
        Path(src.path) / "hparams_search" / f"{name}.yaml"
        for src in runtime.config_sources
        if src.schema == "file"
    ]
    path = next((f for f in reversed(files) if f.is_file()), None)  # later sources win, as in Hydra
    if path is None:
        return []
    content = yaml.safe_load(path.read_text()) or {}
    user = {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}
    overrides = []
    for entry in content.pop("defaults", []) or []:
        if isinstance(entry, dict):
            for key, value in entry.items():
                group = key.replace("override", "").strip().lstrip("/")
                if group and group not in user and value is not None:
                    overrides.append(f"{group.replace('/', '.')}={value}")
    content.pop("search", None)

    def flatten(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                flatten(value, f"{prefix}{key}.")
        elif prefix[:-1] not in user:
            overrides.append(f"{prefix[:-1]}={json.dumps(node) if isinstance(node, list | dict) else node}")

    flatten(content, "")
    return overrides


class StopAfter:
    """Stops the study once it holds `n_trials` finished trials, counted over every worker: completed,
    pruned, and failed with a reason. A trial whose process died (its worker was killed) does not
    count: continuing the search trains another in its place."""

    def __init__(self, n_trials: int) -> None:
        self.n_trials = n_trials

    def __call__(self, study: Any, trial: Any) -> None:
        if finished_trials(study) >= self.n_trials:
            study.stop()


def finished_trials(study: Any) -> int:
    from optuna.trial import TrialState

    return sum(
        t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or (t.state == TrialState.FAIL and "error" in t.user_attrs)
        for t in study.get_trials(deepcopy=False)
    )


# -- the study -----------------------------------------------------------------------------------


def storage_url(cfg: DictConfig, run_dir: Path) -> str:
    """search.storage, or a sqlite file shared by the jobs of a sweep (else in the search's directory)."""
    if cfg.search.storage:
        return str(cfg.search.storage)
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra = HydraConfig.get()
    home = Path(hydra.sweep.dir) if hydra.mode == RunMode.MULTIRUN else run_dir
    home.mkdir(parents=True, exist_ok=True)
    from kiln.runs import RunLayout

    return f"sqlite:///{RunLayout(home.resolve()).study}"


def shown_url(url: str) -> str:
    """A storage URL fit for logs and records: its password masked."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def open_storage(url: str, attempts: int = 6) -> Any:
    """Optuna's RDBStorage for `url`. Workers starting together on a fresh database all create its
    tables and stamp its schema version; the losers of that race see "table already exists" or
    an IntegrityError (the version row another worker just wrote: "Duplicate entry 'v3.2.0.a'")
    and simply try again once the winner is done (creating the tables skips those that exist,
    stamping skips a stamped database)."""
    import optuna
    from sqlalchemy.exc import IntegrityError

    attempt = 0
    while True:
        try:
            # Heartbeats: a trial whose process died (killed job, lost node) is marked failed after
            # the grace period instead of staying RUNNING forever in a shared study.
            return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=120)
        except Exception as exc:
            attempt += 1
            lost_race = "already exists" in str(exc) or isinstance(exc, IntegrityError)
            if not lost_race or attempt == attempts:
                raise
            time.sleep(0.5 * attempt)


def open_study(cfg: DictConfig, space: dict[str, Any], run_dir: Path) -> Any:
    import optuna

    settings = cfg.search
    url = storage_url(cfg, run_dir)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats
    try:
        storage = open_storage(url)
    except Exception as exc:
        raise KilnError(
            f"search.storage={shown_url(url)}: cannot open it ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); give a reachable database URL, e.g. "
            f"sqlite:///search.db or mysql+pymysql://user:password@host/db"
        ) from exc
    seed = None if settings.seed is None else int(settings.seed) + int(settings.worker or 0)
    if settings.sampler == "grid":
        grid = {k: _grid_values(d) for k, d in space.items()}
        sampler: Any = optuna.samplers.GridSampler(grid, seed=seed)
    elif settings.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(settings.startup_trials))
    pruner: Any = (
        optuna.pruners.MedianPruner(
            n_startup_trials=int(settings.startup_trials), n_warmup_steps=int(settings.pruner_warmup_epochs)
        )
        if settings.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    direction: Literal["minimize", "maximize"] = "maximize" if cfg.monitor.mode == "max" else "minimize"
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=str(settings.study_name),
            sampler=sampler,
            pruner=pruner,
            direction=direction,
            load_if_exists=True,
        )
    except ValueError as exc:  # an existing study with the other direction
        raise KilnError(f"search.study_name={settings.study_name}: {exc}") from exc
    if cfg.run_dir and not settings.storage:
        # Continuing a search in its own directory: a trial still RUNNING there belonged to the
        # process that was interrupted. (In a shared database, heartbeats find such trials.)
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            print(f"kiln search: trial {trial.number} was interrupted; it is replaced", flush=True)
    done = finished_trials(study)
    print(
        f"kiln search: study {settings.study_name!r} in {shown_url(url)} ({done} finished trials so far)",
        flush=True,
    )
    if done >= int(settings.n_trials):
        print(
            f"kiln search: search.n_trials={settings.n_trials} already reached; raise it to search on",
            flush=True,
        )
    return study


def _grid_values(dist: Any) -> list[Any]:
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    return list(range(dist.low, dist.high + 1, dist.step))


def baseline_params(cfg: DictConfig, space: dict[str, Any]) -> dict[str, Any]:
    """The composed config's own values of the searched keys, where the space holds them."""
    baseline = {}
    for key, dist in space.items():
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        value = _choice(value)
        if _within(dist, value):
            baseline[key] = value
    return baseline


def _within(dist: Any, value: Any) -> bool:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    if not isinstance(value, int | float) or isinstance(value, bool) or not dist.low <= value <= dist.high:
        return False
    return not isinstance(dist, IntDistribution) or (int(value) - dist.low) % dist.step == 0


# -- one trial -----------------------------------------------------------------------------------


def run_trial(
    cfg: DictConfig, trial: Any, space: dict[str, Any], run_dir: Path, monitor: dict[str, str]
) -> float:
    import optuna

    from kiln.interrupts import Interrupted
    from kiln.runs import Run, RunLayout
    from kiln.tracking import finish_run
    from kiln.training.cross_validation import hydra_output_dir
    from kiln.training.run import train_once
    from kiln.training.settings import TrainSettings
    from kiln.training.trial_pruning import TrialPruning

    values = {key: _value(suggest(trial, key, dist)) for key, dist in space.items()}
    trial_dir = RunLayout(run_dir).trial(trial.number).root
    trial_cfg = trial_config(cfg, values)
    overrides = trial_overrides(values)
    trial.set_user_attr("run_dir", str(trial_dir))
    save_trial_hydra_files(trial_cfg, overrides, trial_dir)
    shown = " ".join(overrides)
    print(f"\nkiln search: trial {trial.number} in {trial_dir}: {shown}", flush=True)
    try:
        with hydra_output_dir(trial_dir):
            settings = TrainSettings.from_config(trial_cfg)
            train_once(settings, trial_dir, extra_callbacks=[TrialPruning(trial, monitor["metric"])])
    except optuna.TrialPruned:
        Run.reopen(trial_dir).update(status="pruned", error=None)
        print(f"kiln search: trial {trial.number} pruned", flush=True)
        raise
    except KilnError as exc:
        trial.set_user_attr("error", str(exc))
        print(f"kiln search: trial {trial.number} failed: {exc}", file=sys.stderr, flush=True)
        raise
    except Interrupted as exc:
        # Optuna records a failure for an Exception or a KeyboardInterrupt, not for kiln's signal
        # (a BaseException): told here, or the trial would stay RUNNING in the study for good. It
        # has no "error": it does not count towards search.n_trials, and continuing replaces it.
        trial.set_user_attr("interrupted", exc.signal_name)
        trial.study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        raise
    finally:
        finish_run(trial_cfg, trial_dir)  # logger=mlflow: the trial's record and status
    best = Run.read_record(trial_dir).get("best_checkpoint") or {}
    score = best.get("score")
    if score is None or not math.isfinite(float(score)):
        raise KilnError(f"trial {trial.number}: no finite best {monitor['metric']}")
    return float(score)


def suggest(trial: Any, key: str, dist: Any) -> Any:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(key, dist.low, dist.high, log=dist.log)


def trial_config(cfg: DictConfig, values: dict[str, Any]) -> DictConfig:
    trial_cfg = copy.deepcopy(cfg)
    with open_dict(trial_cfg):
        for key, value in values.items():
            OmegaConf.update(trial_cfg, key, value, merge=False)
    return trial_cfg


def trial_overrides(values: dict[str, Any]) -> list[str]:
    def text(value: Any) -> str:
        return json.dumps(value).replace(" ", "") if isinstance(value, list | dict) else str(value)

    return [f"{key}={text(value)}" for key, value in values.items()]


def save_trial_hydra_files(trial_cfg: DictConfig, overrides: list[str], trial_dir: Path) -> None:
    """.hydra/ as for any run: the config it trained and the overrides that train it alone."""
    from hydra.core.hydra_config import HydraConfig

    from kiln.runs import save_run_config

    searched = {o.split("=", 1)[0] for o in overrides}
    base = [
        o
        for o in [*HydraConfig.get().overrides.task, *space_file_overrides()]
        if not o.lstrip("+~").startswith(("search.", "hparams_search=", "run_dir="))
        and o.split("=", 1)[0] not in searched
    ]
    save_run_config(trial_dir, trial_cfg, [*base, *overrides])


# -- the result ----------------------------------------------------------------------------------


def summarize(study: Any, cfg: DictConfig, run_dir: Path, seconds: float) -> dict[str, Any]:
    from optuna.trial import TrialState

    from kiln.runs import RunLayout, write_atomically

    counts: dict[str, int] = {}
    for trial in study.trials:
        counts[trial.state.name.lower()] = counts.get(trial.state.name.lower(), 0) + 1
    completed = [t for t in study.trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if completed else None
    baseline = next((t for t in completed if t.user_attrs.get("baseline")), None)
    result: dict[str, Any] = {
        "study": str(cfg.search.study_name),
        "storage": shown_url(storage_url(cfg, run_dir)),
        "monitor": {"metric": str(cfg.monitor.metric), "mode": str(cfg.monitor.mode)},
        "states": counts,
        "seconds": round(seconds, 1),
        "best": None,
        "baseline": None,
    }
    if baseline is not None:
        result["baseline"] = {"trial": baseline.number, "score": baseline.value}
    if best is not None:
        overrides_file = RunLayout(Path(best.user_attrs.get("run_dir", ""))).overrides
        import yaml

        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        result["best"] = {
            "trial": best.number,
            "score": best.value,
            "params": {k: _value(v) for k, v in best.params.items()},
            "run_dir": best.user_attrs.get("run_dir"),
            "command": "kiln train " + " ".join(overrides),
        }
    write_atomically(RunLayout(run_dir).search_record, json.dumps(result, indent=2, default=str) + "\n")
    states = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(f"\nkiln search: {len(study.trials)} trials ({states}) in {seconds:.0f} s", flush=True)
    if best is not None:
        metric = cfg.monitor.metric
        line = f"kiln search: best trial {best.number}: {metric}={best.value:.4f}"
        if baseline is not None:
            line += f" (baseline, the composed config: {metric}={baseline.value:.4f})"
        print(line, flush=True)
        print(f"kiln search: train it: {result['best']['command']}", flush=True)
    print(f"kiln search: wrote {RunLayout(run_dir).search_record}", flush=True)
    return result
