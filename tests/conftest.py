"""Shared fixtures: every test builds its own toolkit; models are made here with onnx.helper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ortq


@pytest.fixture
def toolkit() -> ortq.Toolkit:
    """Built-in plugins only: tests never depend on what happens to be installed."""
    return ortq.Toolkit(autoload=False)


def tiny_cnn(seed: int = 0, opset: int = 13) -> onnx.ModelProto:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm: the smallest model with every stage in play."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((5, 8)) * 0.5).astype(np.float32), "w2"),
        numpy_helper.from_array((rng.standard_normal(5) * 0.1).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r1"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset >= 13 else 4
    onnx.checker.check_model(model)
    return model


def tiny_data(n: int = 32, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 3, 8, 8)).astype(np.float32)}


@pytest.fixture
def cnn_files(tmp_path: Path) -> tuple[Path, Path]:
    """A saved tiny CNN and a matching calibration .npz."""
    model_path = tmp_path / "model.onnx"
    onnx.save(tiny_cnn(), model_path)
    data_path = tmp_path / "calib.npz"
    np.savez(data_path, **tiny_data())
    return model_path, data_path


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled example's CNN trained on scikit-learn's digits, once per test session (about 15 s)."""
    import importlib.util
    import sys

    pytest.importorskip("sklearn", reason="the digits example needs the 'examples' extra (scikit-learn)")
    script = Path(__file__).resolve().parents[1] / "examples" / "digits" / "train.py"
    spec = importlib.util.spec_from_file_location("digits_train", script)
    train = importlib.util.module_from_spec(spec)
    sys.modules["digits_train"] = train
    spec.loader.exec_module(train)
    out = tmp_path_factory.mktemp("digits")
    assert train.build(out)["accuracy"] > 0.97
    return out


def run(model: onnx.ModelProto | str | Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feed)
