"""Credentials never reach what kiln writes or prints: the one place that knows what a secret
looks like (`without_credentials`) and the two ways kiln keeps one out of its files.

What counts as a secret, case-insensitive where it is a name:
- the password of a URL: `mysql://user:PASSWORD@host/db`, also as pathlib leaves a URL that went
  through a Path (`http:/user:PASSWORD@host/file.csv`, one slash);
- a query parameter that names one: `?user=bob&password=SECRET` (`SECRET_PARAMETERS`);
- the value of an environment variable whose name says it is one (`MLFLOW_TRACKING_PASSWORD`,
  `HF_TOKEN`, `KILN_SECRET_DATA_URL`: `looks_secret`), wherever that value shows up.

`without_credentials` masks them in a text (every file written through kiln.runs.write_atomically,
the run's log, the one-line errors of kiln.errors); `mask_secrets` in a structure (what Lightning
writes from hyperparameters: hparams.yaml, TensorBoard, checkpoints; MLflow's params). A sweep
hands its jobs `${oc.env:KILN_SECRET_<KEY>}` in a secret's place and the secret in that
environment variable (`secrets_to_environment`): what Hydra writes for the sweep holds none.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import Any

MASK = "***"
SECRET_PREFIX = "KILN_SECRET_"  # the variables secrets_to_environment sets
SECRET_PARAMETERS = (
    "access_token",
    "api_key",
    "apikey",
    "password",
    "passwd",
    "pass",
    "pwd",
    "token",
    "secret",
)
SECRET_VARIABLE_ENDINGS = ("_PASSWORD", "_TOKEN", "_SECRET", "_API_KEY")
# A shorter value of such a variable (a flag, "1", "none") is not hunted in texts: it would mask
# ordinary words everywhere, and is no secret worth the name.
MIN_SECRET_LENGTH = 6

# scheme://user:PASSWORD@ and scheme:/user:PASSWORD@ (pathlib turns '//' into '/')
_CREDENTIAL = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*:/{1,2}[^:/@\s'\"]*):(?P<password>[^@\s'\"]+)@")
# name=SECRET, the name not the tail of a longer word (`bypass=` is no password)
_SECRET_PARAMETER = re.compile(
    r"(?P<head>(?<![A-Za-z0-9])(?:" + "|".join(SECRET_PARAMETERS) + r")=)(?P<password>[^&;#\s'\"]+)",
    re.IGNORECASE,
)


def without_credentials(text: str, secret_values: Sequence[str] | None = None) -> str:
    """`text` with every secret in it masked: scheme://user:***@host, ?password=***, and the value
    of every secret-looking environment variable as ***. A reference to an environment variable
    in a secret's place (`${oc.env:NAME}`, see `secrets_to_environment`) holds none and is kept.
    `secret_values`: those variables' values, when the caller has already read them."""
    for value in _secret_values() if secret_values is None else secret_values:
        text = text.replace(value, MASK)
    return _replace_secrets(text, lambda found: MASK)


def looks_secret(name: str) -> bool:
    """Does an environment variable's name say that its value is a secret?"""
    upper = name.upper()
    return upper.startswith(SECRET_PREFIX) or upper.endswith(SECRET_VARIABLE_ENDINGS)


def holds_secret(text: str) -> bool:
    """Does `text` hold a URL password or a secret query parameter (a reference aside)?"""
    return _replace_secrets(text, lambda found: MASK) != text


def _secret_values() -> list[str]:
    """The values of this process's secret-looking environment variables, longest first (one that
    holds another is masked whole)."""
    values = {
        value for name, value in os.environ.items() if looks_secret(name) and len(value) >= MIN_SECRET_LENGTH
    }
    return sorted(values, key=len, reverse=True)


def _replace_secrets(text: str, replacement: Callable[[str], str]) -> str:
    """`text` with each URL password and secret query parameter's value given by `replacement`
    (called with the secret), references kept."""

    def replaced(match: re.Match[str]) -> str:
        if _is_reference(match["password"]):
            return match.group(0)
        separator = ":" if match.re is _CREDENTIAL else ""
        ending = "@" if match.re is _CREDENTIAL else ""
        return f"{match['head']}{separator}{replacement(match['password'])}{ending}"

    return _SECRET_PARAMETER.sub(replaced, _CREDENTIAL.sub(replaced, text))


