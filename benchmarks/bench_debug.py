#!/usr/bin/env python
"""Debugging benchmark: ``ortq.debug_models`` versus ``onnxruntime.quantization.qdq_loss_debug``.

Both tools compare a float model with its QDQ quantization tensor by tensor on the same images. ortq runs
both models with the matched tensors as extra outputs and streams sums per batch; ONNX Runtime's tool
augments both models with every float tensor as an output (``modify_model_output_intermediate_tensors``),
collects every batch's values of all of them (``collect_activations``), pairs them by its own naming
(``create_activation_matching``, ``create_weight_matching``) and computes one SQNR per tensor.

Why each measurement is taken the way it is:

* **Wall time and peak RSS: a fresh subprocess per tool, sample count and repeat** (hidden sub-command
  ``_debug``), started through ``/bin/sh`` as in ``bench_static.py`` so that ``ru_maxrss`` is the child's
  own high-water mark. The child reports its RSS just before the timed call (data loaded, libraries
  imported), so ``peak - baseline`` is what debugging itself cost. Medians of the repeats.
* **A float inference over the same batches** (``float``) is timed the same way: running two models is the
  floor of any tensor-by-tensor debugger.
* **Tensors matched**: activations, weights and outputs each tool actually compares. ONNX Runtime's tool
  pairs activations by the names its own quantizer writes (``_QuantizeLinear_Input``,
  ``_DequantizeLinear_Output``), so it is also run on ONNX Runtime's own QDQ model of the same network.
* **Ranking**: on ``tests/models.py``'s ``outlier_channel_cnn`` (one Conv output channel 1000x the
  others), where does each tool's ranking put the hostile tensor ``relu_3_out``? ONNX Runtime gives one
  SQNR per tensor (float model vs QDQ model, and QDQ input vs QDQ output), ranked worst first here.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_static import (build_model, child_error, child_record, env_info, make_images, peak_mb,  # noqa: E402
                          run_fresh, save_results, status_mb)

HOSTILE = "relu_3_out"  # outlier_channel_cnn's quantization-hostile tensor


# ------------------------------------------------------------------------------------- the two tools
def batches(data: np.ndarray, batch: int) -> list[dict[str, np.ndarray]]:
    return [{"input": data[i:i + batch]} for i in range(0, len(data), batch)]


def debug_ortq(float_path: str, quant_path: str, data: np.ndarray, batch: int) -> dict[str, Any]:
    """ortq's debugger; returns the matched-tensor counts and the ranking (default sort: injected noise)."""
    import ortq

    report = ortq.debug_models(float_path, quant_path, {"input": data}, batch_size=batch, max_samples=len(data))
    kinds = [row.kind for row in report.tensors]
    return {
        "matched": {"activations": kinds.count("activation"), "weights": kinds.count("weight"),
                    "outputs": kinds.count("output") + kinds.count("float")},
        "unmatched": len(report.unmatched),
        "ranking": {key: [row.tensor for row in report.sorted(key) if row.kind != "weight"]
                    for key in ("injected", "sqnr")},
    }


def debug_ort(float_path: str, quant_path: str, data: np.ndarray, batch: int, workdir: str) -> dict[str, Any]:
    """ONNX Runtime's debugger, its documented sequence of calls with default options."""
    import os

    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, compute_activation_error,
                                                         compute_weight_error, create_activation_matching,
                                                         create_weight_matching,
                                                         modify_model_output_intermediate_tensors)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(batches(data, batch))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    tag = f"{os.getpid()}_{Path(quant_path).stem}"
    faug, qaug = Path(workdir) / f"aug_float_{tag}.onnx", Path(workdir) / f"aug_quant_{tag}.onnx"
    try:
        modify_model_output_intermediate_tensors(float_path, str(faug))
        modify_model_output_intermediate_tensors(quant_path, str(qaug))
        float_acts = collect_activations(str(faug), Reader())
        quant_acts = collect_activations(str(qaug), Reader())
        matching = create_activation_matching(quant_acts, float_acts)
        act_err = compute_activation_error(matching)
        weight_err = compute_weight_error(create_weight_matching(float_path, quant_path))
    finally:
        for path in (faug, qaug):
            path.unlink(missing_ok=True)
    cross = {name: e["xmodel_err"] for name, e in act_err.items() if "xmodel_err" in e}
    return {
        "matched": {"activations": len(cross), "weights": len(weight_err), "outputs": 0,
                    "qdq_pairs": len(act_err)},
        "ranking": {"xmodel_err": sorted(cross, key=lambda n: cross[n]),
                    "qdq_err": sorted(act_err, key=lambda n: act_err[n]["qdq_err"])},
    }


