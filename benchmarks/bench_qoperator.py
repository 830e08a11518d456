#!/usr/bin/env python
"""QOperator benchmark: ortq's QOperator output versus ``onnxruntime.quantization.quantize_static(QOperator)``.

The ResNet-18-shaped CNN of ``bench_static.py`` (same builder, same images) is quantized from the same
calibration batches (u8 asymmetric activations, s8 symmetric per-channel weights, MinMax) three ways:
ortq QDQ, ortq QOperator, and ONNX Runtime QOperator. Measured the way ``bench_static.py`` measures, and why:

* **Each quantization in a fresh subprocess** (wall time and peak RSS mean nothing in a process that did
  other work first), repeated; medians reported.
* **Latency with one intra-op thread**, models interleaved per round, median of the timed runs; at
  ORT_ENABLE_ALL (a deployment) and at ORT_DISABLE_ALL, which shows what the format itself buys: a QDQ model
  is only fast once ONNX Runtime has fused it, a QOperator model runs its integer kernels as written.
* **Agreement**: output SQNR against float on held-out images, and ortq's QOperator against its own QDQ
  model (same calibration) in output quantization steps: the formats should differ by rounding at most.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_static import (build_model, child_error, child_record, env_info, make_images, peak_mb,  # noqa: E402
                          run_fresh, run_model, save_results, status_mb)

CONFIGS = ("ortq_qdq", "ortq_qop", "ort_qop")


# ------------------------------------------------------------------------- child: one quantize run
def quantize(config: str, model: str, out: str, data: np.ndarray, batch: int) -> dict[str, Any]:
    if config.startswith("ortq"):
        import ortq

        fmt = "qoperator" if config == "ortq_qop" else "qdq"
        res = ortq.Toolkit(autoload=False).quantize(
            model, out, calibration_data={"input": data}, batch_size=batch, quant_format=fmt,
        )
        return {"stages_s": res.seconds}
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"input": data[i:i + batch]} for i in range(0, len(data), batch)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    quantize_static(model, out, Reader(), quant_format=QuantFormat.QOperator, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return {}


def child(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="bench_qoperator.py _quantize")
    p.add_argument("--config", choices=CONFIGS, required=True)
    for name in ("--model", "--data", "--out"):
        p.add_argument(name, required=True)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    import onnxruntime  # noqa: F401  - imported before the baseline for every configuration alike

    data = np.load(args.data)
    baseline = status_mb()
    t = time.perf_counter()
    extra = quantize(args.config, args.model, args.out, data, args.batch_size)
    print(json.dumps({"config": args.config, "wall_s": time.perf_counter() - t, "baseline_rss_mb": baseline,
                      "peak_rss_mb": peak_mb(), **extra}))


def run_child(config: str, model: Path, data: Path, out: Path, batch: int) -> dict[str, Any]:
    proc = run_fresh(__file__, "_quantize", "--config", config, "--model", str(model), "--data", str(data),
                     "--out", str(out), "--batch-size", str(batch))
    if proc.returncode != 0:
        raise RuntimeError(f"{config} failed ({child_error(proc)}):\n{proc.stderr[-4000:]}")
    return child_record(proc)


# ------------------------------------------------------------------------------------------ measuring
def make_session(path: str, optimize: bool) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def latency_ms(paths: dict[str, str], x: np.ndarray, runs: int, warmup: int, optimize: bool) -> dict[str, float]:
    sessions = {name: make_session(p, optimize) for name, p in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for r in range(warmup + runs):
        for name, sess in sessions.items():  # interleaved: machine drift hits every model alike
            t = time.perf_counter()
            sess.run(None, {"input": x})
            if r >= warmup:
                times[name].append((time.perf_counter() - t) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def output_step(path: str, output: str = "logits") -> float | None:
    """Scale of the DequantizeLinear writing the graph output (the output's quantization step)."""
    model = onnx.load(path)
    producer = next((n for n in model.graph.node if output in n.output), None)
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    inits = {i.name: i for i in model.graph.initializer}
    return float(numpy_helper.to_array(inits[producer.input[1]]).max())


def benchmark(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from ortq.core.error_measures import sqnr_db, top1_agreement

    res, widths, blocks, classes = (64, [16, 32, 64, 128], 1, 100) if args.small else (224, [64, 128, 256, 512], 2, 1000)
    calib, evals = make_images(args.samples, res, args.seed + 1), make_images(args.eval_samples, res, args.seed + 2)
    model = build_model(widths, blocks, classes, args.seed, make_images(16, res, args.seed + 3))
    paths = {"float": work / "float.onnx", **{c: work / f"{c}.onnx" for c in CONFIGS}}
    onnx.save(model, str(paths["float"]))
    np.save(work / "calib.npy", calib)
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
    for i in range(args.repeats):
        for c in CONFIGS:
            runs[c].append(run_child(c, paths["float"], work / "calib.npy", paths[c], args.batch_size))
            print(f"repeat {i + 1}/{args.repeats} {c}: {runs[c][-1]['wall_s']:.2f} s", file=sys.stderr)
    p = {k: str(v) for k, v in paths.items()}
    outputs = {k: run_model(v, evals) for k, v in p.items()}
    step = output_step(p["ortq_qdq"])
    diff = np.abs(outputs["ortq_qop"] - outputs["ortq_qdq"])
    return {
        "config": {"input": f"[N,3,{res},{res}]", "widths": widths, "blocks_per_stage": blocks, "samples": args.samples,
                   "eval_samples": args.eval_samples, "repeats": args.repeats, "runs": args.runs, "seed": args.seed},
        "env": env_info(),
        "quantize_s": {c: statistics.median(r["wall_s"] for r in rs) for c, rs in runs.items()},
        "quantize_peak_growth_mb": {
            c: statistics.median(r["peak_rss_mb"] - r["baseline_rss_mb"] for r in rs) for c, rs in runs.items()
        },
        "latency_ms_bs1": latency_ms(p, evals[:1], args.runs, args.warmup, optimize=True),
        "latency_ms_bs1_no_graph_optimization": latency_ms(p, evals[:1], max(args.runs // 3, 5), 2, optimize=False),
        "size_bytes": {k: v.stat().st_size for k, v in paths.items()},
        "sqnr_vs_float_db": {c: sqnr_db(outputs["float"], outputs[c]) for c in CONFIGS},
        "top1_vs_float": {c: top1_agreement(outputs["float"], outputs[c]) for c in CONFIGS},
        "ortq_qop_vs_qdq": {
            "max_abs_diff": float(diff.max()), "output_step": step,
            "max_diff_in_steps": float(diff.max() / step) if step else None,
            "sqnr_db": sqnr_db(outputs["ortq_qdq"], outputs["ortq_qop"]),
        },
        "ortq_qop_vs_ort_qop_sqnr_db": sqnr_db(outputs["ort_qop"], outputs["ortq_qop"]),
        "ops": {c: dict(Counter(n.op_type for n in onnx.load(p[c]).graph.node)) for c in CONFIGS},
    }


def print_table(r: dict[str, Any]) -> None:
    cols = ("float", *CONFIGS)
    print(f"\n== {r['config']['input']}, {r['config']['samples']} calibration / {r['config']['eval_samples']} eval "
          f"images, {r['config']['repeats']} repeats, 1 intra-op thread ==")
    print(f"{'':<34}" + "".join(f"{c:>12}" for c in cols))

    def row(label: str, values: dict[str, float | None], fmt: str) -> None:
        cells = ["-" if values.get(c) is None else format(values[c], fmt) for c in cols]
        print(f"{label:<34}" + "".join(f"{x:>12}" for x in cells))

    row("quantize wall time (s)", r["quantize_s"], ".2f")
    row("quantize peak RSS growth (MB)", r["quantize_peak_growth_mb"], ".0f")
    row("latency bs1, ENABLE_ALL (ms)", r["latency_ms_bs1"], ".2f")
    lat = r["latency_ms_bs1"]
    row("  speedup vs float", {c: lat["float"] / lat[c] for c in cols}, ".2f")
    row("latency bs1, DISABLE_ALL (ms)", r["latency_ms_bs1_no_graph_optimization"], ".2f")
    row("model size (MB)", {k: v / 1e6 for k, v in r["size_bytes"].items()}, ".2f")
    row("output SQNR vs float (dB)", r["sqnr_vs_float_db"], ".2f")
    row("top-1 agreement vs float", r["top1_vs_float"], ".3f")
    a = r["ortq_qop_vs_qdq"]
    print(f"ortq QOperator vs ortq QDQ: max |diff| {a['max_abs_diff']:.4g} = {a['max_diff_in_steps']:.2f} output "
          f"step(s) of {a['output_step']:.4g}; SQNR {a['sqnr_db']:.1f} dB")
    print(f"ortq QOperator vs ORT QOperator: SQNR {r['ortq_qop_vs_ort_qop_sqnr_db']:.1f} dB")
    for c in CONFIGS:
        print(f"{c} ops: {dict(sorted(r['ops'][c].items()))}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_quantize"]:
        return child(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="64x64 input, narrow widths, 1 block per stage")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(HERE / "results"))
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ortq_bench_qop_"))
    try:
        results = benchmark(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    print(f"\nraw results: {save_results(results, args.results, 'qoperator', args.small)}")


if __name__ == "__main__":
    main()
