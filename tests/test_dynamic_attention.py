"""Dynamic quantization of ONNX Runtime's fused ``com.microsoft.Attention`` (from its transformer optimizer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ortq
from ortq.core.error_measures import cosine_similarity, sqnr_db

from models import run_float

HIDDEN, HEADS, SEQ = 64, 4, 12


def _fused_encoder(seed: int = 0, **attention_attrs: object) -> onnx.ModelProto:
    """Attention (QKV projection + softmax(QK^T)V, with a key-length mask) followed by a Linear layer."""
    rng = np.random.default_rng(seed)
    qkv = (rng.standard_normal((HIDDEN, 3 * HIDDEN)) / np.sqrt(HIDDEN)).astype(np.float32)
    bias = (rng.standard_normal(3 * HIDDEN) * 0.1).astype(np.float32)
    out_w = (rng.standard_normal((HIDDEN, HIDDEN)) / np.sqrt(HIDDEN)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Attention", ["x", "qkv", "qkv_bias", "lengths"], ["context"], name="attention",
                             domain="com.microsoft", num_heads=HEADS, **attention_attrs),
            helper.make_node("MatMul", ["context", "out_w"], ["y"], name="output_projection"),
        ],
        "fused_encoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", SEQ, HIDDEN]),
         helper.make_tensor_value_info("lengths", TensorProto.INT32, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", SEQ, HIDDEN])],
        [numpy_helper.from_array(qkv, "qkv"), numpy_helper.from_array(bias, "qkv_bias"),
         numpy_helper.from_array(out_w, "out_w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=8)


def _feeds(n: int = 4, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, SEQ, HIDDEN)).astype(np.float32),
            "lengths": rng.integers(3, SEQ + 1, size=n).astype(np.int32)}


@pytest.mark.parametrize("per_channel", [False, True])
def test_attention_becomes_qattention(tmp_path: Path, toolkit: ortq.Toolkit, per_channel: bool) -> None:
    model, feeds = _fused_encoder(), _feeds()
    # ONNX's shape inference does not know com.microsoft ops; the symbolic inference in `ortq preprocess` does,
    # and the Linear layer after the attention needs a known float input to be quantized.
    pytest.importorskip("sympy", reason="symbolic shape inference needs the preprocess extra")
    model = ortq.preprocess(model).model
    out = tmp_path / "dyn.onnx"
    result = toolkit.quantize_dynamic(model, out, per_channel=per_channel, verify_data=feeds)
    assert set(result.plan.quantized_nodes) == {"attention", "output_projection"}
    quantized = onnx.load(out)
    onnx.checker.check_model(quantized, full_check=True)
    ops = [n.op_type for n in quantized.graph.node]
    assert "QAttention" in ops and "Attention" not in ops
    weights = {i.name: i for i in quantized.graph.initializer}
    qkv = next(n for n in quantized.graph.node if n.op_type == "QAttention").input[1]
    assert weights[qkv].data_type == TensorProto.INT8 and list(weights[qkv].dims) == [HIDDEN, 3 * HIDDEN]
    expected, actual = run_float(model, feeds)[0], run_float(quantized, feeds)[0]
    assert cosine_similarity(expected, actual) > 0.999
    assert sqnr_db(expected, actual) > 25
    assert out.stat().st_size < model.ByteSize() / 3


def test_attention_without_bias_gets_a_zero_bias(toolkit: ortq.Toolkit) -> None:
    model, feeds = _fused_encoder(), _feeds()
    attention = model.graph.node[0]
    attention.input[2] = ""  # Attention's bias is optional, QAttention's is not
    result = toolkit.quantize_dynamic(model, verify_data=feeds)
    assert "attention" in result.plan.quantized_nodes
    assert sqnr_db(run_float(model, feeds)[0], run_float(result.model, feeds)[0]) > 25


def test_unsupported_attention_stays_float_with_a_reason(toolkit: ortq.Toolkit) -> None:
    model = _fused_encoder(qkv_hidden_sizes=[HIDDEN, HIDDEN, HIDDEN])
    result = toolkit.quantize_dynamic(model, verify_data=_feeds())
    assert "attention" not in result.plan.quantized_nodes
    reason = next(f.reason for f in result.plan.float_nodes if f.name == "attention")
    assert "qkv_hidden_sizes" in reason
    assert any(n.op_type == "Attention" for n in result.model.graph.node)


def test_attention_respects_exclusions(toolkit: ortq.Toolkit) -> None:
    model = _fused_encoder()
    for result in (toolkit.quantize_dynamic(model, nodes_to_exclude=["attention"]),
                   toolkit.quantize_dynamic(model, op_types_to_quantize=["MatMul"])):
        assert "attention" not in result.plan.quantized_nodes
        assert any(n.op_type == "Attention" for n in result.model.graph.node)
