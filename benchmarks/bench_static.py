#!/usr/bin/env python
"""Static quantization benchmark: ortq versus ``onnxruntime.quantization.quantize_static``.

Both tools quantize the same deterministic ResNet-style CNN from the same calibration batches, with the
closest equivalent settings (QDQ, u8 asymmetric activations, s8 symmetric per-channel weights, MinMax).

Why each measurement is taken the way it is:

* **Quantize time and memory: a fresh subprocess per tool, configuration and repeat.** ``ru_maxrss`` is a
  process-lifetime high-water mark, so it only means something in a process that did nothing else; a fresh
  process also stops one tool's warm caches and allocator pools from helping the other. The child reports
  the absolute peak and its RSS just before the quantize call (Python, numpy, onnxruntime and the tool
  imported, calibration data loaded), so ``peak - baseline`` is what quantizing itself cost.
* **Latency: one intra-op thread, ORT_ENABLE_ALL.** One thread measures the kernels, not how many idle
  cores a shared machine has at that moment; ENABLE_ALL is what a deployment uses and where the
  QDQ -> QLinear* fusions (and NCHWc/NHWC layouts) happen. Models are timed interleaved, one run of each per
  round, so slow drift of the machine hits every model alike.
* **Medians everywhere** (of repeats, of timed runs): the machine is shared and noisy, and a median ignores
  the occasional stall that a mean would absorb.
* **Kernels actually used** are read back from ``optimized_model_filepath``: a QDQ model is only faster than
  float where ORT fused DQ -> Conv -> Q into QLinearConv; a float Conv left in the optimized graph is a
  silent slowdown.
* **Accuracy** is measured on an evaluation set disjoint from the calibration set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
INTEGER_OPS = {"QGemm", "MatMulInteger", "MatMulIntegerToFloat", "ConvInteger", "NhwcMaxPool"}
FLOAT_CONVS = {"Conv", "FusedConv"}


# ---------------------------------------------------------------------------------------------- model
class Builder:
    """A tiny onnx.helper graph builder with He-initialised, BN-folded-looking convolutions."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.count = 0

    def const(self, prefix: str, array: np.ndarray) -> str:
        self.count += 1
        name = f"{prefix}_{self.count}"
        self.inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        self.count += 1
        out = out or f"{op.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op}_{self.count}", **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, gain: float = 2.0, scale: float = 1.0) -> str:
        """He init; per-output-channel log-normal gains and non-zero biases imitate a folded BatchNorm."""
        w = self.rng.normal(0.0, np.sqrt(gain / (cin * k * k)), (cout, cin, k, k))
        w *= np.exp(self.rng.normal(0.0, 0.3, (cout, 1, 1, 1)) - 0.09) * scale  # E[g^2] = 1
        b = self.rng.normal(0.0, 0.1, cout)
        return self.node("Conv", [x, self.const("w", w), self.const("b", b)],
                         kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4)

    def block(self, x: str, cin: int, cout: int, stride: int) -> str:
        """Basic block; the second conv is scaled by 0.5 so the residual sum grows slowly, not 2x per block."""
        y = self.conv(self.node("Relu", [self.conv(x, cin, cout, 3, stride)]), cout, cout, 3, scale=0.5)
        short = x if stride == 1 and cin == cout else self.conv(x, cin, cout, 1, stride, gain=1.0)
        return self.node("Relu", [self.node("Add", [y, short])])

    def model(self, output: str, width: int, res: int) -> onnx.ModelProto:
        inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, res, res])
        out = helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", width])
        graph = helper.make_graph(list(self.nodes), "resnet_bench", [inp], [out], list(self.inits))
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        onnx.checker.check_model(model)
        return model


def build_model(widths: list[int], blocks: int, classes: int, seed: int, probe: np.ndarray) -> onnx.ModelProto:
    """ResNet-18-like net; the classifier is centred on ``probe`` features so the top-1 class differs per image."""
    b = Builder(seed)
    x = b.node("Relu", [b.conv("input", 3, widths[0], 7, stride=2)])
    x = b.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = widths[0]
    for stage, cout in enumerate(widths):
        for i in range(blocks):
            x = b.block(x, cin, cout, 2 if stage > 0 and i == 0 else 1)
            cin = cout
    feats = b.node("Flatten", [b.node("GlobalAveragePool", [x])])
    f = run_model(b.model(feats, cin, probe.shape[-1]).SerializeToString(), probe)
    w = b.rng.normal(0.0, 3.0 / np.sqrt(cin * np.mean(f.var(0))), (classes, cin))  # logits: mean 0, std ~3
    b.node("Gemm", [feats, b.const("fc_w", w), b.const("fc_b", -w @ f.mean(0))], out="logits", transB=1)
    return b.model("logits", classes, probe.shape[-1])


