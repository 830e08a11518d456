"""ESP-DL's quantization toolkit API (ortq.api.esp_dl): the seed document's example, as Espressif writes it
(quantization-toolkit-overview.rst), runs on the digits example apart from the table's file name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run

import ortq
from ortq.api.esp_dl import Calibrator, Evaluator, optimizer


def test_the_seed_example_runs_on_digits(digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with np.load(digits / "calibration.npz") as data:
        calib_dataset = data["input"]
    with np.load(digits / "evaluation.npz") as data:
        test_images, labels = data["input"], data["label"]
    source = onnx.load(str(digits / "model.onnx"))
    before = source.SerializeToString()

    # -- as written in ESP-DL's overview (onnxoptimizer.optimize -> optimizer.optimize) ------------------------
    model_proto = optimizer.optimize(source, ['fuse_bn_into_conv', 'fuse_add_bias_into_conv'])
    optimized_model = optimizer.convert_model_batch_to_dynamic(model_proto)
    optimized_model_path = 'mnist_optimized.onnx'
    onnx.save(optimized_model, optimized_model_path)

    model_proto = onnx.load(optimized_model_path)
    calib = Calibrator('int8', 'per-channel', 'entropy')
    calib.set_providers(['CPUExecutionProvider'])
    pickle_file_path = 'mnist_calib.json'  # the one change: a JSON table, never a pickle
    calib.generate_quantization_table(model_proto, calib_dataset, pickle_file_path)
    calib.export_coefficient_to_cpp(model_proto, pickle_file_path, 'esp32s3', '.', 'mnist_coefficient', True)

    eva = Evaluator('int8', 'per-channel', 'esp32s3')
    eva.generate_quantized_model(model_proto, pickle_file_path)
    outputs = eva.evaluate_quantized_model(test_images, to_float=True)
    res = np.argmax(outputs[0])
    # -----------------------------------------------------------------------------------------------------------

    assert source.SerializeToString() == before  # no input is modified
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("mnist_")) == [
        "mnist_calib.json", "mnist_coefficient.cpp", "mnist_coefficient.hpp", "mnist_coefficient_report.md",
        "mnist_model.hpp", "mnist_optimized.onnx",
    ]
    assert "dl::Bias<int16_t>" in Path("mnist_coefficient.hpp").read_text()  # int8 per-channel: int16 biases
    logits, names = outputs
    assert names == ["logits"] and 0 <= res < logits[0].size
    float_acc = float(np.mean(run(digits / "model.onnx", {"input": test_images})[0].argmax(1) == labels))
    sim_acc = float(np.mean(logits[0].argmax(1) == labels))
    print(f"\nESP-DL API on digits, int8 per-channel entropy, esp32s3: float {float_acc:.2%}, simulated {sim_acc:.2%}")
    assert sim_acc >= float_acc - 0.03
    ints, _ = eva.evaluate_quantized_model(test_images, to_float=False)
    assert ints[0].dtype == np.int8 and np.array_equal(ints[0].argmax(1), logits[0].argmax(1))


def test_a_pickle_table_is_refused_with_the_reason(tmp_path: Path) -> None:
    calib = Calibrator('int8')
    with pytest.raises(ortq.ConfigError, match="JSON, not as a pickle: loading a pickle runs any code"):
        calib.generate_quantization_table(onnx.ModelProto(), np.zeros((1, 1), np.float32), tmp_path / "t.pickle")
    with pytest.raises(ortq.ConfigError, match="pickle"):
        Evaluator('int8', 'per-tensor').generate_quantized_model(onnx.ModelProto(), tmp_path / "t.pickle")
    assert not list(tmp_path.iterdir())


def test_int16_takes_per_tensor_minmax_only() -> None:
    with pytest.raises(ortq.ConfigError, match="int16"):
        Calibrator('int16', 'per-channel', 'minmax')
    with pytest.raises(ortq.ConfigError, match="esp32p4"):
        Evaluator('int8', 'per-tensor', 'esp32p4')
