#!/usr/bin/env python
"""Calibration benchmark: ortq's calibrators versus ``onnxruntime.quantization.quantize_static``.

For every calibration method (minmax, entropy, percentile) and calibration set size (16, 64, 256 samples by
default) both tools quantize the same ResNet-style CNN (the one ``bench_static.py`` builds) from the same
images in batches of 8, each run in a fresh process. A plain float inference over the same batches, also in
a fresh process, is the yardstick for the calibration overhead.

Why each measurement is taken the way it is (the same approach as ``bench_static.py``):

* **A fresh process per tool, method, sample count and repeat, started through /bin/sh.** ``ru_maxrss`` is
  a process-lifetime high-water mark, so it only means something in a process that did nothing else, and
  Linux carries the forked parent's high-water mark across ``execve`` unless a small shell sits in between.
  The child reports its RSS just before the timed call (interpreter, numpy, onnxruntime and the tool
  imported, calibration data loaded) and the peak after it; ``peak - baseline`` is what the call cost.
* **Same settings on both sides**: QDQ, u8 activations, s8 per-channel weights, batch size 8, each tool's
  own defaults for the calibrator options (ORT's entropy and percentile options are deliberately not tuned).
  ortq runs with ``verify=False`` because ORT does no verification pass.
* **Calibration overhead** = ortq's ``calibrate`` stage seconds / the seconds a plain float
  ``InferenceSession`` (default threads, ORT_ENABLE_EXTENDED) takes to be created and to run the same
  batches. Both figures include building a session, so the ratio is what observing the tensors costs.
* **Medians** of the repeats (the machine is shared and noisy). ORT's entropy and percentile calibrators at
  256 samples and above keep every observed activation in memory (several GB, minutes per run), so they run
  ``--heavy-repeats`` times (default 1).
* **Accuracy** (output SQNR and top-1 agreement against the float model) is measured on a separate
  evaluation set that neither tool saw during calibration.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_static import (accuracy, build_model, child_error, child_record, env_info, make_images,  # noqa: E402
                          peak_mb, run_fresh, run_model, status_mb)

METHODS = ("minmax", "entropy", "percentile")
ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
TOOLS = ("ortq", "ort", "float")
KEYS = ("wall_s", "peak_rss_mb", "baseline_rss_mb", "growth_mb", "vmhwm_mb", "calibrate_s", "session_s", "run_s")


# ------------------------------------------------------------------------- child: one timed run
def batches(data: np.ndarray, batch: int) -> list[np.ndarray]:
    return [data[i:i + batch] for i in range(0, len(data), batch)]


def job_ortq(model: str, out: str, data: np.ndarray, batch: int, method: str) -> Callable[[], dict[str, Any]]:
    import ortq

    def go() -> dict[str, Any]:
        res = ortq.Toolkit(autoload=False).quantize(model, out, calibration_data={"input": data},
                                                     calibrate_method=method, batch_size=batch, verify=False)
        return {"stages_s": res.seconds, "calibrate_s": res.seconds.get("calibrate"),
                "calibration_samples": res.calibration_samples}
    return go


def job_ort(model: str, out: str, data: np.ndarray, batch: int, method: str) -> Callable[[], dict[str, Any]]:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"input": b} for b in batches(data, batch)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    def go() -> dict[str, Any]:
        quantize_static(model, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, ORT_METHODS[method]))
        return {}
    return go


def job_float(model: str, out: str, data: np.ndarray, batch: int, method: str) -> Callable[[], dict[str, Any]]:
    """The yardstick: the same batches through a plain session (default threads, ORT_ENABLE_EXTENDED)."""
    import onnxruntime as ort

    def go() -> dict[str, Any]:
        t = time.perf_counter()
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        t_run = time.perf_counter()
        for b in batches(data, batch):
            sess.run(None, {"input": b})
        return {"session_s": t_run - t, "run_s": time.perf_counter() - t_run}
    return go


def child(args: argparse.Namespace) -> None:
    """Runs in a fresh interpreter: import, load data, note the baseline RSS, run once, print JSON."""
    import onnxruntime  # noqa: F401  - imported before the baseline for every tool alike

    data = np.load(args.data)
    jobs = {"ortq": job_ortq, "ort": job_ort, "float": job_float}
    go = jobs[args.tool](args.model, args.out, data, args.batch_size, args.method)
    baseline, peak_before = status_mb(), peak_mb()
    t = time.perf_counter()
    extra = go()
    wall = time.perf_counter() - t
    print(json.dumps({"tool": args.tool, "method": args.method, "samples": len(data), "wall_s": wall,
                      "baseline_rss_mb": baseline, "peak_rss_before_mb": peak_before, "peak_rss_mb": peak_mb(),
                      "vmhwm_mb": status_mb("VmHWM"), **extra}))


def run_child(tool: str, method: str, model: Path, data: Path, out: Path, batch: int) -> dict[str, Any]:
    """A failure is returned as a record with ``error`` rather than raised, so one broken configuration
    doesn't end the matrix."""
    t = time.perf_counter()
    proc = run_fresh(__file__, "_run", "--tool", tool, "--method", method, "--model", str(model),
                     "--data", str(data), "--out", str(out), "--batch-size", str(batch))
    if proc.returncode != 0:
        return {"tool": tool, "method": method, "error": child_error(proc), "returncode": proc.returncode,
                "stderr_tail": proc.stderr[-4000:], "elapsed_s": time.perf_counter() - t}
    return child_record(proc)


