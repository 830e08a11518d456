"""ESP-DL v1.1 export against Espressif's real v1.1 headers (``../shared/espdl/v1.1``): the coefficient files
and the generated model class compile as ESP32 code does (``g++ -m32``), and they link with each other.

The v1.1 headers only declare the kernels (``dl::nn::conv2d`` ...) and the constant constructors; their code is
Espressif's prebuilt Xtensa/RISC-V library, which cannot run on the host, so the link is partial (``ld -r``): every
symbol the model class needs from the coefficient file must resolve, and what stays undefined must be ESP-DL's
or ESP-IDF's own. Skipped where the folder or a 32-bit g++ (Debian: g++-multilib) is absent.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ortq
from ortq.core.error_measures import sqnr_db
from ortq.plugins.backends.esp32 import Esp32Backend

ESPDL = Path(__file__).resolve().parents[1] / ".." / "shared" / "espdl" / "v1.1"


def _gxx_m32() -> str | None:
    gxx = shutil.which("g++")
    if gxx is None or not (ESPDL / "include").is_dir():
        return None
    probe = subprocess.run([gxx, "-m32", "-x", "c++", "-", "-o", "/dev/null"], input="#include <vector>\nint main(){}\n",
                           capture_output=True, text=True, timeout=120)
    return gxx if probe.returncode == 0 else None


GXX = _gxx_m32()
needs_gxx = pytest.mark.skipif(GXX is None, reason="../shared/espdl/v1.1 or a 32-bit g++ (g++-multilib) is absent")


def _model(nodes, x_shape, out_shape, inits) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "m", [helper.make_tensor_value_info("input", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def residual_cnn(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv+ReLU -> depthwise Conv+ReLU -> 1x1 Conv -> Add (residual) -> GlobalAveragePool -> Flatten -> Gemm."""
    inits = {
        "w1": rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "b1": rng.normal(0, 0.1, 8).astype(np.float32),
        "wd": rng.normal(0, 0.4, (8, 1, 3, 3)).astype(np.float32), "bd": rng.normal(0, 0.1, 8).astype(np.float32),
        "w2": rng.normal(0, 0.3, (8, 8, 1, 1)).astype(np.float32), "b2": rng.normal(0, 0.1, 8).astype(np.float32),
        "wf": rng.normal(0, 0.4, (5, 8)).astype(np.float32), "bf": rng.normal(0, 0.1, 5).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "wd", "bd"], ["d"], name="dw", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["d"], ["rd"], name="relu_dw"),
        helper.make_node("Conv", ["rd", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Add", ["r1", "c2"], ["a"], name="residual"),
        helper.make_node("GlobalAveragePool", ["a"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["output"], name="fc", transB=1),
    ]
    return _model(nodes, ["N", 3, 8, 8], ["N", 5], inits)


def _compile_and_link(out: Path, name: str, tmp: Path) -> str:
    """Compile ``<name>_coefficient.cpp`` and a translation unit using ``<name>_model.hpp`` as ESP32 code (32-bit),
    link them together; return the symbols left undefined (ESP-DL's library)."""
    stubs = ESPDL / "idf_stubs" / "esp32s3"
    # -isystem: Espressif's headers have warnings of their own; -Wall -Werror applies to ortq's files.
    includes = ["-isystem", str(stubs), "-isystem", str(ESPDL / "include")]
    for folder in sorted((ESPDL / "include").iterdir()):
        if folder.is_dir():
            includes += ["-isystem", str(folder)]
    cls = name.upper()
    main = tmp / "main.cpp"
    main.write_text(
        f'#include "{name}_model.hpp"\n'
        f"int run(dl::Tensor<{'int8_t' if 'int8' in tmp.name else 'int16_t'}> &input) {{\n"
        f"    {cls} model;\n    model.forward(input);\n    return model.l_fc.get_output().exponent;\n}}\n"
    )
    objects = []
    for source in (out / f"{name}_coefficient.cpp", main):
        obj = tmp / (source.stem + ".o")
        done = subprocess.run(
            [GXX, "-m32", "-std=gnu++17", "-Wall", "-Werror", "-Wno-unused-variable", *includes, "-I", str(out),
             "-c", str(source), "-o", str(obj)],
            capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, f"{source.name}:\n{done.stderr[-4000:]}"
        objects.append(str(obj))
    linked = tmp / "linked.o"
    done = subprocess.run([GXX, "-m32", "-r", *objects, "-o", str(linked)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    nm = subprocess.run(["nm", "-uC", str(linked)], capture_output=True, text=True, timeout=60)
    return nm.stdout


@needs_gxx
@pytest.mark.parametrize(("chip", "bits", "per_channel"), [
    ("esp32", 8, False), ("esp32", 16, False), ("esp32s3", 8, False), ("esp32s3", 16, False), ("esp32s3", 8, True),
])
def test_residual_cnn_builds_against_the_v1_1_headers(tmp_path: Path, chip: str, bits: int, per_channel: bool) -> None:
    rng = np.random.default_rng(4)
    model = residual_cnn(rng)
    x = rng.normal(0, 1, (48, 3, 8, 8)).astype(np.float32)
    out = tmp_path / "export"
    out.mkdir()
    result = ortq.Toolkit(autoload=False).quantize(
        model, out / "resnet.onnx", calibration_data={"input": x[:32]}, target=chip,
        backend_options={"bits": bits}, per_channel=per_channel,
    )
    model_hpp = (out / "resnet_model.hpp").read_text()
    t = f"int{bits}_t"
    bt = "int16_t" if per_channel else t
    for layer in (f"Conv2D<{t}, {bt}>", f"DepthwiseConv2D<{t}, {bt}>", f"Add2D<{t}>", f"GlobalAveragePool2D<{t}>",
                  f"FullyConnected<{t}, {bt}>"):
        assert layer in model_hpp, layer
    assert "PADDING_NOT_SET, {1, 1, 1, 1}" in model_hpp
    # The host simulation of what the chip computes stays close to the float model.
    simulated = Esp32Backend(chip=chip, bits=bits).evaluate(result, {"input": x[32:]})["output"]
    import onnxruntime as ort

    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x[32:]})[0]
    sqnr = sqnr_db(reference, simulated)
    print(f"\nresidual CNN on {chip} int{bits}{' per-channel' if per_channel else ''}: simulated vs float SQNR {sqnr:.1f} dB")
    assert sqnr > (15.0 if bits == 8 else 40.0)
    work = tmp_path / f"build_int{bits}"
    work.mkdir()
    undefined = _compile_and_link(out, "resnet", work)
    assert "resnet_coefficient::" not in undefined  # every getter the model class calls is defined
    assert "dl::nn::conv2d" in undefined and "dl::nn::depthwise_conv2d" in undefined  # the kernels: Espressif's library


def test_clip_that_v1_1_cannot_run_is_refused_with_the_reason(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    inits = {"w": rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "lo": np.array(0.0, np.float32),
             "hi": np.array(6.0, np.float32)}
    model = _model(
        [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Clip", ["c", "lo", "hi"], ["output"], name="relu6")],
        ["N", 3, 6, 6], ["N", 4, 6, 6], inits,
    )
    x = rng.normal(0, 3, (16, 3, 6, 6)).astype(np.float32)  # the output reaches 6: exponent -4, saturating at 7.94
    with pytest.raises(ortq.ModelError, match=r"Clip 'relu6' .* no Clip or ReLU6 layer, and its upper bound 6 is below"):
        ortq.Toolkit(autoload=False).quantize(model, tmp_path / "m.onnx", calibration_data={"input": x}, target="esp32s3")
    assert not list(tmp_path.iterdir())  # nothing half-written
    # Where the output never gets near 6 its exponent saturates below 6, so the Clip is exactly a ReLU there.
    small = (x / 40).astype(np.float32)
    ortq.Toolkit(autoload=False).quantize(model, tmp_path / "m.onnx", calibration_data={"input": small}, target="esp32s3")
    assert "get_conv_activation" in (tmp_path / "m_coefficient.hpp").read_text()


def test_esp32p4_has_no_v1_1_release() -> None:
    with pytest.raises(ValueError, match="esp32p4 has no ESP-DL v1.1 release"):
        Esp32Backend(chip="esp32p4", format="cpp")


@pytest.mark.parametrize(("target", "options"), [("esp32p4", {}), ("esp32s3", {"format": "espdl"})])
def test_espdl_format_writes_the_v3_model_file(tmp_path: Path, target: str, options: dict) -> None:
    from ortq.plugins.backends.esp32.espdl import read_espdl

    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (16, 3, 8, 8)).astype(np.float32)
    result = ortq.Toolkit(autoload=False).quantize(
        residual_cnn(rng), tmp_path / "resnet.onnx", calibration_data={"input": x}, target=target, backend_options=options,
    )
    assert [p.name for p in result.artifacts] == ["resnet.espdl"]
    assert (tmp_path / "resnet.espdl").read_bytes()[:4] == b"EDL2"
    read_espdl(tmp_path / "resnet.espdl")
