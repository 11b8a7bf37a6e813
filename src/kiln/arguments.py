"""`key=value` arguments for the stages that are not Hydra apps (predict, report, tensorboard):
they answer without composing a config, and without importing Hydra or torch."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kiln.errors import KilnError


def key_value_settings(
    args: Sequence[str],
    defaults: Mapping[str, Any],
    stage: str,
    usage: str,
    *,
    example_key: str | None = None,
    parse: Callable[[str, str], Any] = lambda key, value: value,
) -> dict[str, Any]:
    """`key=value` arguments over `defaults`, for the stages that are not Hydra apps (predict,
    report, tensorboard). An argument without `=` or an unknown key is one KilnError naming it."""
    settings = dict(defaults)
    for arg in args:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+")
        if not sep or not key:
            example = f", e.g. {example_key}={arg}" if example_key else ""
            raise KilnError(f"{arg}: expected key=value{example}; {usage}")
        if key not in settings:
            raise KilnError(f"{key}: no such {stage} setting; settings: {', '.join(settings)}")
        settings[key] = parse(key, value)
    return settings
