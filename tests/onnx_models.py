"""Tiny but real ONNX models for tests, built in memory with the `onnx` package.

Real Conv (and Concat) nodes, so ONNX Runtime runs real kernels and the CUDA provider would
claim them. Shapes follow the upstream models where a test needs it: 256x256 crops, a 256x20
audio window given as a 1x1x256x20 plane.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

# IR 8 / opset 17 load in every onnxruntime since 1.13; newer onnx packages default to an IR
# version that older runtimes refuse.
IR_VERSION, OPSET = 8, 17


def conv_model(inputs: dict[str, tuple[int, int, int, int]] | None = None, out_channels: int = 3, seed: int = 0) -> bytes:
    """Serialized model: NCHW float inputs, concatenated on channels, one 3x3 Conv, "output".

    All inputs share N, H and W; the output is (N, out_channels, H, W). Weights are seeded, so
    two builds with the same arguments give the same bytes.
    """
    inputs = inputs or {"input": (1, 3, 64, 64)}
    shapes = list(inputs.values())
    n, _, h, w = shapes[0]
    if any((s[0], s[2], s[3]) != (n, h, w) for s in shapes):
        raise ValueError(f"inputs must share N, H, W: {inputs}")
    channels = sum(s[1] for s in shapes)
    nodes = []
    conv_in = next(iter(inputs))
    if len(inputs) > 1:
        nodes.append(helper.make_node("Concat", list(inputs), ["stacked"], axis=1))
        conv_in = "stacked"
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((out_channels, channels, 3, 3)).astype(np.float32) / (9 * channels)
    nodes.append(helper.make_node("Conv", [conv_in, "weight"], ["output"], pads=[1, 1, 1, 1]))
    graph = helper.make_graph(
        nodes,
        "test-conv",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)) for name, shape in inputs.items()],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [n, out_channels, h, w])],
        [numpy_helper.from_array(weight, "weight")],
    )
    model = helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)])
    return model.SerializeToString()