def float_inference(float_path: str, data: np.ndarray, batch: int) -> dict[str, Any]:
    """The yardstick: one float inference over the same batches (default session options)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(float_path, providers=["CPUExecutionProvider"])
    for feed in batches(data, batch):
        sess.run(None, feed)
    return {}


# ------------------------------------------------------------------------- child: one debug run
def child(args: argparse.Namespace) -> None:
    """Fresh interpreter: import, load the data, note the baseline RSS, run the tool once, print JSON."""
    import onnxruntime  # noqa: F401  - imported before the baseline for every tool alike

    if args.max_gb:  # ORT's tool grows ~100 MB per 224x224 sample: fail with MemoryError, not the OOM killer
        import resource

        limit = int(args.max_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    if args.tool == "ortq":
        import ortq  # noqa: F401
    elif args.tool == "ort":
        import onnxruntime.quantization.qdq_loss_debug  # noqa: F401
    data = np.load(args.data)[:args.samples]
    baseline, peak_before = status_mb(), peak_mb()
    t = time.perf_counter()
    if args.tool == "ortq":
        extra = debug_ortq(args.float, args.quant, data, args.batch_size)
    elif args.tool == "ort":
        extra = debug_ort(args.float, args.quant, data, args.batch_size, args.workdir)
    else:
        extra = float_inference(args.float, data, args.batch_size)
    wall = time.perf_counter() - t
    extra.pop("ranking", None)  # the rankings of the big model are not reported; keep the line short
    print(json.dumps({"tool": args.tool, "samples": len(data), "wall_s": wall, "baseline_rss_mb": baseline,
                      "peak_rss_before_mb": peak_before, "peak_rss_mb": peak_mb(), "vmhwm_mb": status_mb("VmHWM"),
                      **extra}))


def run_child(tool: str, float_path: Path, quant_path: Path, data: Path, samples: int, batch: int,
              workdir: Path, max_gb: float = 0.0) -> dict[str, Any]:
    proc = run_fresh(__file__, "_debug", "--tool", tool, "--float", str(float_path), "--quant", str(quant_path),
                     "--data", str(data), "--samples", str(samples), "--batch-size", str(batch),
                     "--workdir", str(workdir), "--max-gb", str(max_gb))
    if proc.returncode != 0:
        return {"tool": tool, "samples": samples, "error": child_error(proc), "stderr_tail": proc.stderr[-2000:]}
    return child_record(proc)


# ------------------------------------------------------------------------------------------ setup
def quantize_both(float_path: Path, calib: np.ndarray, out_ortq: Path, out_ort: Path, batch: int) -> None:
    """ortq with its cpu defaults, ONNX Runtime with the closest settings (QDQ, u8/s8 per-channel, MinMax)."""
    import ortq
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(batches(calib, batch))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    logging.getLogger().setLevel(logging.ERROR)  # ORT's "consider pre-processing" advice, once per model
    ortq.Toolkit(autoload=False).quantize(str(float_path), str(out_ortq), calibration_data={"input": calib},
                                          batch_size=batch, verify=False)
    quantize_static(str(float_path), str(out_ort), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)


def rank_of(ranking: list[str], name: str) -> int | None:
    """1-based position of ``name`` in a worst-first ranking; None when the tool did not compare it."""
    return ranking.index(name) + 1 if name in ranking else None


def hostile_ranking(work: Path, batch: int) -> dict[str, Any]:
    """Both tools on both quantizations of outlier_channel_cnn: where does relu_3_out land?"""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from models import outlier_channel_cnn

    model, calib, evals = outlier_channel_cnn()
    fpath = work / "outlier.onnx"
    onnx.save(model, str(fpath))
    paths = {"ortq": work / "outlier.ortq.onnx", "ort": work / "outlier.ort.onnx"}
    quantize_both(fpath, calib["input"], paths["ortq"], paths["ort"], batch)
    out: dict[str, Any] = {}
    for qname, qpath in paths.items():
        o = debug_ortq(str(fpath), str(qpath), evals["input"], batch)
        r = debug_ort(str(fpath), str(qpath), evals["input"], batch, str(work))
        out[qname] = {
            "ortq": {"matched": o["matched"], "tensors_ranked": len(o["ranking"]["injected"]),
                     "rank_injected": rank_of(o["ranking"]["injected"], HOSTILE),
                     "rank_sqnr": rank_of(o["ranking"]["sqnr"], HOSTILE),
                     "top3_injected": o["ranking"]["injected"][:3]},
            "ort": {"matched": r["matched"], "tensors_ranked": len(r["ranking"]["xmodel_err"]),
                    "rank_xmodel_err": rank_of(r["ranking"]["xmodel_err"], HOSTILE),
                    "rank_qdq_err": rank_of(r["ranking"]["qdq_err"], HOSTILE),
                    "top3_xmodel_err": r["ranking"]["xmodel_err"][:3],
                    "top3_qdq_err": r["ranking"]["qdq_err"][:3]},
        }
    return out


# ------------------------------------------------------------------------------------------ report
MEDIAN_KEYS = ("wall_s", "peak_rss_mb", "baseline_rss_mb", "growth_mb")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    for r in ok:
        r["growth_mb"] = r["peak_rss_mb"] - r["baseline_rss_mb"]
    med = {k: statistics.median(r[k] for r in ok) for k in MEDIAN_KEYS} if ok else None
    return {"runs": runs, "reps": len(ok), "median": med, "matched": ok[-1].get("matched") if ok else None,
            "errors": [r["error"] for r in runs if "error" in r]}


def fmt(value: float | None, spec: str) -> str:
    return "ERR" if value is None else format(value, spec)


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def print_tables(r: dict[str, Any]) -> None:
    cfg = r["config"]
    print(f"\n== ortq debug vs qdq_loss_debug: {cfg['input']}, batches of {cfg['batch_size']}, "
          f"on ortq's QDQ model; medians of {cfg['repeats']} fresh processes ==")
    head = ("samples", "float s", "ortq s", "ORT s", "ortq/ORT", "ortq/fl", "ortq MB", "ORT MB", "ortq/ORT",
            "ortq +MB", "ORT +MB", "reps")
    print("".join(f"{h:>10}" for h in head))
    for n, cell in r["matrix"].items():
        m = {t: (cell[t]["median"] or {}) for t in ("float", "ortq", "ort")}
        wall = {t: m[t].get("wall_s") for t in m}
        peak = {t: m[t].get("peak_rss_mb") for t in m}
        grow = {t: m[t].get("growth_mb") for t in m}
        row = (n, fmt(wall["float"], ".2f"), fmt(wall["ortq"], ".2f"), fmt(wall["ort"], ".2f"),
               ratio(wall["ortq"], wall["ort"]), ratio(wall["ortq"], wall["float"]),
               fmt(peak["ortq"], ".0f"), fmt(peak["ort"], ".0f"), ratio(peak["ortq"], peak["ort"]),
               fmt(grow["ortq"], ".0f"), fmt(grow["ort"], ".0f"),
               f"{cell['ortq']['reps']}/{cell['ort']['reps']}")
        print("".join(f"{c:>10}" for c in row))

    print("\n== tensors compared (activations / weights / outputs) ==")
    for qname, cell in r["matching"].items():
        for tool in ("ortq", "ort"):
            mt = cell[tool]["matched"]
            text = "ERR" if mt is None else f"{mt['activations']} / {mt['weights']} / {mt['outputs']}"
            print(f"  {qname + ' QDQ model':<22}{tool:<6}{text}")

    print(f"\n== ranking on outlier_channel_cnn: position of the hostile tensor {HOSTILE!r} (1 = blamed first) ==")
    for qname, cell in r["ranking"].items():
        o, t = cell["ortq"], cell["ort"]
        print(f"  {qname} QDQ model: ortq injected-noise rank {o['rank_injected']} of {o['tensors_ranked']} "
              f"(accumulated SQNR rank {o['rank_sqnr']}); ORT float-vs-QDQ SQNR rank {t['rank_xmodel_err']} "
              f"of {t['tensors_ranked']}, ORT QDQ in/out SQNR rank {t['rank_qdq_err']}")
        print(f"      ortq top 3: {o['top3_injected']}; ORT top 3 (xmodel): {t['top3_xmodel_err']}")
    for cell in r["matrix"].values():
        for tool in ("float", "ortq", "ort"):
            for err in cell[tool]["errors"]:
                print(f"  ERR {tool}: {err}")


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    res, widths, blocks, classes = (64, [16, 32, 64, 128], 1, 100) if args.small else (224, [64, 128, 256, 512], 2, 1000)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ortq_bench_debug_"))
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(widths, blocks, classes, args.seed, make_images(16, res, args.seed + 3))
    paths = {"float": work / "float.onnx", "ortq": work / "ortq.onnx", "ort": work / "ort.onnx"}
    onnx.save(model, str(paths["float"]))
    log(f"quantizing the {res}x{res} model with both tools")
    quantize_both(paths["float"], make_images(args.calibration_samples, res, args.seed + 1), paths["ortq"],
                  paths["ort"], args.batch_size)
    data = work / "debug.npy"
    np.save(data, make_images(max(args.samples), res, args.seed + 2))

    def one(tool: str, quant: str, n: int) -> dict[str, Any]:
        run = run_child(tool, paths["float"], paths[quant], data, n, args.batch_size, work,
                        args.max_gb if tool == "ort" else 0.0)
        log(f"{tool:<5} on {quant} QDQ, {n:>4} samples: " +
            (run["error"] if "error" in run else f"{run['wall_s']:.2f} s, peak {run['peak_rss_mb']:.0f} MB"))
        return run

    matrix: dict[str, Any] = {}
    for n in args.samples:
        runs: dict[str, list[dict[str, Any]]] = {"float": [], "ortq": [], "ort": []}
        for i in range(args.repeats):  # tools alternate so machine drift hits all alike
            for tool in ("float", "ortq", "ort"):
                if tool == "ort" and n >= args.heavy_samples and i >= args.heavy_repeats:
                    continue  # ORT holds every activation of every sample: one run is enough to see it
                runs[tool].append(one(tool, "ortq", n))
        matrix[str(n)] = {tool: summarize(rs) for tool, rs in runs.items()}
    # ONNX Runtime's tool matches by its own quantizer's names: give it its own QDQ model of the same network.
    n0 = min(args.samples)
    matching = {"ortq": {t: {"matched": matrix[str(n0)][t]["matched"]} for t in ("ortq", "ort")},
                "ORT": {t: {"matched": one(t, "ort", n0).get("matched")} for t in ("ortq", "ort")}}
    log("ranking on outlier_channel_cnn")
    ranking = hostile_ranking(work, args.batch_size)
    return {
        "config": {"input": f"[N,3,{res},{res}]", "widths": widths, "blocks_per_stage": blocks, "classes": classes,
                   "samples": args.samples, "batch_size": args.batch_size, "repeats": args.repeats,
                   "heavy_samples": args.heavy_samples, "heavy_repeats": args.heavy_repeats,
                   "calibration_samples": args.calibration_samples, "seed": args.seed, "workdir": str(work),
                   "small": args.small},
        "env": env_info(),
        "matrix": matrix,
        "matching": matching,
        "ranking": ranking,
    }


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_child_args(argv: list[str]) -> argparse.Namespace:
    c = argparse.ArgumentParser(prog="bench_debug.py _debug")
    c.add_argument("--tool", choices=("ortq", "ort", "float"), required=True)
    for name in ("--float", "--quant", "--data", "--workdir"):
        c.add_argument(name, required=True)
    c.add_argument("--samples", type=int, required=True)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--max-gb", type=float, default=0.0, help="address-space limit of the child (0: none)")
    return c.parse_args(argv)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="64x64 input, narrow widths, 1 block per stage")
    p.add_argument("--samples", type=int, nargs="+", default=[16, 64, 128], help="debug sample counts")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="fresh-process runs per tool and sample count")
    p.add_argument("--heavy-samples", type=int, default=128,
                   help="from this many samples ORT's tool runs only --heavy-repeats times (it keeps everything)")
    p.add_argument("--heavy-repeats", type=int, default=1)
    p.add_argument("--max-gb", type=float, default=16.0,
                   help="address-space limit for ORT's tool, so a shared machine sees a MemoryError, not the OOM "
                        "killer (default 16 GB; 0: none)")
    p.add_argument("--calibration-samples", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="where models and data go, kept (default: a temp dir, deleted at the end)")
    p.add_argument("--results", default=str(HERE / "results"), help="folder for the JSON results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import shutil

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_debug"]:
        return child(parse_child_args(argv[1:]))
    args = parse_args(argv)
    results = benchmark(args)
    if not args.workdir:
        shutil.rmtree(results["config"]["workdir"], ignore_errors=True)
    print_tables(results)
    print(f"\nraw results: {save_results(results, args.results, 'debug', args.small)}")


if __name__ == "__main__":
    main()
