"""Peak memory of quantizing a large model stored with external data, relative to its weight size.

Builds an MLP of 4096x4096 Gemm layers (5 layers: 336 MB of float32 weights) saved with external data,
then quantizes it with ortq in a fresh process per configuration (with and without verification) and
reports peak RSS (ru_maxrss) over the weight size, and where the high-water mark was reached: the
high-water mark after each pipeline stage (``--stages``). Each child is started fresh because ru_maxrss is
a process-lifetime high-water mark, and the model is built in its own process so the child does not
inherit the builder's peak.

    python benchmarks/bench_memory_external.py                # 5 layers
    python benchmarks/bench_memory_external.py --layers 1 --stages
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r'''
import json, resource, sys, time
import ortq, ortq.pipeline.run as pipeline
marks = []

def high_water():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

def staged(name, fn):
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            marks.append((name, high_water()))
    return run

for name in ("read_model", "infer_shapes", "run_calibration", "compute_params", "rewrite_qdq", "verify_model"):
    setattr(pipeline, name, staged(name, getattr(pipeline, name)))
base = high_water()
t = time.time()
r = ortq.Toolkit(autoload=False).quantize(sys.argv[1], sys.argv[2], calibration_data=sys.argv[3], verify=sys.argv[4] == "1")
marks.append(("save", high_water()))
print(json.dumps({"base": base, "peak": high_water(), "s": time.time() - t, "sqnr": r.verification.min_sqnr_db,
                  "marks": marks}))
'''


def build(folder: Path, layers: int, width: int) -> int:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, prev = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width), dtype=np.float32) / np.sqrt(width)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"g{i}"], transB=1))
        nodes.append(helper.make_node("Relu", [f"g{i}"], [f"r{i}"]))
        prev = f"r{i}"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    weights = sum(t.ByteSize() for t in model.graph.initializer)
    onnx.save(model, folder / "big.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="big.data", size_threshold=0)
    np.savez(folder / "calib.npz", x=rng.standard_normal((64, width)).astype(np.float32))
    return weights


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--stages", action="store_true", help="print the high-water mark after each stage")
    parser.add_argument("--build", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build is not None:
        print(build(args.build, args.layers, args.width))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # Built in its own process (a child inherits its parent's ru_maxrss across fork/exec), inside the
        # temporary folder: onnx refuses to save if a file named like the data file exists in the cwd.
        built = subprocess.run([sys.executable, __file__, "--build", str(folder), "--layers", str(args.layers),
                                "--width", str(args.width)], check=True, capture_output=True, text=True, cwd=folder)
        weights = int(built.stdout)
        for verify in ("1", "0"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(folder / "big.onnx"), str(folder / "q.onnx"),
                                  str(folder / "calib.npz"), verify], capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-3000:])
                return 1
            r = json.loads(out.stdout.strip().splitlines()[-1])
            peak, base = r["peak"], r["base"]
            print(f"verify={verify} weights {weights / 1e6:.0f} MB  peak RSS {peak / 1e6:.0f} MB (ratio "
                  f"{peak / weights:.2f}x)  growth over import {(peak - base) / 1e6:.0f} MB (ratio "
                  f"{(peak - base) / weights:.2f}x)  {r['s']:.1f}s sqnr {r['sqnr']}")
            if args.stages:
                print("  high-water mark after: " + ", ".join(f"{name} {mark / 1e6:.0f} MB" for name, mark in r["marks"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
