"""User-given quantization parameters and per-tensor overrides (ONNX Runtime's TensorQuantOverrides format)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import run, tiny_cnn, tiny_data
from onnx import numpy_helper

import ortq
from ortq.api.cli import build_cli
from ortq.core.error_measures import sqnr_db
from ortq.core.scheme import QuantSpec, QuantType, params_from_range

ACTIVATIONS = ("x", "r1", "g", "y")  # what the cpu plan of tiny_cnn observes (f copies g, c1 folds into relu)


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _q_params(model: onnx.ModelProto, tensor: str) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of the QuantizeLinear reading ``tensor`` (or of the DQ of constant ``tensor``)."""
    inits = _inits(model)
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in (tensor, f"{tensor}_float"):
            return inits[node.input[1]], inits[node.input[2]]
        if node.op_type == "DequantizeLinear" and node.input[0] == f"{tensor}_quantized":
            return inits[node.input[1]], inits[node.input[2]]
    raise AssertionError(f"no Q/DQ for {tensor!r}")


def _feeds(n: int = 32, seed: int = 3) -> dict[str, np.ndarray]:
    """Inputs inside [-0.4, 2.6], the range the odd given parameters of ``x`` below cover."""
    rng = np.random.default_rng(seed)
    return {"x": rng.uniform(-0.4, 2.6, size=(n, 3, 8, 8)).astype(np.float32)}


