#!/usr/bin/env python
"""Preprocessing benchmark: ``ortq.preprocess`` versus ``onnxruntime.quantization.shape_inference.quant_pre_process``.

Two models, each preprocessed by both tools and then quantized from the same calibration data:

* **bn_cnn**: ``bench_static.py``'s ResNet-18-shaped CNN with a BatchNormalization after every Conv. The
  raw convolutions get per-channel gains spread over a factor of 20 and channel offsets, and each BN's
  statistics undo exactly that (gamma / sqrt(var + eps) = 1 / gain, mean = the offset), so the float model
  computes the same function as bench_static's folded one while its unfolded Conv outputs are what a
  trained network's are: channels of very different scale sharing one per-tensor activation scale.
* **transformer**: ``tests/models.py``'s BERT-style encoder layer with a symbolic batch *and* sequence
  length (``[N, S, 64]``), where ONNX's shape inference leaves dimensions unknown and ONNX Runtime's
  symbolic shape inference is what both tools use.

Tools: ``ortq`` (``ortq.preprocess`` defaults: opset, shapes, constant folding, BN and bias-Add folding, no
ONNX Runtime optimizer), ``ortq-basic`` (the same plus ``ort_level="basic"``), and ``ort``
(``quant_pre_process`` defaults: symbolic shape inference, ONNX Runtime's ORT_ENABLE_BASIC optimizer,
ONNX shape inference). Wall time and peak RSS come from a fresh subprocess per tool and repeat (through
``/bin/sh``, see ``bench_static.run_child``), medians. Accuracy: each preprocessed model (and the raw one)
is quantized with ortq (cpu defaults) and with ``onnxruntime.quantization.quantize_static`` (QDQ, u8/s8
per-channel, MinMax) from the same calibration batches; output SQNR is against the raw float model on
held-out data.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_static import (build_model, child_error, child_record, env_info, make_images, peak_mb,  # noqa: E402
                          run_fresh, save_results, status_mb)

TOOLS = ("ortq", "ortq-basic", "ort")
BN_EPS = 1e-5


# ------------------------------------------------------------------------------------------- models
def unfold_batch_norms(model: onnx.ModelProto, seed: int, spread: float = 1.5) -> onnx.ModelProto:
    """Every Conv -> Conv' + BatchNormalization computing the same function, with trained-looking statistics.

    Conv' has weights ``W * g`` and bias ``mean + g * (b - beta)`` for a per-channel gain
    ``g = exp(U(-spread, spread))``, offset ``mean ~ g * N(0, 0.5)`` and BN shift ``beta ~ N(0, 0.1)``; the
    BN has ``gamma ~ U(0.5, 1.5)`` and ``var = (g * gamma)^2 - eps``, so that BN(Conv'(x)) = Conv(x)."""
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    for node in out.graph.node:
        if node.op_type != "Conv":
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
        c = w.shape[0]
        g = np.exp(rng.uniform(-spread, spread, c))
        mean, beta, gamma = g * rng.normal(0.0, 0.5, c), rng.normal(0.0, 0.1, c), rng.uniform(0.5, 1.5, c)
        var = (g * gamma) ** 2 - BN_EPS
        inits[node.input[1]].CopyFrom(numpy_helper.from_array((w * g[:, None, None, None]).astype(np.float32),
                                                              node.input[1]))
        inits[node.input[2]].CopyFrom(numpy_helper.from_array((mean + g * (b - beta)).astype(np.float32),
                                                              node.input[2]))
        stats = []
        for key, value in (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var)):
            name = f"{node.name}_bn_{key}"
            out.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
            stats.append(name)
        raw = f"{node.output[0]}_raw"
        bn = helper.make_node("BatchNormalization", [raw, *stats], [node.output[0]], name=f"{node.name}_bn",
                              epsilon=BN_EPS)
        node.output[0] = raw
        nodes += [node, bn]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    onnx.checker.check_model(out)
    return out


