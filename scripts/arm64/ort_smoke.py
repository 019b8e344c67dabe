#!/usr/bin/env python3
"""ONNX Runtime smoke test for make test-arm64: does ORT compute, not just import, on the target?

    ort_smoke.py make MODEL.onnx   # on the build host (needs the `onnx` package: the dev venv has it)
    ort_smoke.py run MODEL.onnx    # on the target (onnxruntime + numpy): one session, compared with numpy

The model is relu(x @ W + b) with fixed weights; `run` prints one line and exits 1 on a mismatch.
"""

from __future__ import annotations

import sys

import numpy as np

N_IN, N_OUT = 64, 32


def weights() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(13)
    return rng.standard_normal((N_IN, N_OUT)).astype(np.float32), rng.standard_normal(N_OUT).astype(np.float32)


def make(path: str) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w, b = weights()
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y0"]),
         helper.make_node("Relu", ["y0"], ["y"])],
        "smoke",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, N_IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N_OUT])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every ONNX Runtime >= 1.14
    onnx.checker.check_model(model)
    onnx.save(model, path)


def run(path: str) -> int:
    import onnxruntime as ort

    w, b = weights()
    x = np.random.default_rng(7).standard_normal((8, N_IN)).astype(np.float32)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x})
    err = float(np.max(np.abs(y - np.maximum(x @ w + b, 0))))
    ok = err < 1e-4
    print(f"onnxruntime {ort.__version__} ran relu(x@W+b) 8x{N_IN}->{N_OUT}: max abs error {err:.2e} "
          f"{'ok' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("make", "run"):
        raise SystemExit(__doc__)
    if sys.argv[1] == "make":
        make(sys.argv[2])
        sys.exit(0)
    sys.exit(run(sys.argv[2]))
