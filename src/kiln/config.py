"""Where kiln's configs live, how one is composed, and how a config is checked before anything
it names is built. (How a stage runs under Hydra: kiln.stages.runner.)
"""

from __future__ import annotations

import inspect
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from kiln.errors import KilnError, output_dir_error

# Arguments a stage passes at run time, so a config may (and usually does) leave them out.
RUNTIME_ARGUMENTS = frozenset(
    {
        "input_shape",
        "num_outputs",
        "net",
        "task",
        "class_names",
        "feature_names",
        "params",
        "callbacks",
        "logger",
        "plugins",
        "optimizer",
        "run_dir",  # a tracker's (kiln.tracking)
    }
)
# Keys Hydra reads itself, never passed to the target.
HYDRA_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})


def config_dir() -> Path:
    """The configs: shipped inside the package when installed, conf/ at the top of a checkout."""
    packaged = Path(__file__).parent / "conf"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if checkout.is_dir():
        return checkout
    raise KilnError(f"kiln's configs are missing: neither {packaged} nor {checkout} exists; reinstall kiln")


_run_names: dict[str, str] = {}
RUN_NAME_VARIABLE = "KILN_RUN_NAME"


def new_run_name(base: str | None = None) -> str:
    """A run directory name that stays unique when jobs start in the same second (microseconds + pid),
    or, inside a SLURM job, `slurm-<job id>` (see `_draw_run_name`).

    Drawn once per stage invocation: Hydra and Lightning read hydra.run.dir more than once.
    """
    if "name" not in _run_names:
        # A sweep's jobs on SLURM start in other processes, some of them again after a requeue:
        # the name drawn by the submitting process travels to them in the environment.
        _run_names["name"] = os.environ.get(RUN_NAME_VARIABLE) or _draw_run_name(base)
        os.environ[RUN_NAME_VARIABLE] = _run_names["name"]
    return _run_names["name"]


def forget_run_name() -> None:
    """The next `new_run_name` draws a new name: each invocation of a stage is a new run."""
    _run_names.clear()
    os.environ.pop(RUN_NAME_VARIABLE, None)


def run_dir(requested: str | None, base: str) -> str:
    """`run_dir=...` continues an existing run; otherwise a new directory under `base`."""
    return str(requested) if requested else f"{base}/{new_run_name(base)}"


def _draw_run_name(base: str | None = None) -> str:
    job_id = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job_id:  # a requeued SLURM job must find its own directory again
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        stem = f"slurm-{job_id}" + (f"_{task}" if task else "")
        if base is None:
            return stem
        from kiln import runs, slurm

        # several `kiln train` in one allocation: slurm-<id>, slurm-<id>.2, ...; each the same after a requeue
        return runs.job_run_name(Path(base), stem, requeued=slurm.is_requeued())
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f") + f"_{os.getpid()}"


def is_rank_zero() -> bool:
    """Rank 0 of a distributed run, however it was launched (Lightning, torchrun, SLURM), or no ranks."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def log_file(path: str) -> str:
    """The run's log file for rank 0; the other ranks of a DDP run write no files of their own."""
    return path if is_rank_zero() else os.devnull


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    from kiln import runs

    if not OmegaConf.has_resolver("kiln_run_dir"):
        OmegaConf.register_new_resolver("kiln_run_dir", run_dir)
    if not OmegaConf.has_resolver("kiln_log_file"):
        OmegaConf.register_new_resolver("kiln_log_file", log_file)
    runs.register_layout_resolvers()
    if not OmegaConf.has_resolver("kiln_slurm_tasks"):
        from kiln import slurm

        OmegaConf.register_new_resolver("kiln_slurm_tasks", slurm.tasks_for)
        OmegaConf.register_new_resolver("kiln_slurm_gpus", slurm.gpus_for)


def continued_command_line(arguments: list[str]) -> list[str]:
    """`kiln train`'s overrides (and Hydra flags): a continued run (`run_dir=R resume=auto`, a
    requeued SLURM job) gets R's saved overrides first (kiln.runs.with_saved_overrides), so its
    recovery line continues that run, not one of today's defaults. A sweep (-m) is left alone."""
    from kiln import runs, slurm

    runs.remember_new_run_dir(arguments)
    if any(argument in ("-m", "--multirun") for argument in arguments):
        return list(arguments)
    return runs.with_saved_overrides(arguments, requeued=slurm.is_requeued())