def _is_reference(password: str) -> bool:
    return password.startswith("${") and password.endswith("}")


def secret_variable(key: str) -> str:
    """The environment variable that gives the secret held at config key `key`:
    `data.url` -> KILN_SECRET_DATA_URL."""
    return SECRET_PREFIX + (re.sub(r"[^A-Za-z0-9]+", "_", key).strip("_").upper() or "URL")


def mask_secrets(value: Any) -> Any:
    """`value` with every secret masked in every string inside it (dicts, lists, tuples,
    OmegaConf containers); the very same object when nothing needed masking. For what Lightning
    writes from hyperparameters: hparams.yaml, TensorBoard's hparams, checkpoints."""
    return _masked(value, _secret_values())  # the environment read once, not once a string


def _masked(value: Any, secret_values: Sequence[str]) -> Any:
    if isinstance(value, str):
        return without_credentials(value, secret_values)
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        plain = OmegaConf.to_container(value, resolve=False)
        masked = _masked(plain, secret_values)
        return value if masked is plain else OmegaConf.create(masked)
    if isinstance(value, dict):
        items = {key: _masked(item, secret_values) for key, item in value.items()}
        if all(items[key] is item for key, item in value.items()):
            return value
        try:
            return type(value)(items)
        except TypeError:
            return items
    if isinstance(value, list | tuple):
        masked_items = [_masked(item, secret_values) for item in value]
        if all(new is old for new, old in zip(masked_items, value, strict=True)):
            return value
        try:
            return type(value)(masked_items)
        except TypeError:
            return masked_items
    return value


_secret_variables: dict[str, str] = {}  # secret -> the variable that carries it, in this process


def secrets_to_environment(cfg: Any) -> list[str]:
    """Take every URL password and secret query parameter out of a composed config, in place,
    Hydra's node included: each becomes `${oc.env:KILN_SECRET_<KEY>}` (resolved where the value is
    used) and the secret goes into that environment variable of this process, which its jobs
    inherit (a local job, and a SLURM job: sbatch exports the submitter's environment). What
    Hydra then writes (multirun.yaml) and pickles for SLURM jobs (.submitit/) holds no secret.
    Returns the variables set."""
    from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

    def variable(key: str, secret: str) -> str:
        if secret not in _secret_variables:
            name = secret_variable(key)
            while os.environ.get(name, secret) != secret:  # another secret under that name
                name += "_"
            _secret_variables[secret] = name
        os.environ[_secret_variables[secret]] = secret
        return _secret_variables[secret]

    def replaced(key: str, text: str) -> str:
        if key.startswith("hydra.overrides.") and "=" in text:  # an override: named by its key
            key = text.split("=", 1)[0].lstrip("+~")
        return _replace_secrets(text, lambda secret: f"${{oc.env:{variable(key, secret)}}}")

    def walk(node: DictConfig | ListConfig, raw: Any, key: str) -> None:
        """`raw`: the node as plain values, unresolved (interpolations as their text)."""
        children = list(raw.items()) if isinstance(raw, dict) else list(enumerate(raw))
        for child, value in children:
            name = f"{key}.{child}" if key else str(child)
            if isinstance(value, dict | list):  # a container, not an interpolation: no resolving
                walk(node[child], value, name)
            elif isinstance(value, str) and holds_secret(value):
                node[child] = replaced(name, value)

    if not isinstance(cfg, DictConfig):
        return sorted(set(_secret_variables.values()))
    raw = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    assert isinstance(raw, dict)
    # the user's keys first: a secret gets the variable named after the key that holds it
    with read_write(cfg), open_dict(cfg):
        walk(cfg, dict(sorted(raw.items(), key=lambda item: item[0] == "hydra")), "")
    return sorted(set(_secret_variables.values()))