def test_given_parameters_are_used_bit_exactly(toolkit: ortq.Toolkit) -> None:
    model = tiny_cnn()
    w1 = numpy_helper.to_array(model.graph.initializer[0])
    # Deliberately odd: a non-power-of-two scale, an asymmetric zero point, a different scale per channel.
    w_scales = [float(np.abs(w1[c]).max() / 127 * (1.0 + 0.037 * c)) for c in range(8)]
    overrides = {
        "x": {"scale": 0.0123457, "zero_point": 37},
        "w1": [{"axis": 0, "scale": w_scales[0], "zero_point": 0}] + [{"scale": s, "zero_point": 0} for s in w_scales[1:]],
    }
    data = _feeds()
    result = toolkit.quantize(model, None, calibration_data=data, tensor_overrides=overrides)
    scale, zp = _q_params(result.model, "x")
    assert scale.dtype == np.float32 and scale == np.float32(0.0123457)
    assert zp.dtype == np.uint8 and zp == 37
    wscale, wzp = _q_params(result.model, "w1")
    np.testing.assert_array_equal(wscale, np.array(w_scales, dtype=np.float32))
    assert wzp.dtype == np.int8 and not wzp.any()
    # The int32 bias follows the given scales: input scale x weight scale, per channel.
    bscale, _ = _q_params(result.model, "b1")
    expected = (np.float64(np.float32(0.0123457)) * np.array(w_scales, np.float32).astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(bscale, expected)
    assert result.params["x"].source == "given" and result.params["r1"].source == "calibration"
    onnx.checker.check_model(result.model, full_check=True)
    reference = run(model, data)[0]
    assert sqnr_db(reference, run(result.model, data)[0]) > 25.0


def test_every_activation_given_needs_no_calibration_data(toolkit: ortq.Toolkit, tmp_path: Path) -> None:
    """Giving back the parameters a calibrated run chose reproduces that run's model without any data."""
    model, data = tiny_cnn(), tiny_data()
    calibrated = toolkit.quantize(model, None, calibration_data=data)
    overrides = {
        name: [{"scale": float(calibrated.params[name].scale), "zero_point": int(calibrated.params[name].zero_point),
                "quant_type": calibrated.params[name].qtype.value}]
        for name in ACTIVATIONS
    }
    path = tmp_path / "overrides.json"
    path.write_text(json.dumps(overrides))
    given = toolkit.quantize(model, None, tensor_overrides=path)
    assert given.calibration_samples == 0
    for name in (*ACTIVATIONS, "f"):
        assert given.params[name].same_as(calibrated.params[name]), name
    np.testing.assert_array_equal(run(given.model, data)[0], run(calibrated.model, data)[0])


def test_range_override_changes_only_that_tensor(toolkit: ortq.Toolkit) -> None:
    model, data = tiny_cnn(), tiny_data()
    base = toolkit.quantize(model, None, calibration_data=data)
    moved = toolkit.quantize(model, None, calibration_data=data, tensor_overrides={"g": {"rmin": 0.0, "rmax": 2.0}})
    assert moved.ranges["g"] == (0.0, 2.0)
    expected = params_from_range(0.0, 2.0, QuantSpec(QuantType.UINT8))
    changed = {name for name in base.params if not base.params[name].same_as(moved.params[name])}
    assert changed == {"g", "f"}  # f is Flatten(g): it must carry g's parameters
    assert moved.params["g"].same_as(expected) and moved.params["f"].same_as(expected)
    # A coarser scale on g costs accuracy, measurably, but the model still runs.
    ref = run(model, data)[0]
    assert sqnr_db(ref, run(base.model, data)[0]) > sqnr_db(ref, run(moved.model, data)[0]) > 10.0


def test_16_bit_override_on_one_activation(toolkit: ortq.Toolkit) -> None:
    model, data = tiny_cnn(), tiny_data()
    result = toolkit.quantize(model, None, calibration_data=data, tensor_overrides={"r1": [{"quant_type": "QUInt16"}]})
    assert result.params["r1"].qtype is QuantType.UINT16 and result.params["g"].qtype is QuantType.UINT8
    assert max(i.version for i in result.model.opset_import if i.domain in ("", "ai.onnx")) >= 21
    zero_points = {n.input[0]: _inits(result.model)[n.input[2]].dtype for n in result.model.graph.node if n.op_type == "QuantizeLinear"}
    assert zero_points["r1"] == np.uint16 and zero_points["x"] == np.uint8
    onnx.checker.check_model(result.model, full_check=True)
    assert sqnr_db(run(model, data)[0], run(result.model, data)[0]) > 30.0


def test_symmetric_int8_override_with_negative_zero_point_type(toolkit: ortq.Toolkit) -> None:
    model = tiny_cnn()
    data = {"x": np.random.default_rng(4).uniform(-1.5, 1.55, size=(32, 3, 8, 8)).astype(np.float32)}  # int8 zp -3 covers it
    result = toolkit.quantize(
        model, None, calibration_data=data,
        tensor_overrides={"x": {"quant_type": "int8", "scale": 0.0123457, "zero_point": -3}, "y": {"symmetric": True}},
    )
    scale, zp = _q_params(result.model, "x")
    assert zp.dtype == np.int8 and zp == -3 and scale == np.float32(0.0123457)
    assert result.params["y"].zero_point == 128  # symmetric uint8: the middle of the type
    assert sqnr_db(run(model, data)[0], run(result.model, data)[0]) > 25.0


def test_compat_quantize_static_takes_tensor_quant_overrides(tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    ortq.quantize_static(
        tiny_cnn(), out, tiny_data(), activation_type=ortq.QuantType.QUInt8,
        extra_options={"TensorQuantOverrides": {
            "x": [{"scale": np.float32(0.0311), "zero_point": np.uint8(121), "quant_type": ortq.QuantType.QUInt8}],
            "g": [{"rmax": 1.5}],
        }},
        toolkit=ortq.Toolkit(autoload=False),
    )
    saved = onnx.load(out)
    scale, zp = _q_params(saved, "x")
    assert scale == np.float32(0.0311) and zp == 121
    g_scale, _ = _q_params(saved, "g")
    assert g_scale == np.float32(1.5 / 255)  # calibrated minimum is 0 (after a ReLU), given maximum 1.5


def test_cli_tensor_overrides_file(cnn_files: tuple[Path, Path], tmp_path: Path) -> None:
    model_path, data_path = cnn_files
    overrides = tmp_path / "o.json"
    overrides.write_text(json.dumps({"x": {"scale": 0.0123457, "zero_point": 37}}))
    out = tmp_path / "out.onnx"
    cli = build_cli(ortq.Toolkit(autoload=False))
    ok = CliRunner().invoke(cli, ["quantize", str(model_path), "-o", str(out), "-d", str(data_path),
                                  "--tensor-overrides", str(overrides)])
    assert ok.exit_code == 0, ok.output
    assert _q_params(onnx.load(out), "x") == (np.float32(0.0123457), 37)
    # Without data, the tensors that still need calibration are named.
    bad = CliRunner().invoke(cli, ["quantize", str(model_path), "-o", str(out), "--tensor-overrides", str(overrides)])
    assert bad.exit_code == 1 and "calibration data is needed" in bad.output and "'r1'" in bad.output
    overrides.write_text('{"x": {"scale": NaN, "zero_point": 3}}')
    nan = CliRunner().invoke(cli, ["quantize", str(model_path), "-o", str(out), "-d", str(data_path),
                                   "--tensor-overrides", str(overrides)])
    assert nan.exit_code == 1 and "'x'" in nan.output and "finite and positive" in nan.output
    overrides.write_text('{"x": {"scale": 0.1, "zero_point": 3,}}')
    broken = CliRunner().invoke(cli, ["quantize", str(model_path), "-o", str(out), "-d", str(data_path),
                                      "--tensor-overrides", str(overrides)])
    assert broken.exit_code == 1 and "not valid JSON (line 1" in broken.output


@pytest.mark.parametrize(
    ("overrides", "options", "message"),
    [
        ({"r": {"rmax": 1.0}}, {}, "not present in the model; did you mean 'r1'"),
        ({"x": {"scale": 0.0, "zero_point": 0}}, {}, "scale must be finite and positive"),
        ({"x": {"scale": -1.0, "zero_point": 0}}, {}, "scale must be finite and positive"),
        ({"x": {"scale": 0.1, "zero_point": 300}}, {}, "zero point 300 is outside uint8 [0, 255]"),
        ({"x": {"scale": 0.1, "zero_point": -3}}, {}, "zero point -3 is outside uint8 [0, 255]; set quant_type"),
        ({"x": {"scale": 0.1}}, {}, "Must provide both 'scale' and 'zero_point'"),
        ({"x": {"scale": 0.1, "zero_point": 3, "rmax": 2.0}}, {}, "are invalid with 'scale' and 'zero_point'"),
        ({"x": {"convert": {"quant_type": "uint16"}}}, {}, "'convert'"),
        ({"x": {"bits": 16}}, {}, "unknown key(s) ['bits']"),
        ({"x": {"quant_type": "float8"}}, {}, "unsupported quantization type"),
        ({"x": {"rmin": 2.0, "rmax": 1.0}}, {}, "rmin [2.0] is above rmax [1.0]"),
        ({"f": {"rmax": 1.0}}, {}, "put the override on 'g'"),
        ({"c1": {"rmax": 1.0}}, {}, "override 'r1' instead"),
        ({"b1": {"quant_type": "int8"}}, {}, "int32 bias"),
        ({"y": {"rmax": 1.0}}, {"nodes_to_exclude": ["fc"]}, "stays float: excluded by nodes_to_exclude"),
        ({"w1": [{"axis": 5}]}, {}, "axis 5 is out of range for a rank-4 tensor"),
        ({"w1": [{"axis": 1}]}, {}, "its bias 'b1' has 8 values"),
        ({"w1": [{"axis": 0, "scale": 0.1, "zero_point": 0}]}, {}, "1 per-channel scale(s) for 8 channel(s)"),
        ({"x": [{"axis": 1}]}, {}, "apply to weights only"),
        ({"w1": [{"axis": 0, "quant_type": "int8"}, {"quant_type": "uint8"}]}, {}, "channel 1 has quant_type"),
        ({"x": [1, 2]}, {}, "expected a dict or a non-empty list of dicts"),
    ],
)
def test_invalid_overrides_are_refused_by_name(
    toolkit: ortq.Toolkit, overrides: dict, options: dict, message: str
) -> None:
    with pytest.raises(ortq.ConfigError) as err:
        toolkit.quantize(tiny_cnn(), None, calibration_data=tiny_data(8), tensor_overrides=overrides, **options)
    assert message in str(err.value)
    name = next(iter(overrides))
    assert repr(name) in str(err.value)


def test_target_refuses_parameters_it_cannot_run(toolkit: ortq.Toolkit) -> None:
    """esp32 shifts instead of scaling: a given scale must be a power of two, with no zero point."""
    with pytest.raises(ortq.ConfigError, match=r"tensor override for 'x'.*power-of-two"):
        toolkit.quantize(
            tiny_cnn(), None, calibration_data=tiny_data(8), target="esp32s3",
            tensor_overrides={"x": {"quant_type": "int8", "scale": 0.0123457, "zero_point": 0}},
        )
    result = toolkit.quantize(
        tiny_cnn(), None, calibration_data=tiny_data(8), target="esp32s3",
        tensor_overrides={"x": {"quant_type": "int8", "scale": 2.0**-5, "zero_point": 0}},
    )
    assert result.params["x"].scale == np.float32(2.0**-5)


def test_same_overrides_give_onnxruntime_s_parameters(tmp_path: Path) -> None:
    """One TensorQuantOverrides dict, written for onnxruntime.quantization, gives the same Q/DQ in both tools."""
    oq = pytest.importorskip("onnxruntime.quantization")
    model_path = tmp_path / "m.onnx"
    onnx.save(tiny_cnn(), model_path)
    data = tiny_data()

    class Reader(oq.CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"x": data["x"][i:i + 1]} for i in range(len(data["x"]))])

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    overrides = {
        "x": [{"scale": np.array(0.0123457, np.float32), "zero_point": np.array(37, np.uint8)}],
        "g": [{"rmax": np.array(1.5, np.float32)}],
        "r1": [{"quant_type": oq.QuantType.QUInt16}],
    }
    options = dict(per_channel=True, activation_type=oq.QuantType.QUInt8, weight_type=oq.QuantType.QInt8,
                   extra_options={"TensorQuantOverrides": overrides})
    oq.quantize_static(str(model_path), str(tmp_path / "ort.onnx"), Reader(), quant_format=oq.QuantFormat.QDQ, **options)
    ortq.quantize_static(model_path, tmp_path / "ortq.onnx", Reader(), toolkit=ortq.Toolkit(autoload=False), **options)
    for name in ("x", "r1", "g", "f"):
        theirs, ours = _q_params(onnx.load(tmp_path / "ort.onnx"), name), _q_params(onnx.load(tmp_path / "ortq.onnx"), name)
        for a, b in zip(theirs, ours):
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name