# ----------------------------------------------------------------------------------------- parent
def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    for r in ok:
        r["growth_mb"] = r["peak_rss_mb"] - r["baseline_rss_mb"]
    med = {k: statistics.median(r[k] for r in ok) for k in KEYS if ok and all(r.get(k) is not None for r in ok)}
    err = next((r["error"] for r in runs if "error" in r), None)
    return {"runs": runs, "median": med, "repeats": len(ok), "error": err}


def heavy(tool: str, method: str, n: int, args: argparse.Namespace) -> bool:
    return tool == "ort" and method in ("entropy", "percentile") and n >= args.heavy_samples


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def benchmark(args: argparse.Namespace, work: Path, out_json: Path) -> dict[str, Any]:
    res, widths, blocks, classes = (64, [16, 32, 64, 128], 1, 100) if args.small else (224, [64, 128, 256, 512], 2, 1000)
    samples, methods = sorted(set(args.samples)), list(dict.fromkeys(args.methods))
    tools = [t for t in TOOLS if t in args.tools]
    work.mkdir(parents=True, exist_ok=True)
    # Nested calibration sets: the first n images of one set, so a larger set only adds images.
    calib, evals = make_images(max(samples), res, args.seed + 1), make_images(args.eval_samples, res, args.seed + 2)
    model = build_model(widths, blocks, classes, args.seed, make_images(16, res, args.seed + 3))
    float_path = work / "float.onnx"
    onnx.save(model, str(float_path))
    for n in samples:
        np.save(work / f"calib_{n}.npy", calib[:n])
    del calib
    ref = run_model(str(float_path), evals)
    results: dict[str, Any] = {
        "config": {"label": "small" if args.small else "default", "input": f"[N,3,{res},{res}]", "widths": widths,
                   "blocks_per_stage": blocks, "classes": classes, "samples": samples, "methods": methods,
                   "tools": tools, "batch_size": args.batch_size, "eval_samples": args.eval_samples,
                   "repeats": args.repeats, "heavy_repeats": args.heavy_repeats, "heavy_samples": args.heavy_samples,
                   "seed": args.seed, "workdir": str(work), "argv": sys.argv[1:]},
        "env": env_info(),
        "cells": {},
    }
    t_start = time.perf_counter()
    for n in samples:
        data = work / f"calib_{n}.npy"
        todo: list[tuple[str, str]] = [("float", "-")] if "float" in tools else []
        todo += [(tool, m) for m in methods for tool in ("ortq", "ort") if tool in tools]
        # Group by (method, n): alternate the tools repeat by repeat so machine noise spreads over both.
        groups: dict[str, list[tuple[str, str]]] = {}
        for tool, m in todo:
            groups.setdefault(m, []).append((tool, m))
        for m, group in groups.items():
            runs: dict[str, list[dict[str, Any]]] = {tool: [] for tool, _ in group}
            for i in range(args.repeats):
                for tool, _ in group:
                    if i >= (args.heavy_repeats if heavy(tool, m, n, args) else args.repeats):
                        continue
                    if runs[tool] and "error" in runs[tool][-1]:
                        continue  # a failing configuration fails the same way every time
                    out = work / f"{tool}_{m}_{n}.onnx"
                    r = run_child(tool, m if tool != "float" else "minmax", float_path, data, out, args.batch_size)
                    r["method"] = m
                    runs[tool].append(r)
                    what = (f"ERROR {r['error']}" if "error" in r else
                            f"{r['wall_s']:.2f} s, peak {r['peak_rss_mb']:.0f} MB")
                    log(f"n={n} {tool} {m} repeat {i + 1}: {what}")
            for tool, rr in runs.items():
                cell = summarize(rr)
                if tool != "float" and cell["error"] is None:
                    out = work / f"{tool}_{m}_{n}.onnx"
                    cell["accuracy"] = accuracy(ref, run_model(str(out), evals))
                    cell["size_bytes"] = out.stat().st_size
                results["cells"][f"{tool}/{m}/{n}"] = cell
            results["elapsed_s"] = time.perf_counter() - t_start
            out_json.write_text(json.dumps(results, indent=2, default=str))  # partial results survive a crash
    return results