def symbolic_sequence(model: onnx.ModelProto) -> onnx.ModelProto:
    """The transformer's sequence length made symbolic (``S``) on its inputs and output."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for value in [*out.graph.input, *out.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if len(dims) >= 2:
            dims[1].Clear()
            dims[1].dim_param = "S"
    onnx.checker.check_model(out)
    return out


Feeds = dict[str, np.ndarray]


def build_models(args: argparse.Namespace) -> dict[str, tuple[onnx.ModelProto, Feeds, Feeds]]:
    res, widths, blocks, classes = (64, [16, 32, 64, 128], 1, 100) if args.small else (224, [64, 128, 256, 512], 2, 1000)
    folded = build_model(widths, blocks, classes, args.seed, make_images(16, res, args.seed + 3))
    cnn = unfold_batch_norms(folded, args.seed + 4)
    cnn_feeds = ({"input": make_images(args.samples, res, args.seed + 1)},
                 {"input": make_images(args.eval_samples, res, args.seed + 2)})
    sys.path.insert(0, str(HERE.parent / "tests"))
    from models import transformer_block

    tmodel, tcalib, teval = transformer_block(seed=args.seed, n_calibration=args.samples,
                                              n_evaluation=args.eval_samples)
    return {"bn_cnn": (cnn, *cnn_feeds), "transformer": (symbolic_sequence(tmodel), tcalib, teval)}


# ------------------------------------------------------------------------- child: one preprocess run
def child(args: argparse.Namespace) -> None:
    import onnxruntime  # noqa: F401  - imported before the baseline for every tool alike

    if args.tool.startswith("ortq"):
        import ortq

        def go() -> None:
            ortq.preprocess(args.model, args.out, ort_level="basic" if args.tool == "ortq-basic" else "none")
    else:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        def go() -> None:
            quant_pre_process(args.model, args.out)
    baseline = status_mb()
    t = time.perf_counter()
    go()
    wall = time.perf_counter() - t
    print(json.dumps({"tool": args.tool, "wall_s": wall, "baseline_rss_mb": baseline, "peak_rss_mb": peak_mb(),
                      "vmhwm_mb": status_mb("VmHWM")}))


def run_child(tool: str, model: Path, out: Path) -> dict[str, Any]:
    proc = run_fresh(__file__, "_preprocess", "--tool", tool, "--model", str(model), "--out", str(out))
    if proc.returncode != 0:
        return {"tool": tool, "error": child_error(proc), "stderr_tail": proc.stderr[-2000:]}
    return child_record(proc)


# ------------------------------------------------------------------------------------- what came out
def describe(path: Path) -> dict[str, Any]:
    """Node count, op histogram, and how many activations still lack a full shape (what a quantizer needs)."""
    from ortq.tools.preprocess import tensors_without_shape

    model = onnx.load(str(path))
    ops = Counter(n.op_type for n in model.graph.node)
    domains = sorted({n.domain for n in model.graph.node if n.domain})
    return {"nodes": len(model.graph.node), "ops": dict(sorted(ops.items())), "domains": domains,
            "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
            "without_shape": len(tensors_without_shape(model)),
            "without_full_shape": len(tensors_without_shape(model, every_dim=True))}


def batches(feeds: Feeds, batch: int) -> list[Feeds]:
    n = len(next(iter(feeds.values())))
    return [{k: v[i:i + batch] for k, v in feeds.items()} for i in range(0, n, batch)]


def run_model(path: Path, feeds: Feeds, batch: int) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, f)[0] for f in batches(feeds, batch)])


def quantize(tool: str, model: Path, out: Path, calib: Feeds, batch: int) -> float:
    """Quantize ``model`` with ``tool``; returns the wall time (not a memory measurement: same process)."""
    t = time.perf_counter()
    if tool == "ortq":
        import ortq

        ortq.Toolkit(autoload=False).quantize(str(model), str(out), calibration_data=calib, batch_size=batch,
                                              verify=False)
    else:
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.feeds = iter(batches(calib, batch))

            def get_next(self) -> Feeds | None:
                return next(self.feeds, None)

        quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    return time.perf_counter() - t


# ------------------------------------------------------------------------------------------ report
def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    for r in ok:
        r["growth_mb"] = r["peak_rss_mb"] - r["baseline_rss_mb"]
    keys = ("wall_s", "peak_rss_mb", "baseline_rss_mb", "growth_mb")
    return {"runs": runs, "reps": len(ok), "errors": [r["error"] for r in runs if "error" in r],
            "median": {k: statistics.median(r[k] for r in ok) for k in keys} if ok else None}


def print_tables(r: dict[str, Any]) -> None:
    def cell(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for name, m in r["models"].items():
        print(f"\n== {name}: {m['input']}, {r['config']['repeats']} fresh processes per tool, medians; "
              f"SQNR vs the float model on {r['config']['eval_samples']} held-out samples ==")
        head = ("tool", "wall s", "vs ORT", "peak MB", "vs ORT", "+MB", "nodes", "no shape", "ortq dB", "ORT dB")
        print(f"{head[0]:<12}" + "".join(f"{h:>10}" for h in head[1:]))
        ort_med = m["preprocess"]["ort"]["median"] or {}
        for tool in ("raw", *TOOLS):
            acc = m["sqnr_db"].get(tool, {})
            if tool == "raw":
                med, shape = {}, m["raw"]
            else:
                med, shape = m["preprocess"][tool]["median"] or {}, m["outputs"].get(tool) or {}
            ratio_w = f"{med['wall_s'] / ort_med['wall_s']:.2f}x" if med and ort_med else ""
            ratio_m = f"{med['peak_rss_mb'] / ort_med['peak_rss_mb']:.2f}x" if med and ort_med else ""
            row = (cell(med.get("wall_s"), ".2f"), ratio_w, cell(med.get("peak_rss_mb"), ".0f"), ratio_m,
                   cell(med.get("growth_mb"), ".0f"), cell(shape.get("nodes"), "d"),
                   cell(shape.get("without_full_shape"), "d"), cell(acc.get("ortq"), ".2f"), cell(acc.get("ort"), ".2f"))
            print(f"{tool:<12}" + "".join(f"{c:>10}" for c in row))
        for tool in TOOLS:
            before, after = Counter(m["raw"]["ops"]), Counter((m["outputs"].get(tool) or {}).get("ops", {}))
            gone = {k: before[k] - after[k] for k in before if before[k] > after[k]}
            new = {k: after[k] - before[k] for k in after if after[k] > before[k]}
            print(f"  {tool}: removed {gone or '{}'}, added {new or '{}'}")
            for err in m["preprocess"][tool]["errors"]:
                print(f"  ERR {tool}: {err}")


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer's "consider pre-processing" advice
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ortq_bench_pre_"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for name, (model, calib, evals) in build_models(args).items():
        raw = work / f"{name}.onnx"
        onnx.save(model, str(raw))
        outs = {tool: work / f"{name}.{tool}.onnx" for tool in TOOLS}
        runs: dict[str, list[dict[str, Any]]] = {tool: [] for tool in TOOLS}
        for i in range(args.repeats):  # tools alternate so machine drift hits all alike
            for tool in TOOLS:
                run = run_child(tool, raw, outs[tool])
                runs[tool].append(run)
                log(f"{name} {tool:<10} repeat {i + 1}: " +
                    (run["error"] if "error" in run else f"{run['wall_s']:.2f} s, peak {run['peak_rss_mb']:.0f} MB"))
        ref = run_model(raw, evals, args.batch_size)
        sqnr: dict[str, dict[str, float | None]] = {}
        quant_s: dict[str, dict[str, float]] = {}
        from ortq.core.error_measures import sqnr_db

        for variant, path in (("raw", raw), *((t, outs[t]) for t in TOOLS if outs[t].exists())):
            sqnr[variant], quant_s[variant] = {}, {}
            for qtool in args.quantizers:
                qpath = work / f"{name}.{variant}.{qtool}.int8.onnx"
                try:
                    quant_s[variant][qtool] = quantize(qtool, path, qpath, calib, args.batch_size)
                    sqnr[variant][qtool] = sqnr_db(ref, run_model(qpath, evals, args.batch_size))
                except Exception as exc:  # report and go on: one failure must not hide the other figures
                    log(f"{name} {variant} quantized by {qtool} failed: {exc}")
                    sqnr[variant][qtool] = None
                log(f"{name} {variant:<10} quantized by {qtool}: {sqnr[variant][qtool]} dB")
        dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input]
        results[name] = {
            "input": ", ".join(f"{v.name}{d}" for v, d in zip(model.graph.input, dims)),
            "raw": describe(raw),
            "preprocess": {tool: summarize(r) for tool, r in runs.items()},
            "outputs": {tool: describe(p) if p.exists() else None for tool, p in outs.items()},
            "sqnr_db": sqnr,
            "quantize_s": quant_s,
        }
    return {"config": {"small": args.small, "samples": args.samples, "eval_samples": args.eval_samples,
                       "batch_size": args.batch_size, "repeats": args.repeats, "seed": args.seed,
                       "quantizers": args.quantizers, "workdir": str(work)},
            "env": env_info(), "models": results}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_child_args(argv: list[str]) -> argparse.Namespace:
    c = argparse.ArgumentParser(prog="bench_preprocess.py _preprocess")
    c.add_argument("--tool", choices=TOOLS, required=True)
    c.add_argument("--model", required=True)
    c.add_argument("--out", required=True)
    return c.parse_args(argv)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="64x64 CNN, narrow widths, 1 block per stage")
    p.add_argument("--samples", type=int, default=32, help="calibration samples (default 32)")
    p.add_argument("--eval-samples", type=int, default=64, help="held-out samples for the SQNR (default 64)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="fresh-process preprocess runs per tool (default 3)")
    p.add_argument("--quantizers", nargs="+", choices=("ortq", "ort"), default=["ortq", "ort"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="where models go, kept (default: a temp dir, deleted at the end)")
    p.add_argument("--results", default=str(HERE / "results"), help="folder for the JSON results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import shutil

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_preprocess"]:
        return child(parse_child_args(argv[1:]))
    args = parse_args(argv)
    results = benchmark(args)
    if not args.workdir:
        shutil.rmtree(results["config"]["workdir"], ignore_errors=True)
    print_tables(results)
    print(f"\nraw results: {save_results(results, args.results, 'preprocess', args.small)}")


if __name__ == "__main__":
    main()
