"""`kiln export`: every variant to one verified, measured ONNX file; the chosen one ships as model.onnx.

    kiln export run=runs/train/<run>                 the variants of the last `kiln compress` (or fp32)
    kiln export run=runs/train/<run> export.threads=1

Steps: read the settings -> open the run -> the variants of <run>/compress/manifest.json (none
yet: the uncompressed model alone) -> kiln.export.pipeline: assemble, score with the module's own
validation and test steps, check, measure, choose, write <run>/export/, report.{json,md,png},
TensorBoard and model.onnx. If the chosen variant fails a check or the metric budget, nothing is
written as model.onnx and the stage exits non-zero with the reason.
"""

from __future__ import annotations

import shlex
import sys
from typing import Any

from omegaconf import DictConfig

from kiln.stages import compress as _compress_stage  # noqa: F401  (registers the kiln_stage_dir resolver)
from kiln.stages.runner import stage


@stage("export")
def main(cfg: DictConfig) -> dict[str, Any]:
    from kiln.delivery import deliver
    from kiln.export.pipeline import ExportSettings

    # the command as given, said if a signal stops it (kiln.cli leaves the stage's own argv)
    again = f"kiln export {shlex.join(sys.argv[1:])}"
    return deliver(cfg.run, None, ExportSettings.from_config(cfg), again=again)


if __name__ == "__main__":
    sys.exit(main())
