"""Scale and zero-point arithmetic, checked against ONNX Runtime's own QuantizeLinear."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import run
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from ortq.core.scheme import QuantSpec, QuantType, dequantize_array, params_from_range, quantize_array

ALL_TYPES = list(dict.fromkeys(QuantType))  # aliases (QInt8, ...) collapse onto the canonical members


@pytest.mark.parametrize("qtype", ALL_TYPES)
@pytest.mark.parametrize("symmetric", [False, True])
@given(lo=st.floats(-1e4, 0, allow_nan=False), hi=st.floats(0, 1e4, allow_nan=False))
@settings(max_examples=25, deadline=None)
def test_zero_is_exact_and_range_is_covered(qtype: QuantType, symmetric: bool, lo: float, hi: float) -> None:
    p = params_from_range(lo, hi, QuantSpec(qtype, symmetric))
    assert float(p.scale) > 0 and np.isfinite(p.scale)
    zero = quantize_array(np.zeros(1, np.float32), p)
    assert dequantize_array(zero, p)[0] == 0.0
    values = np.array([lo, hi], np.float32)
    err = np.abs(dequantize_array(quantize_array(values, p), p) - values)
    assert np.all(err <= float(p.scale) * 0.5001 + 1e-6 * max(abs(lo), abs(hi)))


def test_symmetric_int8_uses_the_restricted_range() -> None:
    p = params_from_range(-3.0, 1.0, QuantSpec(QuantType.INT8, symmetric=True))
    assert int(p.zero_point) == 0 and float(p.scale) == pytest.approx(3.0 / 127)
    assert quantize_array(np.array([-3.0, 3.0], np.float32), p).tolist() == [-127, 127]


def test_relu_range_puts_zero_point_at_type_minimum() -> None:
    for qtype in (QuantType.UINT8, QuantType.INT8):
        p = params_from_range(0.0, 6.0, QuantSpec(qtype))
        assert int(p.zero_point) == np.iinfo(qtype.numpy_dtype).min


def test_constant_zero_and_tiny_ranges_get_valid_scales() -> None:
    zero = params_from_range(0.0, 0.0, QuantSpec(QuantType.UINT8))
    assert float(zero.scale) == 1.0
    tiny = params_from_range(0.0, 1e-44, QuantSpec(QuantType.UINT8))
    assert float(tiny.scale) >= np.finfo(np.float32).tiny


def test_per_channel_ranges() -> None:
    p = params_from_range(np.array([-1.0, -2.0, 0.0]), np.array([1.0, 4.0, 0.0]), QuantSpec(QuantType.INT8, True, axis=0))
    assert p.scale.shape == (3,) and p.per_channel
    assert p.scale[2] == 1.0 and np.all(p.zero_point == 0)


def test_reduce_range_uses_seven_bits() -> None:
    assert QuantType.INT8.qrange(symmetric=True, reduce_range=True) == (-63, 63)
    assert QuantType.UINT8.qrange(reduce_range=True) == (0, 127)


def test_onnxruntime_enum_names_are_accepted() -> None:
    from onnxruntime.quantization import QuantType as OrtQuantType

    assert QuantType.parse(OrtQuantType.QUInt8) is QuantType.UINT8
    assert QuantType.parse("QInt16") is QuantType.INT16
    assert QuantType.QInt8 is QuantType.INT8
    with pytest.raises(ValueError, match="unsupported quantization element type INT4"):
        QuantType.parse(OrtQuantType.QInt4)


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_quantize_array_matches_onnxruntime(qtype: QuantType) -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(200) * 3, np.arange(-5, 5, 0.5), [1e6, -1e6]]).astype(np.float32)
    p = params_from_range(-4.0, 5.0, QuantSpec(qtype))
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])
    graph = helper.make_graph(
        [node], "q", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [values.size])],
        [helper.make_tensor_value_info("y", qtype.onnx_dtype, [values.size])],
        [numpy_helper.from_array(p.scale, "s"), numpy_helper.from_array(p.zero_point, "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    expected = run(model, {"x": values})[0]
    np.testing.assert_array_equal(quantize_array(values, p), expected)


@pytest.mark.parametrize("qtype", [QuantType.INT8, QuantType.INT16])
def test_power_of_two_scales_cover_the_range(qtype: QuantType) -> None:
    from ortq.core.scheme import is_power_of_two

    spec = QuantSpec(qtype, symmetric=True, power_of_two=True)
    for absmax in (1e-3, 0.7, 1.0, 5.5, 300.0):
        p = params_from_range(-absmax / 3, absmax, spec)
        assert is_power_of_two(p.scale) and int(p.zero_point) == 0
        qmax = np.iinfo(qtype.numpy_dtype).max
        assert float(p.scale) * qmax >= absmax > float(p.scale) * qmax / 2  # the smallest covering power
    with pytest.raises(ValueError, match="symmetric"):
        params_from_range(0, 1, QuantSpec(QuantType.INT8, symmetric=False, power_of_two=True))
