"""ONNX Runtime drop-in behaviours (issue 13): each one a small model of ortq's own, checked numerically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run, tiny_cnn, tiny_data
from onnx import TensorProto, helper, numpy_helper

import ortq
from ortq import compat
from ortq.core.error_measures import sqnr_db


class Reader(compat.CalibrationDataReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = list(feeds)

    def get_next(self):
        return self.feeds.pop(0) if self.feeds else None


def _cnn_reader(n: int = 16, seed: int = 1) -> Reader:
    x = tiny_data(n, seed)["x"]
    return Reader([{"x": x[i : i + 4]} for i in range(0, n, 4)])


def _matmul_model(dims: list) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["y"], name="mm")], "mm",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dims[0], 4])], [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def _sqnr(model, quantized, feeds: dict[str, np.ndarray]) -> float:
    return sqnr_db(run(model, feeds)[0], run(quantized, feeds)[0])


def test_minus_one_dim_is_dynamic(tmp_path: Path) -> None:
    model = _matmul_model([-1, 10])
    onnx.checker.check_model(model, full_check=True)  # -1 passes the checker, so it must be accepted
    x = np.random.default_rng(1).standard_normal((5, 10)).astype(np.float32)
    compat.quantize_static(model, tmp_path / "q.onnx", Reader([{"input": x}]))
    q = onnx.load(tmp_path / "q.onnx")
    onnx.checker.check_model(q, full_check=True)
    assert _sqnr(model, q, {"input": x}) > 30


def test_errors_are_the_builtin_exceptions_onnxruntime_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        compat.quantize_static(tiny_cnn(), tmp_path / "q.onnx", None)
    with pytest.raises(FileNotFoundError, match="no-such.onnx"):
        compat.quantize_static(tmp_path / "no-such.onnx", tmp_path / "q.onnx", _cnn_reader())
    with pytest.raises(ValueError, match="extra_options"):
        compat.quantize_static(tiny_cnn(), tmp_path / "q.onnx", _cnn_reader(), extra_options={"BlockSize": "x"})
    assert not (tmp_path / "q.onnx").exists()
    assert issubclass(ortq.CalibrationDataError, ValueError) and issubclass(ortq.ConfigError, ValueError)


def test_scalar_parameters_are_stored_in_typed_fields(tmp_path: Path) -> None:
    compat.quantize_static(tiny_cnn(), tmp_path / "q.onnx", _cnn_reader(), activation_type=compat.QuantType.QUInt8)
    inits = {i.name: i for i in onnx.load(tmp_path / "q.onnx").graph.initializer}
    assert inits["x_zero_point"].int32_data and not inits["x_zero_point"].raw_data
    assert inits["x_scale"].float_data and numpy_helper.to_array(inits["x_scale"]).dtype == np.float32


def test_element_types_and_ort_enum_members_name_the_parameter(tmp_path: Path) -> None:
    result = compat.quantize_static(
        tiny_cnn(), tmp_path / "q.onnx", _cnn_reader(), activation_type=TensorProto.UINT8, weight_type=TensorProto.INT8
    )
    assert result.config.activation.qtype is ortq.QuantType.UINT8 and result.config.weight.qtype is ortq.QuantType.INT8
    with pytest.raises(ValueError, match="weight_type=.*float8"):
        compat.quantize_static(tiny_cnn(), tmp_path / "q2.onnx", _cnn_reader(), weight_type=TensorProto.FLOAT8E4M3FN)


def test_unknown_keys_onnxruntime_ignores_are_warned_not_refused(tmp_path: Path, caplog) -> None:
    result = compat.quantize_static(
        tiny_cnn(), tmp_path / "q.onnx", _cnn_reader(), extra_options={"dual_feed": True, "ForceQuantizeNoInputCheck": True}
    )
    assert "dual_feed" in caplog.text and result.verification.min_sqnr_db > 25


def test_minimum_real_range_and_restricted_asymmetric(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.zeros((1, 2, 2, 2), np.float32), "WGT")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["ACT", "WGT"], ["RES"], name="conv")], "g",
        [helper.make_tensor_value_info("ACT", TensorProto.FLOAT, [1, 2, 8, 8])],
        [helper.make_tensor_value_info("RES", TensorProto.FLOAT, [1, 1, 7, 7])], [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    zeros = [{"ACT": np.zeros((1, 2, 8, 8), np.float32)}]
    kwargs = dict(activation_type=compat.QuantType.QUInt8, weight_type=compat.QuantType.QUInt8)
    result = compat.quantize_static(model, tmp_path / "a.onnx", Reader(zeros), extra_options={"MinimumRealRange": 1e-4}, **kwargs)
    assert float(result.params["ACT"].scale) == np.float32(1e-4 / 255) and int(result.params["ACT"].zero_point) == 0
    assert float(result.params["WGT"].scale) == np.float32(1e-4 / 255)
    default = compat.quantize_static(model, tmp_path / "b.onnx", Reader(zeros), **kwargs)
    assert float(default.params["ACT"].scale) == 1.0
    signed = [{"ACT": np.full((1, 2, 8, 8), v, np.float32)} for v in (-1.0, 2.0)]
    snapped = compat.quantize_static(
        model, tmp_path / "c.onnx", Reader(signed), extra_options={"ActivationRestrictedAsymmetric": True}, **kwargs
    )
    p = snapped.params["ACT"]
    assert int(p.zero_point) == 128 and np.isclose(float(p.scale), 2.0 / 127)
    plain = compat.quantize_static(model, tmp_path / "d.onnx", Reader(signed), **kwargs)
    assert int(plain.params["ACT"].zero_point) == 85


def test_qdq_contrib_ops_domain(tmp_path: Path) -> None:
    result = compat.quantize_static(tiny_cnn(), tmp_path / "q.onnx", _cnn_reader(), extra_options={"UseQDQContribOps": True})
    qdq = [n for n in result.model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(n.domain == "com.microsoft" for n in qdq)
    feeds = tiny_data(8, seed=5)
    assert _sqnr(tiny_cnn(), tmp_path / "q.onnx", feeds) > 25


def test_calibration_cache_round_trip(tmp_path: Path) -> None:
    cache = tmp_path / "cache.json"
    first = compat.quantize_static(tiny_cnn(), tmp_path / "a.onnx", _cnn_reader(), calibration_cache_path=cache)
    assert cache.exists()
    second = compat.quantize_static(tiny_cnn(), tmp_path / "b.onnx", None, calibration_cache_path=cache)
    assert all(first.params[k].same_as(second.params[k]) for k in first.params)
    with pytest.raises(ValueError, match="MinMax"):
        compat.quantize_static(
            tiny_cnn(), tmp_path / "c.onnx", None, calibrate_method=compat.CalibrationMethod.Entropy,
            calibration_cache_path=cache,
        )
    from onnxruntime.quantization.calibrate import load_tensors_data  # ONNX Runtime reads ortq's cache

    assert set(load_tensors_data(cache).data) == set(first.ranges)


def test_external_data_format(tmp_path: Path) -> None:
    compat.quantize_static(tiny_cnn(), tmp_path / "q.onnx", _cnn_reader(), use_external_data_format=True)
    assert (tmp_path / "q.onnx.data").exists() or any(p.suffix == ".data" for p in tmp_path.iterdir())
    assert _sqnr(tiny_cnn(), tmp_path / "q.onnx", tiny_data(8, seed=5)) > 25


def test_config_objects_and_get_qdq_config(tmp_path: Path) -> None:
    model = tiny_cnn()
    config = compat.get_qdq_config(model, _cnn_reader(), per_channel=True, min_real_range=1e-4,
                                   nodes_to_exclude=lambda m, n: n.op_type == "Gemm")
    assert config.extra_options["MinimumRealRange"] == 1e-4 and config.extra_options["ForceQuantizeNoInputCheck"]
    assert config.nodes_to_exclude == ["fc"] and "Gemm" not in config.op_types_to_quantize
    result = compat.quantize(model, tmp_path / "s.onnx", config)
    assert "fc" not in result.plan.quantized_nodes and result.config.per_channel
    assert _sqnr(model, tmp_path / "s.onnx", tiny_data(8, seed=5)) > 25
    compat.quantize(model, tmp_path / "d.onnx", compat.DynamicQuantConfig(op_types_to_quantize=["Gemm"]))
    ops = {n.op_type for n in onnx.load(tmp_path / "d.onnx").graph.node}
    assert "DynamicQuantizeMatMul" in ops or "MatMulInteger" in ops
    with pytest.raises(TypeError):
        compat.quantize(model, tmp_path / "x.onnx", object())


def test_reader_protocol_extras() -> None:
    class Strided(compat.CalibrationDataReader):
        def __init__(self) -> None:
            self.start, self.end = 0, 4

        def get_next(self):
            return None

        def __len__(self) -> int:
            return 4

        def set_range(self, start_index: int, end_index: int) -> None:
            self.start, self.end = start_index, end_index

    reader = Strided()
    reader.set_range(1, 2)
    assert len(reader) == 4 and (reader.start, reader.end) == (1, 2) and list(reader) == []


def test_create_calibrator_and_calibration_table(tmp_path: Path) -> None:
    onnx.save(tiny_cnn(), tmp_path / "m.onnx")
    calibrator = compat.create_calibrator(tmp_path / "m.onnx", ["Conv"])
    calibrator.collect_data(_cnn_reader())
    ranges = calibrator.compute_data()
    x = tiny_data(16, 1)["x"]
    assert np.isclose(ranges["x"][0], x.min()) and np.isclose(ranges["x"][1], x.max())
    compat.write_calibration_table(ranges, tmp_path)
    lines = (tmp_path / "calibration.cache").read_text().splitlines()
    assert lines == sorted(lines) and lines[0].split(" ")[0] in ranges
    from onnxruntime.quantization.CalTableFlatBuffers import TrtTable  # ONNX Runtime's reader of the table

    table = TrtTable.TrtTable.GetRootAsTrtTable((tmp_path / "calibration.flatbuffers").read_bytes(), 0)
    assert table.DictLength() == len(ranges)


def _sigmoid_argmax_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(2).standard_normal((4, 3, 1, 1)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Sigmoid", ["x"], ["s"], name="sig"),
            helper.make_node("Conv", ["s", "w"], ["c"], name="conv"),
            helper.make_node("ArgMax", ["c"], ["y"], name="argmax", axis=1, keepdims=0),
        ],
        "sig", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["N", 8, 8])], [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


@pytest.mark.parametrize("quant_format", [compat.QuantFormat.QDQ, compat.QuantFormat.QOperator])
def test_named_ops_are_quantized_whatever_feeds_them(tmp_path: Path, quant_format) -> None:
    model = _sigmoid_argmax_model()
    data = tiny_data(16, seed=4)
    result = compat.quantize_static(
        model, tmp_path / "q.onnx", Reader([{"x": data["x"]}]), quant_format=quant_format,
        op_types_to_quantize=["Sigmoid", "Conv", "ArgMax"], activation_type=compat.QuantType.QUInt8,
    )
    assert {"sig", "conv", "argmax"} <= set(result.plan.quantized_nodes)
    ops = [n.op_type for n in result.model.graph.node]
    if quant_format is compat.QuantFormat.QOperator:
        assert "QLinearSigmoid" in ops and "QLinearConv" in ops
    onnx.checker.check_model(result.model, full_check=True)
    agree = np.mean(run(model, data)[0] == run(tmp_path / "q.onnx", data)[0])
    assert agree > 0.9
    plain = compat.quantize_static(model, tmp_path / "p.onnx", Reader([{"x": data["x"]}]), op_types_to_quantize=["Conv"])
    assert "sig" not in plain.plan.quantized_nodes and "argmax" not in plain.plan.quantized_nodes


def test_compatibility_page_is_generated_from_the_tables() -> None:
    from ortq.api.compat_table import render

    page = Path(__file__).resolve().parents[1] / "docs" / "compatibility.md"
    assert page.read_text(encoding="utf-8") == render(), "run: python -m ortq.api.compat_table > docs/compatibility.md"
    for key in compat.EXTRA_OPTIONS:
        assert f"| `{key}` |" in render()


def test_conv_clip_is_quantized_after_the_clamp(tmp_path: Path) -> None:
    """Conv + Clip(-1, 1): one rounding at the clamp's range, at least as accurate as ONNX Runtime."""
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    rng = np.random.default_rng(7)
    w = numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.6).astype(np.float32), "w")
    lo, hi = numpy_helper.from_array(np.array(-1.0, np.float32), "lo"), numpy_helper.from_array(np.array(1.0, np.float32), "hi")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="clip")],
        "cc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])], [w, lo, hi],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, tmp_path / "m.onnx")
    calib, evaluation = tiny_data(32, seed=11), tiny_data(32, seed=12)
    result = compat.quantize_static(tmp_path / "m.onnx", tmp_path / "q.onnx", Reader([calib]))
    assert "c" not in result.params  # no Q/DQ at the Conv's wider range
    ort_quantize_static(str(tmp_path / "m.onnx"), str(tmp_path / "ort.onnx"), Reader([calib]))
    ours, theirs = _sqnr(model, tmp_path / "q.onnx", evaluation), _sqnr(model, tmp_path / "ort.onnx", evaluation)
    assert ours >= theirs - 0.1, (ours, theirs)


def test_enums_equal_onnxruntime_members() -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat

    assert compat.QuantFormat.QDQ == QuantFormat.QDQ and QuantFormat.QDQ == compat.QuantFormat.QDQ
    assert compat.CalibrationMethod.MinMax != CalibrationMethod.Entropy
    assert {compat.QuantFormat.QDQ: 1}[compat.QuantFormat.QDQ] == 1