def test_weight_range_overrides(toolkit: ortq.Toolkit) -> None:
    """rmin/rmax on a weight replace its values' range: one range makes it per tensor, one per channel keeps axis 0."""
    model, data = tiny_cnn(), tiny_data()
    per_tensor = toolkit.quantize(model, None, calibration_data=data, tensor_overrides={"w2": {"rmin": -2.0, "rmax": 2.0}})
    p = per_tensor.params["w2"]
    assert not p.per_channel and p.scale == np.float32(2.0 / 127) and p.zero_point == 0  # the cpu weights stay symmetric
    w2 = np.abs(numpy_helper.to_array(model.graph.initializer[2]))
    assert w2.max() < 2.0
    limits = [float(w2[c].max()) * (1.1 + 0.1 * c) for c in range(5)]  # cover each channel, odd margins
    channels = [{"axis": 0, "rmin": -limits[0], "rmax": limits[0]}] + [{"rmin": -v, "rmax": v} for v in limits[1:]]
    per_channel = toolkit.quantize(model, None, calibration_data=data, tensor_overrides={"w2": channels})
    np.testing.assert_array_equal(per_channel.params["w2"].scale, (np.array(limits) / 127).astype(np.float32))
    # The stored weight is the float one rounded on the given grid: within half a step per channel, no clipping.
    inits = _inits(per_channel.model)
    scale, _ = _q_params(per_channel.model, "w2")
    dequantized = inits["w2_quantized"].astype(np.float32) * scale[:, None]
    weights = numpy_helper.to_array(model.graph.initializer[2])
    assert np.all(np.abs(dequantized - weights) <= scale[:, None] / 2 * (1 + 1e-6))
    ref = run(model, data)[0]
    assert sqnr_db(ref, run(per_channel.model, data)[0]) > 30.0 and sqnr_db(ref, run(per_tensor.model, data)[0]) > 30.0
