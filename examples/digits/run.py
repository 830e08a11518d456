"""Quantize the digits CNN end to end and print size, latency and accuracy before and after.

This is the README's first command. It trains the float model first if ``build/`` does not hold it yet
(scikit-learn's bundled digits data, about 15 s), then quantizes it with ortq's defaults for the CPU and
measures both models the same way: one intra-op thread, median of repeated runs.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import ortq

HERE = Path(__file__).resolve().parent


def latency_ms(model_path: Path, feed: dict[str, np.ndarray], runs: int) -> float:
    """Median wall time of one run; one thread so the figure does not depend on what else the machine does."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    for _ in range(5):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def predict(model_path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": images})[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--build", type=Path, default=HERE / "build", help="folder for the model and data")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per latency figure")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    float_path = args.build / "model.onnx"
    if not float_path.exists():
        print(f"training the float model into {args.build} ...", flush=True)
        sys.path.insert(0, str(HERE))
        import train  # the committed trainer beside this script

        train.build(args.build)
    quant_path = args.build / "model.int8.onnx"
    result = ortq.quantize(float_path, quant_path, calibration_data=args.build / "calibration.npz")
    print(result.summary())

    with np.load(args.build / "evaluation.npz") as data:
        images, labels = data["input"], data["label"]
    float_logits, quant_logits = predict(float_path, images), predict(quant_path, images)
    rows = []
    for label, path, logits in (("float32", float_path, float_logits), ("ortq int8", quant_path, quant_logits)):
        rows.append((
            label,
            path.stat().st_size / 1024,
            latency_ms(path, {"input": images[:1]}, args.runs),
            latency_ms(path, {"input": images}, max(5, args.runs // 5)),
            float(np.mean(logits.argmax(1) == labels)),
        ))
    print()
    print(f"{'model':<10} {'size KiB':>9} {'ms batch 1':>11} {'ms batch ' + str(len(images)):>13} {'accuracy':>9}")
    for label, size, lat1, latn, acc in rows:
        print(f"{label:<10} {size:>9.1f} {lat1:>11.3f} {latn:>13.2f} {acc:>9.2%}")
    agreement = float(np.mean(float_logits.argmax(1) == quant_logits.argmax(1)))
    f, q = rows
    print(
        f"\nsize {f[1] / q[1]:.2f}x smaller, batch-1 latency {f[2] / q[2]:.2f}x, batch-{len(images)} latency "
        f"{f[3] / q[3]:.2f}x (float/int8, 1 thread), top-1 agreement {agreement:.2%} on {len(labels)} held-out images"
    )


if __name__ == "__main__":
    main()