def compose(config_name: str, overrides: Sequence[str] = (), extra_config_dir: str | None = None) -> Any:
    """A stage's config composed as the CLI composes it (kiln's conf/, `extra_config_dir` as
    `--config-dir`, then `overrides`), with Hydra's runtime set as for a run, so that the stage
    can run in this process, without a subprocess:

        cfg = compose("train", ["data=digits", "trainer.max_epochs=1", f"run_dir={path}"])
        kiln.stages.train.main.call(cfg)          # the work of `kiln train ...`

    As Hydra does for a run, the run directory is made and the composed config and the overrides
    are saved in its `.hydra/` (unless the stage's config sets `hydra.output_subdir: null`)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    register_resolvers()
    forget_run_name()
    GlobalHydra.instance().clear()
    arguments = list(overrides)
    if config_name == "train":
        arguments = continued_command_line(arguments)
    if extra_config_dir is not None:
        arguments.append(f"hydra.searchpath=[file://{Path(extra_config_dir).resolve()}]")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=arguments, return_hydra_config=True)
    output_dir = Path(str(OmegaConf.select(cfg, "hydra.run.dir"))).resolve()
    cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    subdir = cfg.hydra.output_subdir
    with open_dict(cfg):
        del cfg["hydra"]
    try:  # Hydra makes the run directory before the stage starts, whatever output_subdir says
        output_dir.mkdir(parents=True, exist_ok=True)
        if subdir is not None:
            (output_dir / str(subdir)).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KilnError(output_dir_error(exc, output_dir, cfg)) from exc
    if subdir is not None:
        import yaml

        from kiln.runs import RunLayout

        saved = output_dir / str(subdir)  # Hydra's .hydra/ by default: the layout's file names inside
        OmegaConf.save(cfg, saved / RunLayout.SAVED_CONFIG)
        (saved / RunLayout.OVERRIDES).write_text(yaml.safe_dump(list(overrides)))
    return cfg


# ---------------------------------------------------------------------------------------------
# Checking `_target_` nodes against their signatures, before anything is built
# ---------------------------------------------------------------------------------------------


def check_config(cfg: Any) -> None:
    """Check every `_target_` node of a composed config against its signature, before anything runs.

    A typo in `trainer.max_epochs=abc` then fails in a second, not after the data is loaded and the
    model is built. Each component is checked again, with its run-time arguments, when it is built.
    Every `_target_` must first be one a config may call (kiln.targets): a refused one stops the
    stage before anything is imported or run.
    """
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        return
    config = OmegaConf.to_container(cfg, resolve=True)
    # `data.seed: ${seed}`: a bad value is reported under the key the user wrote (seed), not its copy.
    sources = interpolation_sources(OmegaConf.to_container(cfg, resolve=False))
    if isinstance(config, dict):
        check_settings(typing.cast(dict[str, Any], config), sources)
    if isinstance(config, dict) and isinstance(config.get("trainer"), dict):
        from kiln.hardware import check_accelerator, with_resolved_precision

        check_accelerator(config["trainer"], _group_choice("trainer"))
        config["trainer"] = with_resolved_precision(config["trainer"])  # `auto` is kiln's, not Lightning's
    from kiln.targets import check_name

    nodes = list(iter_targets(config))
    for key, node in nodes:  # what a config may call, by name, before any target is imported
        check_name(key, node["_target_"])
    # The trainer first: other nodes copy its values (a scheduler's T_max: ${trainer.max_epochs}), and
    # a bad value must be reported under the key the user wrote, not under a copy of it.
    for key, node in sorted(nodes, key=lambda item: not item[0].startswith("trainer")):
        check_target(key, node, sources=sources)


# The range Lightning's seed_everything accepts (numpy's): outside it, a ValueError after the run started.
SEED_RANGE = (0, 2**32 - 1)


def check_settings(config: dict[str, Any], sources: Mapping[str, str]) -> None:
    """Values kiln itself reads, checked before anything is built: the run's `seed` and the
    trainer's epoch limit (Lightning's own messages for these name no config key)."""
    if "seed" in config:
        seed = config["seed"]
        if not _is_int(seed) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
            raise KilnError(
                f"seed={seed!r}: needs an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]} (it seeds the "
                "data splits, the initial weights and the batch order), e.g. seed=42"
            )
    trainer = config.get("trainer")
    if isinstance(trainer, dict):
        check_max_epochs(trainer, config, sources)


def check_max_epochs(trainer: dict[str, Any], config: dict[str, Any], sources: Mapping[str, str]) -> None:
    """`trainer.max_epochs`: an integer >= 1, or -1 for no epoch limit when something else ends the
    run (early stopping, trainer.max_steps or trainer.max_time). null is Lightning's default (1000)."""
    epochs = trainer.get("max_epochs")
    if not _is_int(epochs):
        return  # null is Lightning's default; a wrong type is named by the signature check
    allowed = (
        "allowed: an integer >= 1, or -1 for no limit (early stopping, trainer.max_steps or "
        "trainer.max_time then ends the run)"
    )
    if epochs == 0:
        raise KilnError(
            f"trainer.max_epochs=0: nothing would be trained; {allowed}, e.g. trainer.max_epochs=20"
        )
    if epochs < -1:
        raise KilnError(f"trainer.max_epochs={epochs}: {allowed}, e.g. trainer.max_epochs=20")
    if epochs != -1:
        return
    callbacks = config.get("callbacks")
    early_stopping = isinstance(callbacks, dict) and isinstance(callbacks.get("early_stopping"), dict)
    max_steps, max_time = trainer.get("max_steps"), trainer.get("max_time")
    if not early_stopping and not (_is_int(max_steps) and max_steps > 0) and max_time is None:
        raise KilnError(
            "trainer.max_epochs=-1: no epoch limit, and nothing else would end the run (callbacks.early_stopping "
            "is off, no trainer.max_steps or trainer.max_time); set trainer.max_epochs=20, or keep early stopping on"
        )
    for key, source in sorted(sources.items()):
        if source == "trainer.max_epochs" and not key.startswith("trainer."):
            raise KilnError(
                f"trainer.max_epochs=-1: {key} copies it (${{trainer.max_epochs}}) and needs a finite number of "
                f"epochs; set trainer.max_epochs=20, or give {key} a number of its own ({key}=20)"
            )


