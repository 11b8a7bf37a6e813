"""What a config may call: the rule every `_target_` passes before kiln imports or builds it.

A `_target_` names a Python callable that kiln calls with the node's arguments. A run directory
keeps its config (`.hydra/config.yaml`) and `kiln compress/export run=<dir>`, `api.load` and
`api.load_module` rebuild the run from it: if a config could name any callable, a shared run
directory would be code (`{_target_: torch.load, f: notes.pt, weights_only: false}` runs a
pickle; `pathlib.Path.write_text` writes any file). kiln refuses pickled code in checkpoints, so
it refuses it in configs too. A config, typed on the command line, in a `--config-dir` or saved
in a run, may name only:

  - kiln's own components, and the library classes kiln's shipped configs name (`ALLOWED`:
    torch.optim, torch.nn layers, Lightning's Trainer, callbacks and loggers, torchmetrics'
    classification and regression metrics, albumentations);
  - your own project's code: a module that is not installed (neither in the standard library nor
    in site-packages) and not inside a run directory (a run directory is data, never code);
  - the modules listed in the environment variable KILN_TRUSTED_TARGETS (comma-separated,
    e.g. `timm,mycompany.models`), for an installed library you choose to trust.

`DENIED` is never callable, whatever KILN_TRUSTED_TARGETS says: loading pickles, touching files,
starting programs, running code from text.

The rule is decided twice. First on the written name, before anything is imported (importing a
module runs it), using where the module's file lies (found without importing it). Then on the
object the name resolves to, by the module that defines it: `kiln.config.os.system` starts in an
allowed package but is `os.system`, and is refused.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.runs import RunLayout

TRUSTED_VARIABLE = "KILN_TRUSTED_TARGETS"

# Dotted prefixes (whole segments) of what kiln's configs name; a name matches an entry that is
# the name itself or one of its leading packages.
ALLOWED = (
    "kiln.models",
    "kiln.data",
    "kiln.compression.steps",
    "kiln.training.callbacks",
    "kiln.sweep.SweepCallback",
    "kiln.tracking.ParentRun",
    "kiln.tracking.mlflow.ParentRun",
    "kiln.tracking.tensorboard_and_mlflow",  # a saved run's logger=mlflow from before trackers
    "kiln.tracking.mlflow.tensorboard_and_mlflow",
    "kiln.tracking.tensorboard.TensorBoardTracker",
    "kiln.tracking.mlflow.MLflowTracker",
    "torch.optim",  # optimizers and torch.optim.lr_scheduler
    "torch.nn.modules",  # layers and losses (torch.nn.Linear is defined in torch.nn.modules.linear)
    "lightning.pytorch.trainer",  # lightning.pytorch.Trainer
    "lightning.pytorch.callbacks",
    "lightning.pytorch.loggers",
    "torchmetrics.classification",
    "torchmetrics.regression",
    "albumentations",
)
SHORT_LIST = (
    "kiln's components, torch.optim, torch.nn layers, Lightning's Trainer, callbacks and loggers, "
    "torchmetrics, albumentations and your own project's code"
)
# Never callable from a config, and why.
DENIED = {
    "torch.load": "loads a pickle, which runs code",
    "torch.serialization": "loads a pickle, which runs code",
    "torch.hub": "downloads and runs code",
    "torch.package": "loads a pickle, which runs code",
    "torch.jit.load": "loads a program",
    "torch.save": "writes files",
    "pickle": "loads a pickle, which runs code",
    "_pickle": "loads a pickle, which runs code",
    "dill": "loads a pickle, which runs code",
    "joblib": "loads a pickle, which runs code",
    "numpy.load": "can load a pickle, which runs code",
    "pandas.read_pickle": "loads a pickle, which runs code",
    "marshal": "loads code",
    "shelve": "loads a pickle, which runs code",
    "os": "touches files and starts programs",
    "posix": "touches files and starts programs",
    "nt": "touches files and starts programs",
    "pathlib": "reads and writes files",
    "shutil": "copies and deletes files",
    "tempfile": "writes files",
    "io": "reads and writes files",
    "subprocess": "starts programs",
    "pty": "starts programs",
    "builtins": "runs code from text (eval, exec, open, __import__)",
    "importlib": "imports and runs code",
    "runpy": "runs code",
    "code": "runs code from text",
    "codeop": "compiles code from text",
    "ctypes": "calls native code",
    "sys": "changes the interpreter",
    "socket": "opens network connections",
    "urllib": "opens network connections",
    "webbrowser": "starts programs",
}


def resolve(key: str, name: str) -> Any:
    """The callable `name` (the `_target_` at config key `key`), imported only if the rule above
    allows it; KilnError in one line naming the key, the target and why otherwise."""
    from hydra.utils import get_object

    check_name(key, name)
    try:
        target = get_object(name)
    except Exception as exc:
        detail = " ".join(str(exc).split())  # Hydra's message spans lines
        raise KilnError(
            f"{key}._target_={name}: cannot import it ({type(exc).__name__}: {detail}); "
            "check the module path and that its package is installed"
        ) from exc
    check_resolved(key, name, target)
    return target


def check_name(key: str, name: str) -> None:
    """Refuse `name` by its dotted name and where its module's file lies, importing nothing."""
    if not isinstance(name, str) or not name.strip():
        raise KilnError(f"{key}._target_={name!r}: expected a dotted name such as torch.optim.AdamW")
    if reason := _denied(name):
        raise _refusal(key, name, reason)
    if _matches(name, ALLOWED) or _matches(name, _trusted()) or _is_trusted_library(name):
        return
    top = name.split(".", 1)[0]
    if top in sys.stdlib_module_names:
        raise _refusal(key, name, f"{top} is Python's standard library")
    locations = _top_level_locations(top)
    if locations is None:
        return  # not importable: resolve() says so, with the import error
    if problem := _not_project_code(top, locations):
        raise _refusal(key, name, problem, trustable=True)


