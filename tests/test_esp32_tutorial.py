"""Espressif's own ESP-DL v1.1 tutorial model (MNIST: a Reshape on the graph input, then three Gemm layers) on
the esp32 targets.

The tutorial's ONNX file is not in ``../shared/espdl``, but its export is: ``mnist_coefficient.cpp`` holds every
weight (int16 at exponent -15) and bias of the optimized model (``fused_gemm_0..2``), and Espressif's deployment
guide gives the graph (``sequential/flatten/Reshape`` of the 28x28 input to 784, Gemm+ReLU 128, Gemm+ReLU 64,
Gemm 10). So the test rebuilds the float model from Espressif's own numbers; where that folder is absent it uses
random weights of the same shape (everything but the bit-for-bit comparison still runs).

The leading Reshape reads the graph input. The planner leaves such a data-movement op float on host runtimes
(moving a float tensor in 8 bits gains nothing), but ESP-DL's firmware is fed integers at the input exponent, so
the esp32 targets set ``QuantConfig.quantize_graph_inputs`` and the input becomes a quantized activation.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import ortq
from ortq.core.error_measures import sqnr_db
from ortq.plugins.backends.esp32 import Esp32Backend
from ortq.plugins.backends.esp32.chips import chip_spec
from ortq.plugins.backends.esp32.codegen import filter_unlayout

ESPDL = Path(__file__).resolve().parents[1] / ".." / "shared" / "espdl" / "v1.1"
TUTORIAL = ESPDL / "tutorial" / "quantization_tool_example" / "model" / "mnist_coefficient.cpp"
DIMS = (784, 128, 64, 10)
BIAS_EXPONENTS = (-11, -11, -9)  # Espressif's mnist_coefficient.cpp (the layers' output exponents)


def _elements(source: str, name: str) -> np.ndarray:
    found = re.search(re.escape(name) + r"_element\[\d*\] = \{(.*?)\};", source, re.S)
    assert found is not None, name
    return np.array([int(v) for v in found.group(1).split(",") if v.strip()], np.int64)


def tutorial_model(rng: np.random.Generator) -> tuple[onnx.ModelProto, bool]:
    """(the tutorial's optimized float model, whether it carries Espressif's own weights)."""
    real = TUTORIAL.is_file()
    source = TUTORIAL.read_text() if real else ""
    spec = chip_spec("esp32s3", 16, "1.1")  # the tutorial was exported for esp32s3, int16 per-tensor
    inits: dict[str, np.ndarray] = {"shape": np.array([-1, DIMS[0]], np.int64)}
    nodes = [helper.make_node("Reshape", ["input", "shape"], ["flat"], name="sequential/flatten/Reshape")]
    x = "flat"
    for i, (k, n) in enumerate(zip(DIMS, DIMS[1:])):
        if real:
            f = filter_unlayout(_elements(source, f"fused_gemm_{i}_filter"), (n, k, 1, 1), spec)
            w = f[:, :, 0, 0].T * 2.0**-15
            b = _elements(source, f"fused_gemm_{i}_bias") * 2.0 ** BIAS_EXPONENTS[i]
        else:
            w, b = rng.normal(0, 1 / np.sqrt(k), (k, n)), rng.normal(0, 0.05, n)
        inits[f"w{i}"], inits[f"b{i}"] = w.astype(np.float32), b.astype(np.float32)
        y = "output" if i == 2 else f"g{i}"
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [y], name=f"fused_gemm_{i}"))
        if i < 2:
            nodes.append(helper.make_node("Relu", [y], [f"r{i}"], name=f"relu_{i}"))
            x = f"r{i}"
    graph = helper.make_graph(
        nodes, "mnist", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 28, 28])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", DIMS[-1]])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model, real


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    """MNIST-like inputs: pixels in [0, 1], mostly dark, as the tutorial's images / 255."""
    x = rng.uniform(0, 1, (n, 28, 28)) * (rng.uniform(0, 1, (n, 28, 28)) < 0.2)
    return x.astype(np.float32)


def _gxx_m32() -> str | None:
    gxx = shutil.which("g++")
    if gxx is None or not (ESPDL / "include").is_dir():
        return None
    probe = subprocess.run([gxx, "-m32", "-x", "c++", "-", "-o", "/dev/null"], input="#include <vector>\nint main(){}\n",
                           capture_output=True, text=True, timeout=120)
    return gxx if probe.returncode == 0 else None


def test_graph_input_read_by_a_reshape_is_quantized_only_where_the_target_asks() -> None:
    """The CPU target keeps its rule (a Reshape of a float input stays float); the esp32 targets quantize the input."""
    model, _ = tutorial_model(np.random.default_rng(0))
    toolkit = ortq.Toolkit(autoload=False)
    cpu, config, _ = toolkit.plan(model)
    assert not config.quantize_graph_inputs
    assert "sequential/flatten/Reshape" not in cpu.quantized_nodes
    assert "input" not in cpu.tensors
    esp, config, _ = toolkit.plan(model, target="esp32s3")
    assert config.quantize_graph_inputs
    assert esp.quantized_nodes.get("sequential/flatten/Reshape") == "Reshape"
    assert type(esp.tensors["input"].role).__name__ == "Activation"
    assert esp.tensors["flat"].source == "input"
    assert not esp.float_nodes


