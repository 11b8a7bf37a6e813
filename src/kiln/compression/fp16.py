"""fp16 for GPU deployment: the exported fp32 net with weights and activations in half precision,
its input and output kept as the fp32 net takes and gives them (float32), by onnxruntime's own
converter (`onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)`).

    kiln compress run=<run dir> compress=fp16        the fp16 variant, judged like any other
    compress=auto                                    adds an `fp16` candidate only where onnxruntime
                                                     has the CUDA execution provider

The export checks its answers against torch's fp32 ones (PARITY_ATOL, same predicted class on
every row) and judges its accuracy everywhere. Its latency means something only on a GPU: on a
CPU onnxruntime runs most fp16 operators through casts, so an `auto` recipe never builds an fp16
candidate there (it would be timed on the CPU), and `compress=fp16` says its CPU latency is not
what it is for. Where the CUDA provider exists, the step times it against fp32 on the GPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from kiln.compression.steps import Quantization

CUDA = "CUDAExecutionProvider"
STEP = "fp16"
CANDIDATE = "fp16"
# |fp16 graph - torch fp32| allowed on the exported model's outputs (probabilities or raw
# outputs): fp16 keeps about 3 significant digits, so 1e-2 is a few of its rounding steps.
PARITY_ATOL = 1e-2
CUDA_ROUNDS = 20  # alternating fp32 and fp16 calls on the GPU; the medians are compared
NOT_ON_CPU = (
    "fp16: onnxruntime here has no CUDA execution provider, so its latency is measured on the CPU, "
    "where fp16 runs through casts: judge it by its accuracy and size, and time it on the GPU it is for"
)


@dataclass(frozen=True)
class ConvertFp16(Quantization):
    """Weights and activations in fp16, input and output in fp32 (onnxruntime's converter)."""

    precision: ClassVar[str] = "fp16"

    def quantize(
        self, source: Path, target: Path, calibration: Callable[[int, int], list[np.ndarray]]
    ) -> list[str]:
        convert_file(source, target)
        if not has_gpu_provider():
            return [NOT_ON_CPU]
        return [cuda_latency(source, target, calibration(1, 64)[0])]


def convert_file(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    half = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    in_order(half.graph)
    onnx.save(half, str(target))


def in_order(graph: Any) -> None:
    """Sort the graph's nodes so each comes after the nodes it reads from: the converter appends the
    input's Cast at the end, which onnxruntime accepts but onnx.checker (the export's check) refuses.
    Depth first from each node in the given order, with an explicit stack (a deep net's chain of
    nodes is longer than Python's recursion limit)."""
    import onnx

    nodes = [onnx.NodeProto() for _ in graph.node]
    for copied, node in zip(nodes, graph.node, strict=True):
        copied.CopyFrom(node)
    producer = {output: index for index, node in enumerate(nodes) for output in node.output}
    placed: set[int] = set()
    ordered: list[int] = []
    for start in range(len(nodes)):
        stack = [(start, False)]
        while stack:
            index, inputs_placed = stack.pop()
            if index in placed:
                continue
            if inputs_placed:
                placed.add(index)
                ordered.append(index)
                continue
            stack.append((index, True))
            stack.extend((producer[name], False) for name in nodes[index].input if name in producer)
    del graph.node[:]
    graph.node.extend(nodes[index] for index in ordered)


def has_gpu_provider() -> bool:
    import onnxruntime as ort

    return CUDA in ort.get_available_providers()


def candidates(recipe: Any, abandoned: list[dict[str, Any]]) -> list[Any]:
    """The recipe's candidates to build on this machine. An auto recipe gains `fp16` where
    onnxruntime has the CUDA provider; without it, an auto recipe's fp16 candidate is not built
    (auto ships for latency, and CPU latency says nothing of a GPU's), and `abandoned` says why."""
    from kiln.compression.recipes import Candidate

    if not recipe.auto:
        return list(recipe.candidates)
    wanted = [c for c in recipe.candidates if not any(isinstance(s, ConvertFp16) for _, s in c.steps)]
    asked = [c for c in recipe.candidates if c not in wanted]
    if has_gpu_provider():
        names = {c.name for c in recipe.candidates}
        return [
            *recipe.candidates,
            *([] if asked or CANDIDATE in names else [Candidate(CANDIDATE, [(STEP, ConvertFp16())])]),
        ]
    for candidate in asked:
        abandoned.append(
            {
                "name": candidate.name,
                "steps": candidate.step_names,
                "params": None,
                "abandoned": "not built: onnxruntime here has no CUDA execution provider to time fp16 on "
                "(auto ships for latency); use compress=fp16 to judge its accuracy",
                "budget_drops": [],
                "notes": [],
            }
        )
    return wanted


def cuda_latency(source: Path, target: Path, batch: np.ndarray) -> str:
    """fp32 against fp16 on the GPU: the medians of CUDA_ROUNDS alternating calls on `batch`."""
    import onnxruntime as ort

    sessions = [
        ort.InferenceSession(str(path), providers=[CUDA, "CPUExecutionProvider"]) for path in (source, target)
    ]
    feeds = [{s.get_inputs()[0].name: np.ascontiguousarray(batch, dtype=np.float32)} for s in sessions]
    for session, feed in zip(sessions, feeds, strict=True):
        session.run(None, feed)  # warm-up: kernels chosen, memory allocated
    times: list[list[float]] = [[], []]
    for _ in range(CUDA_ROUNDS):
        for index, (session, feed) in enumerate(zip(sessions, feeds, strict=True)):
            start = time.perf_counter()
            session.run(None, feed)
            times[index].append(time.perf_counter() - start)
    fp32, fp16 = (statistics.median(t) * 1e6 for t in times)
    return (
        f"fp16 on the GPU (onnxruntime {CUDA}), batch {len(batch)}: {fp16:.0f} us against fp32's {fp32:.0f} us "
        f"(x{fp32 / fp16:.2f}), medians of {CUDA_ROUNDS} alternating calls; the report's latency columns are CPU"
    )
