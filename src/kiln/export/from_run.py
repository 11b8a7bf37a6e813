"""A run directory back into what a later stage needs, from that run's own saved config.

    open_run(dir)   kiln.runs: checks that it is a trained run (says what is missing)
    load_trained()  rebuilds the datamodule from the saved config (same seed: same splits, same fitted
                    preprocessing) and the LightningModule from checkpoints/best.ckpt (weights_only=True);
                    the saved config may call only what kiln.targets allows, checked before building

Today's conf/ is never read here: a run is compressed and exported with the data and model it was
trained with.
"""

from __future__ import annotations

from typing import Any

from kiln.runs import RunDirectory, open_run

__all__ = ["load_trained", "open_run", "raw_split", "table_state"]


def load_trained(run: RunDirectory) -> tuple[Any, Any]:
    """(datamodule set up, the run's LightningModule with the best weights, in eval mode): kiln's
    KilnModule or a user's own, built from the run's saved config as `kiln train` built it."""
    from kiln.builder import build, build_module, check_allowed_targets, plain
    from kiln.training.checkpoints import check_fits, load_checkpoint

    cfg = run.saved_config()
    # A run directory is data: its config may name only what a config may call (kiln.targets),
    # all of it checked before the data or the model is built.
    for key in ("data", "model"):
        check_allowed_targets(plain(cfg[key]), key)
    datamodule = build("data", cfg.data, seed=cfg.seed)  # the run's seed, if the datamodule takes one
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)
    best = run.require_best_checkpoint()
    checkpoint = load_checkpoint(best)
    check_fits(best, checkpoint, module)
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
