"""The example third-party plugin in examples/ortq-example-plugin (DepthToSpace / SpaceToDepth).

Discovery is tested without installing anything, by faking an ``ortq`` entry point the way pluggy's own
tests do; one test (skipped unless ``pip install -e examples/ortq-example-plugin`` was run) checks the
real installed package, in-process and through the CLI.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import ortq
from ortq.core.error_measures import sqnr_db

# Decided before any test puts the example's source folder on sys.path (or imports it), since both would
# make find_spec succeed for an uninstalled package.
INSTALLED = importlib.util.find_spec("ortq_pixel_shuffle") is not None

EXAMPLE_SRC = Path(__file__).resolve().parents[1] / "examples" / "ortq-example-plugin" / "src"
PLUGIN_NAME = "pixel_shuffle"
DIST_NAME = "ortq-pixel-shuffle"


@pytest.fixture
def plugin_module(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(EXAMPLE_SRC))
    return importlib.import_module("ortq_pixel_shuffle")


# -- discovery ----------------------------------------------------------------------------------------
def _fake_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``importlib.metadata.distributions()`` return only a fake dist with our entry point."""
    entry_point = importlib.metadata.EntryPoint(name=PLUGIN_NAME, value="ortq_pixel_shuffle", group="ortq")

    class Distribution:
        metadata = {"name": DIST_NAME}
        version = "0.1.0"
        entry_points = (entry_point,)
        files = ()

    monkeypatch.setattr(importlib.metadata, "distributions", lambda: (Distribution(),))


