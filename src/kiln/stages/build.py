"""Turning config nodes into components, with mistakes reported by their config key.

A component raises `InvalidArgument("batch_size", "must be >= 1")`; the stage that built it from
`data` reports `data.batch_size=0: must be >= 1`. Components never see the config itself.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from kiln.config import check_target
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
            value = _lookup(config, cause.argument)
            shown = f"={value}" if value is not _MISSING else ""
            raise KilnError(f"{key}.{cause.argument}{shown}: {cause.message}") from cause
        if isinstance(cause, KilnError):
            raise cause from None
        raise


_MISSING = object()


def _lookup(config: dict[str, Any], argument: str) -> Any:
    value: Any = config
    for part in argument.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value