def _is_int(value: Any) -> typing.TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _group_choice(group: str) -> str | None:
    """The option chosen for a config group in this run (`trainer=gpu`), when Hydra knows it."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choice = HydraConfig.get().runtime.choices.get(group)
    except Exception:  # not under Hydra (a config composed by hand)
        return None
    return str(choice) if choice is not None else None


_INTERPOLATION = re.compile(r"^\$\{([A-Za-z_][\w.]*)\}$")


def interpolation_sources(node: Any, key: str = "") -> dict[str, str]:
    """`{"data.seed": "seed", "model.scheduler.T_max": "trainer.max_epochs"}`: each value of an
    unresolved config that is a plain copy of another key (`${seed}`), followed to the key it
    finally copies."""
    links = dict(_interpolations(node, key))
    sources = {}
    for copy, source in links.items():
        seen = {copy}
        while source in links and source not in seen:  # a copy of a copy
            seen.add(source)
            source = links[source]
        sources[copy] = source
    return sources


def _interpolations(node: Any, key: str) -> typing.Iterator[tuple[str, str]]:
    if isinstance(node, Mapping):
        for child_key, child in node.items():
            yield from _interpolations(child, f"{key}.{child_key}" if key else str(child_key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from _interpolations(child, f"{key}[{index}]")
    elif isinstance(node, str) and (match := _INTERPOLATION.match(node.strip())):
        yield key, match.group(1)


def iter_targets(node: Any, key: str = "") -> typing.Iterator[tuple[str, Mapping[str, Any]]]:
    """Every mapping with a `_target_` inside a (plain, resolved) config, with its dotted key."""
    if isinstance(node, Mapping):
        if "_target_" in node:
            yield key, node
        for child_key, child in node.items():
            yield from iter_targets(child, f"{key}.{child_key}" if key else str(child_key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from iter_targets(child, f"{key}[{index}]")


def check_target(
    key: str,
    node: Mapping[str, Any],
    allow_missing: frozenset[str] = RUNTIME_ARGUMENTS,
    sources: Mapping[str, str] | None = None,
) -> None:
    """Raise KilnError if `node`'s arguments do not bind to its `_target_`'s signature or types.

    `sources` maps an argument's key to the key it copies (`data.seed` -> `seed`): a bad value is
    reported under the key to fix. What a target may be at all is kiln.targets' rule, applied
    before the target is imported."""
    from kiln import targets

    target_name = node["_target_"]
    target = targets.resolve(key, target_name)
    check_callback(key, target_name, target)
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return  # builtins without a signature: nothing to check
    params = signature.parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    hints = _type_hints(target)
    args = {k: v for k, v in node.items() if k not in HYDRA_KEYS}
    short = target_name.rsplit(".", 1)[-1]
    for name, value in args.items():
        if name not in params:
            if takes_kwargs:
                continue
            valid = ", ".join(p for p in params if p not in ("self", "args", "kwargs"))
            raise KilnError(f"{key}.{name}: {short} has no argument '{name}'; its arguments are: {valid}")
        hint = hints.get(name)
        if hint is not None and not _fits(value, hint):
            source = (sources or {}).get(f"{key}.{name}")
            if source is not None:  # the user wrote the value elsewhere: name that key
                raise KilnError(
                    f"{source}={value!r}: expected {_describe(hint)} ({key}.{name}=${{{source}}} is "
                    f"{short}'s '{name}'); fix the value, e.g. {source}={_example(hint)}"
                )
            raise KilnError(
                f"{key}.{name}={value!r}: expected {_describe(hint)} ({short}'s '{name}'); "
                f"fix the value, e.g. {key}.{name}={_example(hint)}"
            )
    if node.get("_partial_"):
        return
    for name, param in params.items():
        required = param.default is param.empty and param.kind in (
            param.POSITIONAL_OR_KEYWORD,
            param.KEYWORD_ONLY,
        )
        if required and name not in args and name not in allow_missing and name != "self":
            raise KilnError(f"{key}.{name}: {short} needs this argument; set {key}.{name}=VALUE")


def is_callback_key(key: str) -> bool:
    """`callbacks.<name>`: a node the Trainer receives as one of its callbacks."""
    return re.fullmatch(r"callbacks\.[^.\[\]]+", key) is not None


def check_callback(key: str, target_name: str, target: Any) -> None:
    """A `callbacks.<name>` class must be a Lightning Callback (a builder function is checked on
    what it returns, when it is built): otherwise the Trainer fails with a traceback, after the
    data and the model were built."""
    if not is_callback_key(key) or not inspect.isclass(target):
        return
    from lightning.pytorch.callbacks import Callback

    if not issubclass(target, Callback):
        raise KilnError(not_a_callback(key, target_name))


def not_a_callback(key: str, target_name: str) -> str:
    return (
        f"{key}._target_={target_name}: not a Lightning callback; {key} must build a "
        "lightning.pytorch.callbacks.Callback, e.g. "
        f"+{key}={{_target_: lightning.pytorch.callbacks.LearningRateMonitor}}, or remove it with ~{key}"
    )


def _type_hints(target: Any) -> dict[str, Any]:
    function = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(function)
    except Exception:
        hints = {}
    # A class may declare its signature: kiln's DataModules add the shared data settings to it.
    declared = vars(target).get("__signature__") if inspect.isclass(target) else None
    if isinstance(declared, inspect.Signature):
        for name, parameter in declared.parameters.items():
            if parameter.annotation is not parameter.empty and not isinstance(parameter.annotation, str):
                hints.setdefault(name, parameter.annotation)
    return hints


def _fits(value: Any, hint: Any) -> bool:
    """Does a config value fit a type hint? Unknown hints fit anything (we only catch clear mistakes)."""
    origin = typing.get_origin(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence, typing.Sequence) or hint in (list, tuple):
        return isinstance(value, list | tuple)
    if origin in (dict, Mapping) or hint is dict:
        return isinstance(value, Mapping)
    if inspect.isclass(hint) and hint.__module__ == "pathlib":
        return isinstance(value, str | os.PathLike)
    return True


def _describe(hint: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(arg) for arg in typing.get_args(hint)))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in typing.get_args(hint))
    if hint in names:
        return names[hint]
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        return "a list"
    return getattr(hint, "__name__", str(hint))


def _example(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _example(args[0]) if args else "null"
    if origin is typing.Literal:
        return str(typing.get_args(hint)[0])
    return {int: "10", float: "0.5", bool: "true", str: "name"}.get(hint, "...")