def test_entry_point_autoload_registers_the_plugin(plugin_module: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_distribution(monkeypatch)
    toolkit = ortq.Toolkit(autoload=True)
    for op in ("DepthToSpace", "SpaceToDepth"):
        assert toolkit.op_quantizer_for(op) is plugin_module.PixelShuffleQuantizer
        assert toolkit.plugin_of(toolkit.op_quantizers, op) == PLUGIN_NAME
    info = toolkit.plugin_info[PLUGIN_NAME]
    assert info.error is None
    assert DIST_NAME in info.source and "0.1.0" in info.source
    assert info.hooks == ["ortq_register_op_quantizers"]
    assert info.registered == {"op_quantizers": ["DepthToSpace", "SpaceToDepth"]}


def test_no_autoload_ignores_the_entry_point(plugin_module: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_distribution(monkeypatch)
    toolkit = ortq.Toolkit(autoload=False)
    assert toolkit.op_quantizer_for("DepthToSpace") is None
    assert PLUGIN_NAME not in toolkit.plugin_info


# -- numbers ------------------------------------------------------------------------------------------
def _super_resolution_model(channels: int = 3, features: int = 16, seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> Conv(to 4*C) -> DepthToSpace(2) -> Conv: an ESPCN-like x2 upscaler plus a refine conv."""
    rng = np.random.default_rng(seed)

    def init(name: str, shape: tuple[int, ...], std: float) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0.0, std, shape).astype(np.float32), name)

    initializers = [
        init("w1", (features, channels, 3, 3), 0.3), init("b1", (features,), 0.1),
        init("w2", (4 * channels, features, 3, 3), 0.15), init("b2", (4 * channels,), 0.1),
        init("w3", (channels, channels, 3, 3), 0.3), init("b3", (channels,), 0.1),
    ]
    pads = [1, 1, 1, 1]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["feat"], name="conv1", pads=pads),
        helper.make_node("Relu", ["feat"], ["feat_relu"], name="relu1"),
        helper.make_node("Conv", ["feat_relu", "w2", "b2"], ["shuffle_in"], name="conv2", pads=pads),
        helper.make_node("DepthToSpace", ["shuffle_in"], ["upscaled"], name="pixel_shuffle", blocksize=2, mode="CRD"),
        helper.make_node("Conv", ["upscaled", "w3", "b3"], ["y"], name="conv3", pads=pads),
    ]
    graph = helper.make_graph(
        nodes, "sr",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, 16, 16])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_quantized_super_resolution_model_keeps_accuracy(plugin_module: ModuleType) -> None:
    model = _super_resolution_model()
    rng = np.random.default_rng(1)
    calib = rng.normal(0.0, 1.0, (32, 3, 8, 8)).astype(np.float32)
    toolkit = ortq.Toolkit(plugins=[plugin_module], autoload=False)
    result = toolkit.quantize(model, None, calibration_data={"x": calib})

    assert result.plan.quantized_nodes.get("pixel_shuffle") == "DepthToSpace"
    assert not result.plan.float_nodes
    # SameAs: the shuffle's output copies conv2's parameters and is never calibrated on its own.
    assert result.plan.tensors["upscaled"].source == "shuffle_in"
    assert "upscaled" not in result.plan.observed_tensors()
    out_p, in_p = result.params["upscaled"], result.params["shuffle_in"]
    assert out_p.scale == in_p.scale and out_p.zero_point == in_p.zero_point
    onnx.checker.check_model(result.model, full_check=True)

    x = rng.normal(0.0, 1.0, (8, 3, 8, 8)).astype(np.float32)  # held out from calibration
    sqnr = sqnr_db(_run(model, x), _run(result.model, x))
    assert sqnr >= 25.0, f"quantized SQNR {sqnr:.1f} dB"


def test_without_the_plugin_the_shuffle_stays_float() -> None:
    model = _super_resolution_model()
    calib = np.random.default_rng(1).normal(0.0, 1.0, (16, 3, 8, 8)).astype(np.float32)
    result = ortq.Toolkit(autoload=False).quantize(
        model, None, calibration_data={"x": calib}
    )
    assert "pixel_shuffle" not in result.plan.quantized_nodes
    reasons = {f.name: f.reason for f in result.plan.float_nodes}
    assert "no op quantizer" in reasons["pixel_shuffle"]


@pytest.mark.parametrize("op_type", ["DepthToSpace", "SpaceToDepth"])
def test_shuffle_of_a_float_input_stays_float(plugin_module: ModuleType, op_type: str) -> None:
    """Fed straight by the graph input, nothing upstream is quantized, so SameAs has nothing to copy."""
    in_shape, out_shape = ([1, 3, 8, 8], [1, 12, 4, 4]) if op_type == "SpaceToDepth" else ([1, 12, 2, 2], [1, 3, 4, 4])
    graph = helper.make_graph(
        [helper.make_node(op_type, ["x"], ["y"], name="shuffle", blocksize=2)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    plan, _, _ = ortq.Toolkit(plugins=[plugin_module], autoload=False).plan(model)
    assert not plan.quantized_nodes
    assert "not quantized" in plan.float_nodes[0].reason


# -- the real installed package -------------------------------------------------------------------
@pytest.mark.subprocess
@pytest.mark.skipif(
    not INSTALLED,
    reason="ortq-pixel-shuffle is not installed; run `pip install -e examples/ortq-example-plugin`",
)
def test_installed_package_is_autoloaded() -> None:
    toolkit = ortq.Toolkit()
    assert toolkit.op_quantizer_for("DepthToSpace") is not None
    assert toolkit.plugin_of(toolkit.op_quantizers, "DepthToSpace") == PLUGIN_NAME
    assert toolkit.plugin_info[PLUGIN_NAME].error is None

    pytest.importorskip("ortq.api.cli", reason="the `ortq` CLI is not written yet")
    env = {k: v for k, v in os.environ.items() if k not in ("ORTQ_DISABLE_PLUGIN_AUTOLOAD", "ORTQ_PLUGINS")}
    proc = subprocess.run(
        [sys.executable, "-m", "ortq", "plugins"], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert PLUGIN_NAME in proc.stdout, proc.stdout
    assert "DepthToSpace" in proc.stdout, proc.stdout