# ------------------------------------------------------------------------------------------ report
def cell_value(results: dict[str, Any], tool: str, method: str, n: int, key: str) -> Any:
    cell = results["cells"].get(f"{tool}/{method}/{n}")
    if cell is None:
        return None
    if cell["error"] is not None:
        return "ERR"
    if key in ("sqnr_db", "top1"):
        return cell.get("accuracy", {}).get(key)
    return cell["median"].get(key)


def fmt(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return format(v, spec)


def ratio(a: Any, b: Any) -> str:
    ok = all(isinstance(v, (int, float)) for v in (a, b)) and b
    return f"{a / b:.2f}x" if ok else "-"


def print_tables(r: dict[str, Any]) -> None:
    c = r["config"]
    samples, methods = c["samples"], c["methods"]
    v = lambda tool, m, n, key: cell_value(r, tool, m, n, key)  # noqa: E731
    print(f"\n== calibration, {c['label']}: {c['input']}, batch {c['batch_size']}, {c['eval_samples']} eval samples, "
          f"median of {c['repeats']} fresh-process repeats "
          f"(ORT entropy/percentile at >= {c['heavy_samples']} samples: {c['heavy_repeats']}) ==")

    print("\nquantize call: wall time and memory (peak = ru_maxrss of the child; +MB = peak - RSS before the call)")
    head = (f"{'method':<11}{'n':>4}{'ortq s':>9}{'ORT s':>9}{'ortq/ORT':>9}{'ortq MB':>9}{'ORT MB':>9}"
            f"{'ortq/ORT':>9}{'ortq +MB':>9}{'ORT +MB':>9}{'ortq/ORT':>9}{'reps':>6}")
    print(head + "\n" + "-" * len(head))
    for m in methods:
        for n in samples:
            vals = {(t, k): v(t, m, n, k) for t in ("ortq", "ort") for k in ("wall_s", "peak_rss_mb", "growth_mb")}
            reps = "/".join(str(r["cells"].get(f"{t}/{m}/{n}", {}).get("repeats", "-")) for t in ("ortq", "ort"))
            print(f"{m:<11}{n:>4}"
                  f"{fmt(vals['ortq', 'wall_s'], '.2f'):>9}{fmt(vals['ort', 'wall_s'], '.2f'):>9}"
                  f"{ratio(vals['ortq', 'wall_s'], vals['ort', 'wall_s']):>9}"
                  f"{fmt(vals['ortq', 'peak_rss_mb'], '.0f'):>9}{fmt(vals['ort', 'peak_rss_mb'], '.0f'):>9}"
                  f"{ratio(vals['ortq', 'peak_rss_mb'], vals['ort', 'peak_rss_mb']):>9}"
                  f"{fmt(vals['ortq', 'growth_mb'], '.0f'):>9}{fmt(vals['ort', 'growth_mb'], '.0f'):>9}"
                  f"{ratio(vals['ortq', 'growth_mb'], vals['ort', 'growth_mb']):>9}{reps:>6}")

    print("\ncalibration overhead (vs a float session over the same batches) and accuracy on the eval set")
    head = (f"{'method':<11}{'n':>4}{'float s':>9}{'calib s':>9}{'overhd':>8}{'ORT/fl':>8}"
            f"{'ortq dB':>9}{'ORT dB':>9}{'ortq/ORT':>9}{'ortq t1':>9}{'ORT t1':>8}")
    print(head + "\n" + "-" * len(head))
    for m in methods:
        for n in samples:
            fl = v("float", "-", n, "wall_s")
            cal, ortw = v("ortq", m, n, "calibrate_s"), v("ort", m, n, "wall_s")
            qs, os_ = v("ortq", m, n, "sqnr_db"), v("ort", m, n, "sqnr_db")
            print(f"{m:<11}{n:>4}{fmt(fl, '.2f'):>9}{fmt(cal, '.2f'):>9}{ratio(cal, fl):>8}{ratio(ortw, fl):>8}"
                  f"{fmt(qs, '.2f'):>9}{fmt(os_, '.2f'):>9}{ratio(qs, os_):>9}"
                  f"{fmt(v('ortq', m, n, 'top1'), '.3f'):>9}{fmt(v('ort', m, n, 'top1'), '.3f'):>8}")

    lo, hi = samples[0], samples[-1]
    if hi > lo:
        print(f"\npeak RSS growth from {lo} to {hi} samples (MB; per sample = delta / {hi - lo})")
        head = (f"{'method':<11}{'tool':<6}{f'peak@{lo}':>10}{f'peak@{hi}':>10}{'delta':>9}{'per smp':>9}"
                f"{f'+MB@{lo}':>10}{f'+MB@{hi}':>10}{'delta':>9}{'ortq/ORT':>9}")
        print(head + "\n" + "-" * len(head))
        rows = [("-", "float")] + [(m, t) for m in methods for t in ("ortq", "ort")]
        for m, t in rows:
            p0, p1 = v(t, m, lo, "peak_rss_mb"), v(t, m, hi, "peak_rss_mb")
            g0, g1 = v(t, m, lo, "growth_mb"), v(t, m, hi, "growth_mb")
            num = lambda a, b: b - a if all(isinstance(x, (int, float)) for x in (a, b)) else None  # noqa: E731
            dp, dg = num(p0, p1), num(g0, g1)
            rat = ""
            if t == "ortq":
                rat = ratio(dp, num(v("ort", m, lo, "peak_rss_mb"), v("ort", m, hi, "peak_rss_mb")))
            print(f"{m:<11}{t:<6}{fmt(p0, '.0f'):>10}{fmt(p1, '.0f'):>10}{fmt(dp, '+.0f'):>9}"
                  f"{fmt(None if dp is None else dp / (hi - lo), '+.2f'):>9}"
                  f"{fmt(g0, '.0f'):>10}{fmt(g1, '.0f'):>10}{fmt(dg, '+.0f'):>9}{rat:>9}")

    errors = [(k, cell["error"]) for k, cell in r["cells"].items() if cell["error"]]
    if errors:
        print("\nfailed configurations:")
        for k, e in errors:
            print(f"  {k}: {e}")


# ------------------------------------------------------------------------------------------- CLI
def parse_child_args(argv: list[str]) -> argparse.Namespace:
    """The hidden ``_run`` sub-command: one timed quantize (or float inference) in a fresh process."""
    c = argparse.ArgumentParser(prog="bench_calibration.py _run")
    c.add_argument("--tool", choices=TOOLS, required=True)
    c.add_argument("--method", choices=METHODS, required=True)
    for name in ("--model", "--data", "--out"):
        c.add_argument(name, required=True)
    c.add_argument("--batch-size", type=int, default=8)
    return c.parse_args(argv)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="64x64 input, narrow widths, 1 block per stage")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--samples", type=int, nargs="+", default=[16, 64, 256], help="calibration set sizes")
    p.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS),
                   help="which of ortq, ort and the float yardstick to run (default: all)")
    p.add_argument("--eval-samples", type=int, default=64, help="evaluation samples (default 64)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="fresh-process runs per configuration (default 3)")
    p.add_argument("--heavy-repeats", type=int, default=1,
                   help="runs for ORT entropy/percentile at >= --heavy-samples samples (default 1)")
    p.add_argument("--heavy-samples", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="where models and data go, kept (default: a temp dir, deleted at the end)")
    p.add_argument("--results", default=str(HERE / "results"), help="folder for the JSON results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_run"]:
        return child(parse_child_args(argv[1:]))
    args = parse_args(argv)
    out = Path(args.results) / f"calibration_{time.strftime('%Y%m%d-%H%M%S')}{'_small' if args.small else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ortq_bench_calib_"))
    t = time.perf_counter()
    try:
        results = benchmark(args, work, out)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    results["elapsed_s"] = time.perf_counter() - t
    out.write_text(json.dumps(results, indent=2, default=str))
    print_tables(results)
    print(f"\ntotal run time {results['elapsed_s'] / 60:.1f} min; raw results: {out}")


if __name__ == "__main__":
    main()
