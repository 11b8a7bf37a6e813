"""The cheap speed pre-check of an auto candidate, before the export scores it.

Under `compress.objective=latency` a candidate measured slower than the fp32 graph at any batch
size never ships (kiln.compression.choose: slower_at). Batch 1 costs little to time, so each
candidate's net is timed against the fp32 net there, in the export's own paired rounds
(kiln.export.measure.paired_rounds), right after it is built; one shown slower (the upper end of
its speed-up's 95% interval below 1) is abandoned with that evidence, and nothing more is spent on
it: scoring it on the validation and test splits and timing it at batch 256 were most of a
ResNet's delivery with onnxruntime's dynamic int8 (ConvInteger), many times slower than fp32.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

BATCH = 1


def slower_than_fp32(fp32_net: Path, candidate_net: Path, example: Any, rounds: int) -> dict[str, Any] | None:
    """The candidate's speed-up at batch 1 ({median, ci95, rounds}) when it is shown slower than
    the fp32 net there, else None (faster, undecided, or an input this check cannot feed)."""
    from kiln.export import measure
    from kiln.export.measure import timing_session

    row = single_input_row(example)
    if row is None:
        return None
    sessions = [timing_session(path, None) for path in (fp32_net, candidate_net)]
    calls = [functools.partial(s.run, None, {s.get_inputs()[0].name: row}) for s in sessions]
    reference_us, candidate_us, _ = measure.paired_rounds(calls[0], calls[1], rounds)
    speedup = measure.speedup_interval(reference_us, candidate_us)
    if speedup.high is None or speedup.high >= 1:
        return None
    return speedup.as_dict()


def single_input_row(example: Any) -> np.ndarray | None:
    """One row of a single-tensor example input, as float32; None for several inputs."""
    import torch

    if not isinstance(example, torch.Tensor):
        return None
    return np.ascontiguousarray(example[:BATCH].detach().float().cpu().numpy())


def describe(speedup: dict[str, Any]) -> str:
    low, high = speedup["ci95"]
    return (
        f"not scored: its net measured slower than the fp32 net at batch {BATCH} (speed-up "
        f"{speedup['median']:.2f}x [{low:.2f}, {high:.2f}], 95% interval, {speedup['rounds']} paired rounds), "
        "so under compress.objective=latency it could never ship"
    )