@pytest.mark.parametrize("bits", [16, 8])
def test_tutorial_model_exports_for_esp32s3_v1_1(tmp_path: Path, bits: int) -> None:
    rng = np.random.default_rng(1)
    model, real = tutorial_model(rng)
    calib, held_out = _images(rng, 64), _images(rng, 64)
    out = tmp_path / "export"
    out.mkdir()
    result = ortq.Toolkit(autoload=False).quantize(
        model, out / "mnist.onnx", calibration_data={"input": calib}, target="esp32s3", backend_options={"bits": bits},
    )
    onnx.checker.check_model(result.model, full_check=True)
    t = f"int{bits}_t"
    model_hpp = (out / "mnist_model.hpp").read_text()
    assert f"Reshape<{t}>({{1, 1, 784}}, \"sequential/flatten/Reshape\")" in model_hpp
    assert "this->l_sequential_flatten_Reshape.build(input);" in model_hpp
    coeff_hpp = (out / "mnist_coefficient.hpp").read_text()
    input_exponent = int(re.search(r"graph_input_input_exponent = (-?\d+);", coeff_hpp).group(1))
    assert f"sequential_flatten_Reshape_output_exponent = {input_exponent};" in coeff_hpp  # a Reshape keeps it
    assert f"fused_gemm_0_input_exponent = {input_exponent};" in coeff_hpp
    if real and bits == 16:
        # Espressif's own weights come back bit for bit: same layout, same int16 values, same exponent -15.
        ours, theirs = (out / "mnist_coefficient.cpp").read_text(), TUTORIAL.read_text()
        for i, (k, n) in enumerate(zip(DIMS, DIMS[1:])):
            np.testing.assert_array_equal(_elements(ours, f"fused_gemm_{i}_filter"), _elements(theirs, f"fused_gemm_{i}_filter"))
            assert f"fused_gemm_{i}_filter(fused_gemm_{i}_filter_element, -15, {{1, 1, {k}, {n}}}, {{1, 1}});" in ours
    # The chip's integer arithmetic, simulated on the host, stays close to the float model.
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": held_out})[0]
    simulated = Esp32Backend(chip="esp32s3", bits=bits).evaluate(result, {"input": held_out})["output"]
    sqnr = sqnr_db(reference, simulated)
    print(f"\ntutorial MNIST on esp32s3 int{bits}: simulated vs float SQNR {sqnr:.1f} dB")
    assert sqnr > (25.0 if bits == 8 else 50.0)
    assert float(np.mean(simulated.argmax(1) == reference.argmax(1))) > 0.9


GXX = _gxx_m32()


@pytest.mark.skipif(GXX is None, reason="../shared/espdl/v1.1 or a 32-bit g++ (g++-multilib) is absent")
def test_tutorial_model_class_compiles_against_the_v1_1_headers(tmp_path: Path) -> None:
    """The coefficient file and the generated model class (Reshape first) build as ESP32 code and link together."""
    rng = np.random.default_rng(2)
    model, _ = tutorial_model(rng)
    out = tmp_path / "export"
    out.mkdir()
    ortq.Toolkit(autoload=False).quantize(
        model, out / "mnist.onnx", calibration_data={"input": _images(rng, 32)}, target="esp32s3",
        backend_options={"bits": 16},
    )
    includes = ["-isystem", str(ESPDL / "idf_stubs" / "esp32s3"), "-isystem", str(ESPDL / "include")]
    for folder in sorted((ESPDL / "include").iterdir()):
        if folder.is_dir():
            includes += ["-isystem", str(folder)]
    main = tmp_path / "main.cpp"
    main.write_text(
        '#include "mnist_model.hpp"\n'
        "int run(dl::Tensor<int16_t> &input) {\n"
        "    input.set_exponent(graph_input_input_exponent).set_shape({28, 28, 1});\n"
        "    MNIST model;\n    model.forward(input);\n    return model.l_fused_gemm_2.get_output().exponent;\n}\n"
    )
    objects = []
    for source in (out / "mnist_coefficient.cpp", main):
        obj = tmp_path / (source.stem + ".o")
        done = subprocess.run(
            [GXX, "-m32", "-std=gnu++17", "-Wall", "-Werror", "-Wno-unused-variable", *includes, "-I", str(out),
             "-c", str(source), "-o", str(obj)],
            capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, f"{source.name}:\n{done.stderr[-4000:]}"
        objects.append(str(obj))
    linked = tmp_path / "linked.o"
    done = subprocess.run([GXX, "-m32", "-r", *objects, "-o", str(linked)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    undefined = subprocess.run(["nm", "-uC", str(linked)], capture_output=True, text=True, timeout=60).stdout
    assert "mnist_coefficient::" not in undefined  # every getter the model class calls is defined
    assert "dl::nn::" in undefined  # the kernels: Espressif's prebuilt library


def test_tutorial_model_exports_as_espdl(tmp_path: Path) -> None:
    """The ESP-DL v3 file for the same model: the Reshape reads the quantized input; the embedded test output is
    reproduced bit for bit by the host reference."""
    from ortq.plugins.backends.esp32.espdl import check_test_values, read_espdl

    rng = np.random.default_rng(3)
    model, _ = tutorial_model(rng)
    result = ortq.Toolkit(autoload=False).quantize(
        model, tmp_path / "mnist.onnx", calibration_data={"input": _images(rng, 32)}, target="esp32s3",
        backend_options={"format": "espdl"},
    )
    assert [p.name for p in result.artifacts] == ["mnist.espdl"]
    back = read_espdl(tmp_path / "mnist.espdl")
    assert back.graph.nodes[0].op_type == "Reshape"
    for name, (expected, got) in check_test_values(back, "esp32s3").items():
        np.testing.assert_array_equal(got, expected, err_msg=name)