def make_images(n: int, res: int, seed: int) -> np.ndarray:
    """Smoothed noise (blobs at 1/8 resolution, box-blurred) + fine texture + per-image colour cast,
    normalised to zero mean / unit variance like ImageNet-normalised inputs."""
    rng = np.random.default_rng(seed)
    f = 8
    low = rng.normal(size=(n, 3, -(-res // f), -(-res // f))).astype(np.float32)
    img = low.repeat(f, 2).repeat(f, 3)[:, :, :res, :res]
    for axis in (2, 3):
        img = sum(np.roll(img, s, axis) for s in range(-f // 2, f // 2 + 1)) / (f + 1)
    img = img + 0.25 * rng.normal(size=img.shape) + rng.normal(0.0, 0.5, (n, 3, 1, 1))
    return ((img - img.mean()) / img.std()).astype(np.float32)


# ------------------------------------------------------------------------------------ onnxruntime utils
def session(model: str | bytes, threads: int = 0, optimized: str | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized:
        so.optimized_model_filepath = optimized
        so.log_severity_level = 3  # silence the "NCHWc model is hardware specific" warning
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def run_model(model: str | bytes, data: np.ndarray, batch: int = 8) -> np.ndarray:
    sess = session(model)
    return np.concatenate([sess.run(None, {"input": data[i:i + batch]})[0] for i in range(0, len(data), batch)])


def latency_ms(paths: dict[str, str], x: np.ndarray, runs: int, warmup: int) -> dict[str, float]:
    """Median ms per run with 1 intra-op thread; models interleaved so machine drift hits all alike."""
    sessions = {name: session(p, threads=1) for name, p in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for r in range(warmup + runs):
        for name, sess in sessions.items():
            t = time.perf_counter()
            sess.run(None, {"input": x})
            if r >= warmup:
                times[name].append((time.perf_counter() - t) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def optimized_ops(path: str, workdir: Path) -> dict[str, Any]:
    """Op types ORT actually runs after ENABLE_ALL optimization (read back from optimized_model_filepath)."""
    out = workdir / (Path(path).stem + ".opt.onnx")
    session(path, threads=1, optimized=str(out))
    ops = Counter(n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node)
    return {
        "QLinearConv": ops["QLinearConv"],
        "integer_ops": sum(c for op, c in ops.items() if op.startswith("QLinear") or op in INTEGER_OPS),
        "float_Conv": sum(ops[op] for op in FLOAT_CONVS),
        "Q/DQ": ops["QuantizeLinear"] + ops["DequantizeLinear"],
        "all": dict(sorted(ops.items())),
    }


# ------------------------------------------------------------------------- child: one quantize run
def status_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":")) / 1024


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def quantize_ortq(model: str, out: str, data: np.ndarray, batch: int) -> Callable[[], dict[str, Any]]:
    import ortq

    def go() -> dict[str, Any]:
        res = ortq.Toolkit(autoload=False).quantize(model, out, calibration_data={"input": data}, batch_size=batch)
        return {"stages_s": res.seconds, "calibration_samples": res.calibration_samples, "summary": res.summary()}
    return go


def quantize_ort(model: str, out: str, data: np.ndarray, batch: int) -> Callable[[], dict[str, Any]]:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"input": data[i:i + batch]} for i in range(0, len(data), batch)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    def go() -> dict[str, Any]:
        quantize_static(model, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        return {}
    return go


def child(args: argparse.Namespace) -> None:
    """Runs in a fresh interpreter: import, load data, note the baseline RSS, quantize once, print JSON."""
    import onnxruntime  # noqa: F401  - imported before the baseline for both tools alike

    data = np.load(args.data)
    go = (quantize_ortq if args.tool == "ortq" else quantize_ort)(args.model, args.out, data, args.batch_size)
    baseline, peak_before = status_mb(), peak_mb()
    t = time.perf_counter()
    extra = go()
    wall = time.perf_counter() - t
    print(json.dumps({"tool": args.tool, "wall_s": wall, "baseline_rss_mb": baseline,
                      "peak_rss_before_mb": peak_before, "peak_rss_mb": peak_mb(), "vmhwm_mb": status_mb("VmHWM"),
                      **extra}))


# ------------------------------------------------------ shared by every benchmark's fresh-process runs
def run_fresh(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``python script args...`` in a fresh process started from a small /bin/sh, not straight from this
    (large) process: Linux carries the RSS high-water mark of the forked copy of the parent across execve
    into ru_maxrss, which would otherwise put a floor of this process's RSS under the child's peak. ("; exit"
    stops sh from exec'ing in place.) The child prints its JSON record as its last stdout line."""
    cmd = ["/bin/sh", "-c", '"$0" "$@"; exit $?', sys.executable, script, *args]
    return subprocess.run(cmd, capture_output=True, text=True)


def child_record(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    """The JSON record a successful child printed last."""
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_error(proc: subprocess.CompletedProcess) -> str:
    """One line saying why a child failed: its exit status (or the signal that killed it, 137 being the OOM
    killer's SIGKILL) and the last line it wrote to stderr."""
    code = proc.returncode
    status = f"killed by signal {code - 128 if code > 128 else -code}" if code > 128 or code < 0 else f"exit {code}"
    last = next((line for line in reversed(proc.stderr.strip().splitlines()) if line.strip()), "")
    return f"{status}: {last}" if last else status


def save_results(results: dict[str, Any], folder: str | Path, kind: str, small: bool) -> Path:
    """Write the raw results as ``<folder>/<kind>_<timestamp>[_small].json`` (benchmarks/results is git-ignored)."""
    out = Path(folder) / f"{kind}_{time.strftime('%Y%m%d-%H%M%S')}{'_small' if small else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    return out


def run_child(tool: str, model: Path, data: Path, out: Path, batch: int) -> dict[str, Any]:
    proc = run_fresh(__file__, "_quantize", "--tool", tool, "--model", str(model), "--data", str(data),
                     "--out", str(out), "--batch-size", str(batch))
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} quantization failed ({child_error(proc)}):\n{proc.stderr[-4000:]}")
    return child_record(proc)


# ------------------------------------------------------------------------------------------ report
def accuracy(ref: np.ndarray, out: np.ndarray) -> dict[str, float | None]:
    from ortq.core.error_measures import cosine_similarity, sqnr_db, top1_agreement

    return {"sqnr_db": sqnr_db(ref, out), "top1": top1_agreement(ref, out), "cosine": cosine_similarity(ref, out)}


def print_table(r: dict[str, Any]) -> None:
    q, acc, size, ops = r["quantize"], r["accuracy"], r["size_bytes"], r["ops"]

    def row(label: str, vals: list[float | None], fmt: str, ratio: bool = True) -> None:
        cells = ["-" if v is None else format(v, fmt) for v in vals]
        rat = f"{vals[1] / vals[2]:.2f}x" if ratio and vals[1] is not None and vals[2] else ""
        print(f"{label:<30}{cells[0]:>12}{cells[1]:>12}{cells[2]:>12}{rat:>12}")

    print(f"\n== {r['config']['label']}: {r['config']['input']}, {r['config']['samples']} calibration / "
          f"{r['config']['eval_samples']} eval samples, {r['config']['repeats']} repeats ==")
    print(f"{'metric':<30}{'float':>12}{'ortq':>12}{'ORT':>12}{'ortq/ORT':>12}")
    for key, label, fmt in (("wall_s", "quantize wall time (s)", ".2f"),
                            ("wall_no_verify_s", "  excl. ortq verify (s)", ".2f"),
                            ("peak_rss_mb", "quantize peak RSS (MB)", ".0f"),
                            ("baseline_rss_mb", "  baseline RSS before (MB)", ".0f"),
                            ("growth_mb", "  peak - baseline (MB)", ".0f")):
        row(label, [None, q["ortq"]["median"][key], q["ort"]["median"][key]], fmt)
    for bs, lat in r["latency_ms"].items():
        row(f"latency bs{bs}, 1 thread (ms)", [lat["float"], lat["ortq"], lat["ort"]], ".2f")
        row(f"  speedup vs float bs{bs}", [1.0, lat["float"] / lat["ortq"], lat["float"] / lat["ort"]], ".2f")
    row("output SQNR vs float (dB)", [None, acc["ortq"]["sqnr_db"], acc["ort"]["sqnr_db"]], ".2f")
    row("top-1 agreement", [None, acc["ortq"]["top1"], acc["ort"]["top1"]], ".3f")
    row("cosine similarity", [None, acc["ortq"]["cosine"], acc["ort"]["cosine"]], ".5f", ratio=False)
    row("model size (MB)", [size[m] / 1e6 for m in ("float", "ortq", "ort")], ".3f")
    for key in ("QLinearConv", "integer_ops", "float_Conv", "Q/DQ"):
        row(f"optimized graph: {key}", [ops[m][key] for m in ("float", "ortq", "ort")], "d", ratio=False)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    for run in runs:
        run["growth_mb"] = run["peak_rss_mb"] - run["baseline_rss_mb"]
        run["wall_no_verify_s"] = run["wall_s"] - run.get("stages_s", {}).get("verify", 0.0)
    keys = ("wall_s", "wall_no_verify_s", "peak_rss_mb", "baseline_rss_mb", "growth_mb", "vmhwm_mb")
    return {"runs": runs, "median": {k: statistics.median(run[k] for run in runs) for k in keys}}


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    res, widths, blocks, classes = (64, [16, 32, 64, 128], 1, 100) if args.small else (224, [64, 128, 256, 512], 2, 1000)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ortq_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    calib, evals = make_images(args.samples, res, args.seed + 1), make_images(args.eval_samples, res, args.seed + 2)
    model = build_model(widths, blocks, classes, args.seed, make_images(16, res, args.seed + 3))
    paths = {"float": work / "float.onnx", "ortq": work / "ortq.onnx", "ort": work / "ort.onnx"}
    onnx.save(model, str(paths["float"]))
    np.save(work / "calib.npy", calib)
    runs: dict[str, list[dict[str, Any]]] = {"ortq": [], "ort": []}
    for i in range(args.repeats):  # alternate tools so noise spreads over both
        for tool in ("ortq", "ort"):
            runs[tool].append(run_child(tool, paths["float"], work / "calib.npy", paths[tool], args.batch_size))
            print(f"repeat {i + 1}/{args.repeats} {tool}: {runs[tool][-1]['wall_s']:.2f} s", file=sys.stderr)
    str_paths = {k: str(p) for k, p in paths.items()}
    ref = run_model(str_paths["float"], evals)
    return {
        "config": {"label": "small" if args.small else "default", "input": f"[N,3,{res},{res}]", "widths": widths,
                   "blocks_per_stage": blocks, "classes": classes, "samples": args.samples, "batch_size": args.batch_size,
                   "eval_samples": args.eval_samples, "repeats": args.repeats, "runs": args.runs, "seed": args.seed,
                   "workdir": str(work)},
        "env": env_info(),
        "ortq_summary": runs["ortq"][-1].get("summary"),
        "quantize": {tool: summarize(r) for tool, r in runs.items()},
        "latency_ms": {str(bs): latency_ms(str_paths, evals[:bs], args.runs, args.warmup) for bs in args.latency_batches},
        "ops": {k: optimized_ops(p, work) for k, p in str_paths.items()},
        "accuracy": {k: accuracy(ref, run_model(str_paths[k], evals)) for k in ("ortq", "ort")},
        "size_bytes": {k: p.stat().st_size for k, p in paths.items()},
    }


def env_info() -> dict[str, Any]:
    import onnxruntime
    import ortq

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"python": platform.python_version(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "ortq": ortq.__version__, "cpu": cpu, "cores": os.cpu_count()}


def parse_child_args(argv: list[str]) -> argparse.Namespace:
    """The hidden ``_quantize`` sub-command: one quantize run in a fresh process."""
    c = argparse.ArgumentParser(prog="bench_static.py _quantize")
    c.add_argument("--tool", choices=("ortq", "ort"), required=True)
    for name in ("--model", "--data", "--out"):
        c.add_argument(name, required=True)
    c.add_argument("--batch-size", type=int, default=8)
    return c.parse_args(argv)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="64x64 input, narrow widths, 1 block per stage")
    p.add_argument("--samples", type=int, default=32, help="calibration samples (default 32)")
    p.add_argument("--eval-samples", type=int, default=64, help="evaluation samples (default 64)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="fresh-process quantize runs per tool (default 3)")
    p.add_argument("--runs", type=int, default=30, help="timed inference runs per model (default 30)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--latency-batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="where models and data go, kept (default: a temp dir, deleted at the end)")
    p.add_argument("--results", default=str(HERE / "results"), help="folder for the JSON results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_quantize"]:
        return child(parse_child_args(argv[1:]))
    args = parse_args(argv)
    results = benchmark(args)
    if not args.workdir:
        shutil.rmtree(results["config"]["workdir"], ignore_errors=True)
    print("\nortq summary (last repeat):\n" + (results["ortq_summary"] or ""))
    print_table(results)
    print(f"\nraw results: {save_results(results, args.results, 'static', args.small)}")


if __name__ == "__main__":
    main()
