"""Turning config nodes into components, with mistakes reported by their config key.

A component raises `InvalidArgument("batch_size", "must be >= 1")`; the stage that built it from
`data` reports `data.batch_size=0: must be >= 1`. Components never see the config itself.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kiln.config import HYDRA_KEYS, check_target, is_callback_key, iter_targets, not_a_callback
from kiln.errors import InvalidArgument, KilnError


def plain(node: Any) -> Any:
    """A resolved plain dict/list from a config node (interpolations and all)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build(key: str, node: Any, **runtime: Any) -> Any:
    """Instantiate `node` (found at config key `key`), checking its arguments first.

    `runtime` holds arguments only known at run time (the net's input shape, the callbacks...).
    Each is passed only if the target's signature names it and the config does not set it
    (kiln.contract.runtime_arguments): a user's class takes what it asks for, nothing more.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import get_object, instantiate

    from kiln.contract import runtime_arguments

    config = plain(node)
    if not isinstance(config, dict) or "_target_" not in config:
        raise KilnError(f"{key}: expected a config with a _target_, got {config!r}")
    check_allowed_targets(config, key)
    check_target(key, config)
    target = get_object(config["_target_"])
    runtime = runtime_arguments(target, runtime, config)
    if not config.get("_partial_"):
        _check_nothing_missing(key, target, {*config, *runtime})
    try:
        built = instantiate(config, _convert_="all", **runtime)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, InvalidArgument):
            raise KilnError(_describe_invalid(key, config, cause)) from cause
        if isinstance(cause, KilnError):
            raise cause from None
        raise
    if is_callback_key(key):
        _check_is_callback(key, config["_target_"], built)
    return built


def check_allowed_targets(config: Any, key: str = "") -> None:
    """Every `_target_` in `config`, nested ones included (Hydra builds those too), is one a config
    may call (kiln.targets), checked before any of them is imported or built."""
    from kiln.targets import check_name, resolve

    nodes = list(iter_targets(config, key))
    for node_key, node in nodes:  # every name first: importing one module can already run code
        check_name(node_key, node["_target_"])
    for node_key, node in nodes:
        resolve(node_key, node["_target_"])


def _check_is_callback(key: str, target_name: str, built: Any) -> None:
    """A builder function named under `callbacks.<name>` must return a Lightning Callback."""
    from lightning.pytorch.callbacks import Callback

    if not isinstance(built, Callback):
        raise KilnError(not_a_callback(key, target_name))


def _check_nothing_missing(key: str, target: Any, supplied: set[str]) -> None:
    """A required argument that neither the config nor the run supplies is named now, with the
    key to set, instead of a TypeError from inside the class."""
    import inspect

    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return
    for name, param in parameters.items():
        required = param.default is param.empty and param.kind in (
            param.POSITIONAL_OR_KEYWORD,
            param.KEYWORD_ONLY,
        )
        if required and name not in supplied and name != "self":
            short = str(getattr(target, "__name__", target))
            raise KilnError(
                f"{key}.{name}: {short} needs this argument and the data does not provide it; set {key}.{name}=VALUE"
            )


def build_module(cfg: DictConfig, datamodule: Any) -> Any:
    """The LightningModule of `cfg.model` (datamodule set up). A `model.net` node, when there is
    one, is built first with the input shape and output count the datamodule knows. Each target
    is given only the run-time arguments its signature names (kiln.contract): KilnModule takes
    the net, task, classes and seed; a user's own module usually takes none of them."""
    from kiln import contract

    facts = {
        "task": contract.task(datamodule),
        "class_names": contract.class_names(datamodule),
        "input_shape": _known(datamodule, "input_shape"),
        "num_outputs": _known(datamodule, "num_outputs"),
    }
    model_config = plain(cfg.model)  # resolved against the whole config (e.g. T_max: ${trainer.max_epochs})
    net_config = model_config.get("net") if isinstance(model_config, dict) else None
    runtime: dict[str, Any] = {}
    if isinstance(net_config, dict) and "_target_" in net_config:
        model_config.pop("net")
        runtime["net"] = build(
            "model.net", net_config, input_shape=facts["input_shape"], num_outputs=facts["num_outputs"]
        )
        _share_data_config(runtime["net"], datamodule)
    shape = facts["input_shape"]
    return build(
        "model",
        model_config,
        **runtime,
        task=facts["task"],
        input_shape=list(shape) if shape is not None else None,
        class_names=facts["class_names"],
        seed=cfg.seed,
    )


def _share_data_config(net: Any, datamodule: Any) -> None:
    """A timm backbone knows its own preprocessing (kiln.models.backbones.Backbone.data_config:
    mean, std, interpolation, input size); kiln's image datamodules take what their data config
    leaves unset, and say what they took in one line."""
    data_config = getattr(net, "data_config", None)
    use = getattr(datamodule, "use_net_data_config", None)
    if isinstance(data_config, dict) and callable(use):
        use(data_config, str(getattr(net, "name", "the net")))


def _known(datamodule: Any, name: str) -> Any:
    """An attribute the datamodule may know (kiln's do, once set up); None if not."""
    try:
        return getattr(datamodule, name, None)
    except (AssertionError, AttributeError, RuntimeError):
        return None


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
