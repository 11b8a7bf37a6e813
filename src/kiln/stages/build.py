"""Turning config nodes into components, with mistakes reported by their config key.

A component raises `InvalidArgument("batch_size", "must be >= 1")`; the stage that built it from
`data` reports `data.batch_size=0: must be >= 1`. Components never see the config itself.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kiln.config import HYDRA_KEYS, check_target
from kiln.errors import InvalidArgument, KilnError


def plain(node: Any) -> Any:
    """A resolved plain dict/list from a config node (interpolations and all)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build(key: str, node: Any, **runtime: Any) -> Any:
    """Instantiate `node` (found at config key `key`), checking its arguments first.

    `runtime` holds arguments only known at run time (the net's input shape, the callbacks...).
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    config = plain(node)
    if not isinstance(config, dict) or "_target_" not in config:
        raise KilnError(f"{key}: expected a config with a _target_, got {config!r}")
    check_target(key, config)
    try:
        return instantiate(config, _convert_="all", **runtime)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, InvalidArgument):
            raise KilnError(_describe_invalid(key, config, cause)) from cause
        if isinstance(cause, KilnError):
            raise cause from None
        raise


_MISSING = object()


def _describe_invalid(key: str, config: dict[str, Any], error: InvalidArgument) -> str:
    """`data.batch_size=0: must be >= 1`; for a nested component (an optimizer rejecting its
    learning rate) the argument of that component the message is about: `model.optimizer.lr=-0.1`."""
    value = _lookup(config, error.argument)
    if value is _MISSING:
        return f"{key}.{error.argument}: {error.message}"
    if not isinstance(value, dict):
        return f"{key}.{error.argument}={value}: {error.message}"
    component = f"{key}.{error.argument}"
    short = str(value.get("_target_", component)).rsplit(".", 1)[-1]
    culprits = [
        (name, arg)
        for name, arg in value.items()
        if name not in HYDRA_KEYS and not isinstance(arg, dict | list) and _mentions(error.message, name, arg)
    ]
    if len(culprits) == 1:
        name, arg = culprits[0]
        return f"{component}.{name}={arg}: {short} rejects it ({error.message}); fix {component}.{name}"
    return f"{component}: {short} rejects its arguments ({error.message}); fix them under {component}"


def _mentions(message: str, name: str, value: Any) -> bool:
    """Does an error message name this argument or quote its value (`Invalid learning rate: -0.1`)?"""
    if re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", message):
        return True
    if value is None or isinstance(value, bool):
        return False
    return re.search(rf"(?<![\w.-]){re.escape(str(value))}(?![\w.])", message) is not None


def _lookup(config: dict[str, Any], argument: str) -> Any:
    value: Any = config
    for part in argument.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value
