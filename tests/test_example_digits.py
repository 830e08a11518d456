"""The bundled example: a CNN trained on real data keeps >= 99% top-1 agreement after quantization."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run

import ortq



def test_bundled_example_keeps_its_accuracy(digits: Path) -> None:
    result = ortq.Toolkit(autoload=False).quantize(
        digits / "model.onnx", digits / "model.int8.onnx", calibration_data=digits / "calibration.npz"
    )
    quantized = onnx.load(digits / "model.int8.onnx")
    onnx.checker.check_model(quantized, full_check=True)
    assert result.plan.float_nodes == []
    with np.load(digits / "evaluation.npz") as data:
        images, labels = data["input"], data["label"]
    float_logits = run(digits / "model.onnx", {"input": images})[0]
    quant_logits = run(quantized, {"input": images})[0]
    agreement = float(np.mean(float_logits.argmax(1) == quant_logits.argmax(1)))
    float_acc = float(np.mean(float_logits.argmax(1) == labels))
    quant_acc = float(np.mean(quant_logits.argmax(1) == labels))
    print(f"digits: agreement {agreement:.4f}, accuracy float {float_acc:.4f} -> int8 {quant_acc:.4f}")
    assert agreement >= 0.99
    assert quant_acc >= float_acc - 0.01
    assert (digits / "model.int8.onnx").stat().st_size < (digits / "model.onnx").stat().st_size / 3