def check_resolved(key: str, name: str, target: Any) -> None:
    """Refuse what `name` turned out to be: judged by the module that defines it."""
    module = getattr(target, "__module__", None)
    home = f"{module}.{getattr(target, '__qualname__', '')}".rstrip(".")
    if not callable(target) or not isinstance(module, str):
        raise KilnError(f"{key}._target_={name}: not a class or a function; a _target_ names one")
    if reason := _denied(home):
        raise _refusal(key, name, f"it is {home}: {reason}")
    if _matches(home, ALLOWED) or _matches(home, _trusted()):
        return
    file = getattr(sys.modules.get(module), "__file__", None)
    problem = _not_project_code(module, [Path(file)] if file else [])
    if problem:
        shown = "" if home == name else f"it is {home}: "
        raise _refusal(key, name, shown + problem, trustable=True)


def _refusal(key: str, name: str, reason: str, trustable: bool = False) -> KilnError:
    """`model.net._target_=torch.load: torch.load loads a pickle, which runs code; kiln ...`"""
    trust = f"; to trust an installed library, list it in {TRUSTED_VARIABLE}" if trustable else ""
    return KilnError(
        f"{key}._target_={name}: {reason}; kiln instantiates only {SHORT_LIST} "
        f'(README: "What a config may call"{trust})'
    )


def _matches(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _denied(name: str) -> str | None:
    for prefix, reason in DENIED.items():
        if _matches(name, (prefix,)):
            return f"{prefix} {reason}"
    return None


def _trusted() -> list[str]:
    return [part.strip() for part in os.environ.get(TRUSTED_VARIABLE, "").split(",") if part.strip()]


def _is_trusted_library(name: str) -> bool:
    """A name inside a library that `ALLOWED` names part of (`lightning.pytorch.Trainer`,
    `torchmetrics.Accuracy`: re-exports). Importing it runs only that library's own code; what
    the name resolves to is judged afterwards (check_resolved)."""
    return name.split(".", 1)[0] in {prefix.split(".", 1)[0] for prefix in ALLOWED}


def _top_level_locations(top: str) -> list[Path] | None:
    """Where the top-level module `top` lives (its file, or a package's folders), found the way
    `import` finds it but without running it; None if nothing by that name can be imported."""
    loaded = sys.modules.get(top)
    if loaded is not None:
        paths = list(getattr(loaded, "__path__", []) or [])
        file = getattr(loaded, "__file__", None)
        return [Path(p) for p in paths] or ([Path(file)] if file else [])
    try:
        spec = importlib.util.find_spec(top)  # a top-level name: finding it imports nothing
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return [Path(p) for p in spec.submodule_search_locations]
    return [Path(spec.origin)] if spec.origin and spec.has_location else []


def _not_project_code(module: str, locations: list[Path]) -> str | None:
    """Why `module`, found at `locations`, is not the user's own project code; None if it is."""
    if not locations:
        return f"{module} is built into Python"
    installed = _installed_folders()
    for location in locations:
        resolved = location.resolve()
        if any(part in ("site-packages", "dist-packages") for part in resolved.parts) or any(
            resolved.is_relative_to(folder) for folder in installed
        ):
            return f"{module} is an installed library ({resolved}) outside kiln's list"
        if run := _enclosing_run(resolved):
            return f"{module} lies inside the run directory {run}, and a run directory is data, not code"
    return None


def _installed_folders() -> list[Path]:
    names = ("stdlib", "platstdlib", "purelib", "platlib")
    return [Path(sysconfig.get_paths()[name]).resolve() for name in names if name in sysconfig.get_paths()]


def _enclosing_run(path: Path) -> Path | None:
    """The run directory (a folder with kiln's run record or a saved config) holding `path`."""
    for folder in path.parents:
        if RunLayout(folder).record.is_file() or RunLayout(folder).saved_config.is_file():
            return folder
    return None
