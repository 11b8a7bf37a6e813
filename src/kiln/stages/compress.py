"""`kiln compress`: smaller or faster variants of a run's best checkpoint, then (by default) export.

    kiln compress run=runs/train/<run> compress=prune_structured
    kiln compress run=runs/train/<run> compress=auto compress.max_metric_drop=0.5
    kiln compress run=runs/train/<run> compress=prune_structured compress.steps=[prune_structured,quantize_static]

Steps: read the recipe and the export settings (every value checked before anything loads) ->
open the run (its own saved config and best checkpoint, never today's conf/) -> compress
(kiln.compression.pipeline: <run>/compress/) -> export (kiln.export.pipeline: check, score,
measure, choose, ship model.onnx), unless export_after=false.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kiln.stages.runner import stage


def _stage_dir(run: Any) -> str:
    """Where Hydra puts this stage's log: the run directory when it is one, else a temp directory
    (a mistyped run= must not leave an empty directory behind)."""
    import tempfile

    from kiln.runs import RunLayout

    if run and RunLayout(Path(str(run))).saved_config.is_file():
        return str(run)
    return str(Path(tempfile.gettempdir()) / "kiln-stage-logs")


if not OmegaConf.has_resolver("kiln_stage_dir"):
    OmegaConf.register_new_resolver("kiln_stage_dir", _stage_dir)


@stage("compress")
def main(cfg: DictConfig) -> dict[str, Any] | None:
    from kiln.builder import plain
    from kiln.compression.recipes import read_recipe
    from kiln.delivery import deliver
    from kiln.export.pipeline import read_settings
    from kiln.runs import RunLayout

    recipe = read_recipe(plain(cfg.compress))
    settings = read_settings(plain(cfg.export))
    # the command as given, said if a signal stops it (kiln.cli leaves the stage's own argv)
    again = f"kiln compress {shlex.join(sys.argv[1:])}"
    result = deliver(cfg.run, recipe, settings, export_after=bool(cfg.export_after), again=again)
    if not cfg.export_after:
        print(
            f"kiln compress: variants in {RunLayout(Path(str(cfg.run))).compress}; next: kiln export run={cfg.run}"
        )
    return result


if __name__ == "__main__":
    sys.exit(main())
