"""A run directory back into what a later stage needs, from that run's own saved config.

    open_run(dir)   checks that it is a run (says what is missing), reads run.json and .hydra/config.yaml
    load_trained()  rebuilds the datamodule from the saved config (same seed: same splits, same fitted
                    preprocessing) and the LightningModule from checkpoints/best.ckpt (weights_only=True)

Today's conf/ is never read here: a run is compressed and exported with the data and model it was
trained with.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kiln.errors import KilnError

SAVED_CONFIG = Path(".hydra") / "config.yaml"
RUN_RECORD = "run.json"
BEST = Path("checkpoints") / "best.ckpt"


@dataclass
class RunInfo:
    directory: Path
    cfg: DictConfig
    record: dict[str, Any]
    monitor: dict[str, str]
    config_hash: str

    @property
    def best_checkpoint(self) -> Path:
        return self.directory / BEST


def open_run(path: str | Path | None, key: str = "run") -> RunInfo:
    if path is None or str(path) in ("", "None"):
        raise KilnError(f"{key}: give the run directory written by kiln train, e.g. {key}=runs/train/<run>")
    directory = Path(str(path))
    if not directory.is_dir():
        raise KilnError(
            f"{key}={path}: no such directory; give a run directory written by kiln train (runs/train/<run>)"
        )
    missing = [str(name) for name in (SAVED_CONFIG, Path(RUN_RECORD)) if not (directory / name).is_file()]
    if missing:
        raise KilnError(
            f"{key}={path}: not a kiln run directory ({' and '.join(missing)} missing); "
            "give a directory written by kiln train (runs/train/<run>)"
        )
    from kiln.runs import Run

    record = Run.read_record(directory)
    try:
        cfg = OmegaConf.load(directory / SAVED_CONFIG)
    except Exception as exc:
        raise KilnError(
            f"{directory / SAVED_CONFIG}: unreadable ({exc}); the run's saved config is damaged"
        ) from exc
    if not isinstance(cfg, DictConfig) or "data" not in cfg or "model" not in cfg:
        raise KilnError(
            f"{directory / SAVED_CONFIG}: has no data or model config; it is not a kiln train config"
        )
    if not (directory / BEST).is_file():
        raise KilnError(
            f"{key}={path}: no best checkpoint ({BEST} missing; the run's status is "
            f"{record.get('status')!r}); finish training first: kiln train run_dir={path} resume=auto"
        )
    monitor = dict(record.get("monitor") or {"metric": cfg.monitor.metric, "mode": cfg.monitor.mode})
    config_hash = (
        record.get("config_hash") or hashlib.sha256(OmegaConf.to_yaml(cfg).encode()).hexdigest()[:16]
    )
    return RunInfo(directory, cfg, record, monitor, str(config_hash))


def load_trained(run: RunInfo) -> tuple[Any, Any]:
    """(datamodule set up, the run's LightningModule with the best weights, in eval mode): kiln's
    KilnModule or a user's own, built from the run's saved config as `kiln train` built it."""
    from kiln.stages.build import build, build_module
    from kiln.training.checkpoints import check_fits, load_checkpoint

    cfg = run.cfg
    datamodule = build("data", cfg.data)
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)
    checkpoint = load_checkpoint(run.best_checkpoint)
    check_fits(run.best_checkpoint, checkpoint, module)
    module.load_state_dict(checkpoint["state_dict"])
    saved_data = checkpoint.get(type(datamodule).__qualname__)
    if isinstance(saved_data, dict) and hasattr(datamodule, "load_state_dict"):
        datamodule.load_state_dict(saved_data)  # same task and classes, or a clear error
    module.eval()
    return datamodule, module


def raw_split(datamodule: Any, split: str) -> Any:
    """The raw rows (a DataFrame, before preprocessing) of one split of a table datamodule."""
    data = datamodule.load()
    rows = getattr(datamodule.splits, split)
    return data.features.iloc[rows].reset_index(drop=True)


def table_state(datamodule: Any) -> dict[str, Any] | None:
    """The fitted TablePreprocessor's plain values, or None for a datamodule that is not a table."""
    preprocessor = getattr(datamodule, "preprocessor", None)
    return preprocessor.state_dict() if preprocessor is not None else None
