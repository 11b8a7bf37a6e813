"""The deployable graph around an exported net: raw-row preprocessing in front, a head behind.

    table:  raw columns --[impute, scale, one-hot, select]--> features --net--> logits --head-->
    image:  uint8 (batch, height, width, channels) --[resize, scale, normalize]--> x --net--> ...
    array:                                              input --net--> logits --head-->

The head of a classifier gives `label` (the class name), `probabilities` and `logits`; a
regressor gives `prediction`. The preprocessing is built with onnx.helper from the plain values a
fitted `TablePreprocessor` keeps (fill values, offsets, scales, categories, kept columns), so the
graph applies exactly what training applied and deployment needs no Python preprocessing code:

    numbers  (rows, 1) float64 each -> Concat -> Where(IsNaN, fill) -> Sub offset -> Div scale -> float
    category (rows, 1) string each  -> Where(== "", fill) -> Equal(categories) -> float one-hot
                                       (a category never seen in training encodes as all zeros)

Everything is named with a `kiln_` prefix, so nothing clashes with the net's own names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LABEL, PROBABILITIES, LOGITS, PREDICTION = "label", "probabilities", "logits", "prediction"
OUTPUT = "output"  # the net's own output: what a model without a known task answers with
BATCH = "batch"


def assemble(
    net: onnx.ModelProto,
    *,
    task: str | None,
    class_names: Sequence[str],
    table: Mapping[str, Any] | None = None,
    image: Mapping[str, Any] | None = None,
) -> onnx.ModelProto:
    """A copy of `net` (one output; one input, or several named ones and no preprocessing) with the
    preprocessing (tables, images) and the head added. `image` is a datamodule's `image_input`
    (kiln.contract.image_input)."""
    model = onnx.ModelProto()
    model.CopyFrom(net)
    graph = model.graph
    net_inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    net_input = net_inputs[0]
    (net_output,) = list(graph.output)
    if len(net_inputs) > 1:
        for each in net_inputs:  # several named inputs: each keeps its own (dynamic) axes
            each.type.tensor_type.shape.dim[0].dim_param = BATCH
    elif table is not None:
        _add_table_preprocessing(graph, net_input.name, table)
        graph.input.remove(net_input)
    elif image is not None:
        _add_image_preprocessing(graph, net_input.name, image)
        graph.input.remove(net_input)
    else:
        net_input.type.tensor_type.shape.dim[0].dim_param = BATCH
    if task not in ("classification", "regression"):
        return model  # no head: the net's output as it is
    graph.output.remove(net_output)
    if task == "classification":
        _add_classifier_head(graph, net_output.name, class_names)
    else:
        graph.node.append(
            helper.make_node("Identity", [net_output.name], [PREDICTION], name="kiln_prediction")
        )
        graph.output.append(helper.make_tensor_value_info(PREDICTION, TensorProto.FLOAT, [BATCH]))
    return model


def set_metadata(model: onnx.ModelProto, props: Mapping[str, Any]) -> None:
    """metadata_props: strings as they are, everything else as JSON; existing keys are replaced."""
    merged = metadata(model)
    merged.update(
        {key: value if isinstance(value, str) else json.dumps(value) for key, value in props.items()}
    )
    del model.metadata_props[:]
    for key, value in merged.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in model.metadata_props}


# -- tables ------------------------------------------------------------------------------------


def _add_table_preprocessing(graph: onnx.GraphProto, features: str, state: Mapping[str, Any]) -> None:
    numeric: list[str] = list(state["numeric_columns"])
    categorical: list[str] = list(state["categorical_columns"])
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    blocks: list[str] = []
    for column in numeric:
        graph.input.append(helper.make_tensor_value_info(column, TensorProto.DOUBLE, [BATCH, 1]))
    for column in categorical:
        graph.input.append(helper.make_tensor_value_info(column, TensorProto.STRING, [BATCH, 1]))
    if numeric:
        nodes += _numeric_block(numeric, state, inits)
        blocks.append("kiln_numbers_float")
    if categorical:
        empty = _const(inits, "kiln_empty_string", np.array([""], dtype=object))
        for index, column in enumerate(categorical):
            nodes += _category_block(index, column, empty, state, inits)
            blocks.append(f"kiln_cat{index}_float")
    kept = [bool(k) for k in state.get("kept") or []]
    encoded = "kiln_encoded" if kept and not all(kept) else features
    nodes.append(helper.make_node("Concat", blocks, [encoded], axis=1, name="kiln_encode"))
    if encoded != features:
        columns = _const(inits, "kiln_kept_columns", np.flatnonzero(kept).astype(np.int64))
        nodes.append(helper.make_node("Gather", [encoded, columns], [features], axis=1, name="kiln_select"))
    for position, node in enumerate(nodes):
        graph.node.insert(position, node)
    graph.initializer.extend(inits)


def _const(inits: list[onnx.TensorProto], name: str, array: np.ndarray) -> str:
    """An initializer named `name`, added to `inits`; its name."""
    inits.append(numpy_helper.from_array(array, name))
    return name


def _numeric_block(
    numeric: list[str], state: Mapping[str, Any], inits: list[onnx.TensorProto]
) -> list[onnx.NodeProto]:
    """The numeric columns side by side, missing values filled, scaled: `kiln_numbers_float`."""
    row = (1, len(numeric))
    fill = _const(
        inits, "kiln_numeric_fill", np.asarray(state["numeric_fill"], dtype=np.float64).reshape(row)
    )
    offset = _const(inits, "kiln_numeric_offset", np.asarray(state["offset"], dtype=np.float64).reshape(row))
    scale = _const(inits, "kiln_numeric_scale", np.asarray(state["scale"], dtype=np.float64).reshape(row))
    return [
        helper.make_node("Concat", numeric, ["kiln_numbers"], axis=1, name="kiln_numbers"),
        helper.make_node("IsNaN", ["kiln_numbers"], ["kiln_numbers_missing"], name="kiln_numbers_missing"),
        helper.make_node(
            "Where",
            ["kiln_numbers_missing", fill, "kiln_numbers"],
            ["kiln_numbers_filled"],
            name="kiln_impute",
        ),
        helper.make_node(
            "Sub", ["kiln_numbers_filled", offset], ["kiln_numbers_centered"], name="kiln_center"
        ),
        helper.make_node("Div", ["kiln_numbers_centered", scale], ["kiln_numbers_scaled"], name="kiln_scale"),
        helper.make_node(
            "Cast",
            ["kiln_numbers_scaled"],
            ["kiln_numbers_float"],
            to=TensorProto.FLOAT,
            name="kiln_to_float",
        ),
    ]


def _category_block(
    index: int, column: str, empty: str, state: Mapping[str, Any], inits: list[onnx.TensorProto]
) -> list[onnx.NodeProto]:
    """One categorical column, missing ("") filled, one-hot over its known categories:
    `kiln_cat<index>_float`."""
    prefix = f"kiln_cat{index}"
    fill = _const(inits, f"{prefix}_fill", np.array([str(state["categorical_fill"][index])], dtype=object))
    categories = [str(c) for c in state["categories"][index]]
    known = _const(inits, f"{prefix}_categories", np.array(categories, dtype=object).reshape(1, -1))
    return [
        helper.make_node("Equal", [column, empty], [f"{prefix}_missing"], name=f"{prefix}_missing"),
        helper.make_node(
            "Where", [f"{prefix}_missing", fill, column], [f"{prefix}_filled"], name=f"{prefix}_impute"
        ),
        helper.make_node("Equal", [f"{prefix}_filled", known], [f"{prefix}_hot"], name=f"{prefix}_one_hot"),
        helper.make_node(
            "Cast", [f"{prefix}_hot"], [f"{prefix}_float"], to=TensorProto.FLOAT, name=f"{prefix}_to_float"
        ),
    ]


# -- images ------------------------------------------------------------------------------------

IMAGE = "image"


def _add_image_preprocessing(graph: onnx.GraphProto, x: str, image: Mapping[str, Any]) -> None:
    """uint8 (batch, height, width, channels) of any height and width -> the net's input `x`:

        Cast float -> Transpose to NCHW -> Resize to `size` (bilinear or `interpolation` bicubic,
        as OpenCV resizes the training images: _resize_as_opencv) -> x * 1/(255 std) - mean/std

    One multiply and one subtract instead of /255, -mean, /std: the same values within float
    rounding (parity is checked on real images at export)."""
    height, width = (int(s) for s in image["size"])
    channels = int(image["channels"])
    mean = np.asarray(image["mean"], dtype=np.float32).reshape(1, channels, 1, 1)
    std = np.asarray(image["std"], dtype=np.float32).reshape(1, channels, 1, 1)
    graph.input.append(
        helper.make_tensor_value_info(IMAGE, TensorProto.UINT8, [BATCH, "height", "width", channels])
    )
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([height, width], dtype=np.int64), "kiln_image_size"),
            numpy_helper.from_array((1.0 / (255.0 * std)).astype(np.float32), "kiln_image_scale"),
            numpy_helper.from_array((mean / std).astype(np.float32), "kiln_image_shift"),
        ]
    )
    # a torchvision resize (below) replaces this one, with its own interpolation
    opencv_interpolation = "bilinear" if "resize" in image else image.get("interpolation", "bilinear")
    nodes = [
        helper.make_node(
            "Cast", [IMAGE], ["kiln_image_float"], to=TensorProto.FLOAT, name="kiln_image_float"
        ),
        helper.make_node(
            "Transpose", ["kiln_image_float"], ["kiln_image_nchw"], perm=[0, 3, 1, 2], name="kiln_nchw"
        ),
        # full (batch, channels, height, width) sizes: Resize's `axes` needs opset 18, and an int8
        # graph may import an older one
        helper.make_node("Shape", ["kiln_image_nchw"], ["kiln_image_shape"], end=2, name="kiln_image_shape"),
        helper.make_node(
            "Concat", ["kiln_image_shape", "kiln_image_size"], ["kiln_image_sizes"], axis=0, name="kiln_sizes"
        ),
        *_resize_as_opencv(graph, opencv_interpolation),
        helper.make_node(
            "Mul", ["kiln_image_resized", "kiln_image_scale"], ["kiln_image_scaled"], name="kiln_scale"
        ),
        helper.make_node("Sub", ["kiln_image_scaled", "kiln_image_shift"], [x], name="kiln_normalize"),
    ]
    if "resize" in image:  # a user's torchvision eval transform (kiln.data.transforms)
        unused = [t for t in graph.initializer if t.name == "kiln_image_size"]
        graph.initializer.remove(unused[0])
        # the graph goes on from the Mul after the resize
        start = next(i for i, node in enumerate(nodes) if node.name == "kiln_scale")
        nodes[start].input[0] = "kiln_image_cropped"
        nodes = [*_torchvision_resize_and_crop(graph, image), *nodes[start:]]
    for position, node in enumerate(nodes):
        graph.node.insert(position, node)


def _resize_as_opencv(graph: onnx.GraphProto, interpolation: str) -> list[onnx.NodeProto]:
    """`kiln_image_nchw` -> `kiln_image_resized` as OpenCV resized the training images (INTER_LINEAR
    or INTER_CUBIC: half-pixel centres; cubic with ONNX's default a = -0.75, as OpenCV's). Cubic
    overshoots past 0..255 at edges, which OpenCV saturates to uint8: rounded and clipped here too,
    it matches to a grey level."""
    cubic = interpolation == "bicubic"
    resize = helper.make_node(
        "Resize",
        ["kiln_image_nchw", "", "", "kiln_image_sizes"],
        ["kiln_image_cubic" if cubic else "kiln_image_resized"],
        mode="cubic" if cubic else "linear",
        coordinate_transformation_mode="half_pixel",
        name="kiln_resize",
    )
    if not cubic:
        return [resize]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "kiln_image_black"),
            numpy_helper.from_array(np.array(255.0, dtype=np.float32), "kiln_image_white"),
        ]
    )
    return [
        resize,
        helper.make_node("Round", ["kiln_image_cubic"], ["kiln_image_rounded"], name="kiln_round_pixels"),
        helper.make_node(
            "Clip",
            ["kiln_image_rounded", "kiln_image_black", "kiln_image_white"],
            ["kiln_image_resized"],
            name="kiln_clip_pixels",
        ),
    ]


def _torchvision_resize_and_crop(graph: onnx.GraphProto, image: Mapping[str, Any]) -> list[onnx.NodeProto]:
    """uint8 NHWC -> float NCHW resized and centre-cropped as torchvision's Resize and CenterCrop
    do it (bilinear, antialiased as torchvision's default; a shorter side resized to `shorter` and
    the longer to int(shorter * long / short)), ending in `kiln_image_cropped`."""
    resize = image["resize"]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([2], dtype=np.int64), "kiln_tv_two"),
            numpy_helper.from_array(np.array([4], dtype=np.int64), "kiln_tv_four"),
            numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "kiln_tv_axes"),
            numpy_helper.from_array(
                np.array(float(resize.get("shorter", 0)), dtype=np.float32), "kiln_tv_shorter"
            ),
        ]
    )
    nodes = [
        helper.make_node(
            "Cast", [IMAGE], ["kiln_image_float"], to=TensorProto.FLOAT, name="kiln_image_float"
        ),
        helper.make_node(
            "Transpose", ["kiln_image_float"], ["kiln_image_nchw"], perm=[0, 3, 1, 2], name="kiln_nchw"
        ),
        helper.make_node("Shape", ["kiln_image_nchw"], ["kiln_tv_shape"], name="kiln_tv_shape"),
        helper.make_node(
            "Slice", ["kiln_tv_shape", "kiln_tv_two", "kiln_tv_four"], ["kiln_tv_hw"], name="kiln_tv_hw"
        ),
        helper.make_node(
            "Slice", ["kiln_tv_shape", _zero_index(graph), "kiln_tv_two"], ["kiln_tv_nc"], name="kiln_tv_nc"
        ),
    ]
    nodes += _torchvision_new_size(graph, resize)
    nodes += _torchvision_resize(graph, image)
    nodes += _torchvision_centre_crop(graph, image.get("crop"))
    return nodes


def _torchvision_new_size(graph: onnx.GraphProto, resize: Mapping[str, Any]) -> list[onnx.NodeProto]:
    """`kiln_tv_new_hw`: the height and width torchvision's Resize gives (a fixed size, or the
    shorter side set and the longer scaled with it)."""
    nodes: list[onnx.NodeProto] = []
    if "shorter" in resize:  # (shorter * side) / short, floored: Python's int(size * long / short)
        nodes = [
            helper.make_node(
                "Cast", ["kiln_tv_hw"], ["kiln_tv_hw_float"], to=TensorProto.FLOAT, name="kiln_tv_hwf"
            ),
            helper.make_node(
                "ReduceMin", ["kiln_tv_hw_float"], ["kiln_tv_short"], keepdims=1, name="kiln_tv_short"
            ),
            helper.make_node(
                "Mul", ["kiln_tv_hw_float", "kiln_tv_shorter"], ["kiln_tv_scaled"], name="kiln_tv_scaled"
            ),
            helper.make_node(
                "Div", ["kiln_tv_scaled", "kiln_tv_short"], ["kiln_tv_ratio"], name="kiln_tv_ratio"
            ),
            helper.make_node("Floor", ["kiln_tv_ratio"], ["kiln_tv_floor"], name="kiln_tv_floor"),
            helper.make_node(
                "Cast", ["kiln_tv_floor"], ["kiln_tv_new_hw"], to=TensorProto.INT64, name="kiln_tv_new_hw"
            ),
        ]
    else:
        graph.initializer.append(
            numpy_helper.from_array(np.array(resize["size"], dtype=np.int64), "kiln_tv_new_hw")
        )
    return nodes


def _torchvision_resize(graph: onnx.GraphProto, image: Mapping[str, Any]) -> list[onnx.NodeProto]:
    """`kiln_image_nchw` resized to `kiln_tv_sizes` and rounded to whole grey levels: `kiln_tv_resized`.
    Bicubic is Pillow's (torchvision's Resize of a PIL image): a = -0.5, antialiased, and clipped to
    0..255 as Pillow saturates its overshoot."""
    cubic = image.get("interpolation") == "bicubic"
    rounded = "kiln_tv_rounded_pixels" if cubic else "kiln_tv_resized"
    pillow_cubic: dict[str, Any] = {"cubic_coeff_a": -0.5} if cubic else {}
    nodes = [
        helper.make_node(
            "Concat", ["kiln_tv_nc", "kiln_tv_new_hw"], ["kiln_tv_sizes"], axis=0, name="kiln_tv_sizes"
        ),
        helper.make_node(
            "Resize",
            ["kiln_image_nchw", "", "", "kiln_tv_sizes"],
            ["kiln_tv_resized_float"],
            mode="cubic" if cubic else "linear",
            coordinate_transformation_mode="half_pixel",
            antialias=int(bool(image.get("antialias", True))),
            name="kiln_tv_resize",
            **pillow_cubic,
        ),
        # torchvision and Pillow resize uint8 pixels to uint8: rounded
        helper.make_node("Round", ["kiln_tv_resized_float"], [rounded], name="kiln_tv_round_pixels"),
    ]
    if cubic:
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(0.0, dtype=np.float32), "kiln_tv_black"),
                numpy_helper.from_array(np.array(255.0, dtype=np.float32), "kiln_tv_white"),
            ]
        )
        clip = ["kiln_tv_rounded_pixels", "kiln_tv_black", "kiln_tv_white"]
        nodes.append(helper.make_node("Clip", clip, ["kiln_tv_resized"], name="kiln_tv_clip_pixels"))
    return nodes


def _torchvision_centre_crop(graph: onnx.GraphProto, crop: Any) -> list[onnx.NodeProto]:
    """`kiln_tv_resized` cropped at its centre to `crop` (none: as it is): `kiln_image_cropped`."""
    if crop is None:
        return [
            helper.make_node("Identity", ["kiln_tv_resized"], ["kiln_image_cropped"], name="kiln_tv_nocrop")
        ]
    # torchvision's centre: top = int(round((height - crop_height) / 2)), rounding half to even
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(crop, dtype=np.int64), "kiln_tv_crop"),
            numpy_helper.from_array(np.array([2.0, 2.0], dtype=np.float32), "kiln_tv_half"),
        ]
    )
    nodes = [
        helper.make_node(
            "Sub", ["kiln_tv_new_hw", "kiln_tv_crop"], ["kiln_tv_margin"], name="kiln_tv_margin"
        ),
        helper.make_node(
            "Cast", ["kiln_tv_margin"], ["kiln_tv_margin_float"], to=TensorProto.FLOAT, name="kiln_tv_mf"
        ),
        helper.make_node(
            "Div", ["kiln_tv_margin_float", "kiln_tv_half"], ["kiln_tv_halves"], name="kiln_tv_halves"
        ),
        helper.make_node("Round", ["kiln_tv_halves"], ["kiln_tv_rounded"], name="kiln_tv_round"),
        helper.make_node(
            "Cast", ["kiln_tv_rounded"], ["kiln_tv_start"], to=TensorProto.INT64, name="kiln_tv_start"
        ),
        helper.make_node("Add", ["kiln_tv_start", "kiln_tv_crop"], ["kiln_tv_end"], name="kiln_tv_end"),
        helper.make_node(
            "Slice",
            ["kiln_tv_resized", "kiln_tv_start", "kiln_tv_end", "kiln_tv_axes"],
            ["kiln_image_cropped"],
            name="kiln_tv_crop",
        ),
    ]
    return nodes


def _zero_index(graph: onnx.GraphProto) -> str:
    """An int64 [0] initializer (the start of a Slice), by name."""
    graph.initializer.append(numpy_helper.from_array(np.array([0], dtype=np.int64), "kiln_tv_zero"))
    return "kiln_tv_zero"


# -- heads -------------------------------------------------------------------------------------


def _add_classifier_head(graph: onnx.GraphProto, output: str, class_names: Sequence[str]) -> None:
    names = numpy_helper.from_array(np.array([str(c) for c in class_names], dtype=object), "kiln_class_names")
    graph.initializer.append(names)
    graph.node.extend(
        [
            helper.make_node("Identity", [output], [LOGITS], name="kiln_logits"),
            helper.make_node("Softmax", [output], [PROBABILITIES], axis=-1, name="kiln_softmax"),
            helper.make_node(
                "ArgMax", [output], ["kiln_class_index"], axis=1, keepdims=0, name="kiln_argmax"
            ),
            helper.make_node(
                "Gather", ["kiln_class_names", "kiln_class_index"], [LABEL], axis=0, name="kiln_label"
            ),
        ]
    )
    count = len(class_names)
    graph.output.extend(
        [
            helper.make_tensor_value_info(LABEL, TensorProto.STRING, [BATCH]),
            helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, [BATCH, count]),
            helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, [BATCH, count]),
        ]
    )


# -- the embedding a drift baseline watches ----------------------------------------------------

_HEAD_OPS = {"Gemm", "MatMul", "QGemm", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul"}
_QUANTIZERS = {"QuantizeLinear", "DynamicQuantizeLinear"}


def embedding_tensor(model: onnx.ModelProto) -> str | None:
    """The float tensor that goes into the net's last fully connected layer (the penultimate
    layer's output: what the head classifies), or None for a net that ends otherwise. Nodes are in
    topological order, so the last Gemm/MatMul is the head; in an int8 graph the walk goes back
    through the quantizer in front of it to the float tensor."""
    producers = {output: node for node in model.graph.node for output in node.output}
    heads = [node for node in model.graph.node if node.op_type in _HEAD_OPS]
    if not heads:
        return None
    tensor = heads[-1].input[0]
    while tensor in producers and producers[tensor].op_type in _QUANTIZERS:
        tensor = producers[tensor].input[0]
    return tensor


def with_output(model: onnx.ModelProto, tensor: str) -> bytes:
    """`model` serialized with `tensor` as one more graph output (float, any shape), so a session
    returns the embedding beside the predictions in one pass; the shipped file is not changed."""
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    if tensor not in {o.name for o in extended.graph.output}:
        extended.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    return extended.SerializeToString()
