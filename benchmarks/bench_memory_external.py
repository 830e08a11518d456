"""Peak memory of quantizing a large model stored with external data, relative to its weight size.

Builds an MLP of 4096x4096 Gemm layers (5 layers: 336 MB of float32 weights) saved with external data,
then quantizes it with ortq in a fresh process per configuration (with and without verification) and
reports peak RSS (ru_maxrss) over the weight size. Each child is started fresh because ru_maxrss is a
process-lifetime high-water mark, and the model is built in its own process so the child does not inherit
the builder's peak. Usage: ``python benchmarks/bench_memory_external.py [layers]``.
"""
import json, os, resource, subprocess, sys, tempfile
from pathlib import Path

CHILD = r'''
import json, resource, sys, time
import numpy as np, ortq
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.time()
r = ortq.Toolkit(autoload=False).quantize(sys.argv[1], sys.argv[2], calibration_data=sys.argv[3], verify=sys.argv[4] == "1")
print(json.dumps({"base_kb": rss0, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "s": time.time() - t,
                  "sqnr": r.verification.min_sqnr_db}))
'''

def build(folder: Path, layers: int, width: int) -> int:
    import numpy as np, onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits, nodes, prev = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array((rng.standard_normal((width, width), dtype=np.float32) / np.sqrt(width)).astype(np.float32), f"w{i}"))
        inits.append(numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}"))
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"g{i}"], transB=1))
        nodes.append(helper.make_node("Relu", [f"g{i}"], [f"r{i}"])); prev = f"r{i}"
    nodes[-1].output[0] = "y"
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]); m.ir_version = 7
    weights = sum(t.ByteSize() for t in m.graph.initializer)
    onnx.save(m, folder / "big.onnx", save_as_external_data=True, all_tensors_to_one_file=True, location="big.data", size_threshold=0)
    np.savez(folder / "calib.npz", x=rng.standard_normal((64, width)).astype(np.float32))
    return weights

if sys.argv[1] == "--build":
    print(build(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))); sys.exit(0)
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    layers, width = int(sys.argv[1]) if len(sys.argv) > 1 else 5, 4096
    # built in its own process: a child inherits its parent's ru_maxrss high-water mark across fork/exec
    weights = int(subprocess.run([sys.executable, __file__, "--build", str(tmp), str(layers), str(width)],
                                 check=True, capture_output=True, text=True).stdout)
    for verify in ("1", "0"):
        out = subprocess.run([sys.executable, "-c", CHILD, str(tmp / "big.onnx"), str(tmp / "q.onnx"), str(tmp / "calib.npz"), verify],
                             capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:]); sys.exit(1)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        peak, base = r["peak_kb"] * 1024, r["base_kb"] * 1024
        print(f"verify={verify} weights {weights/1e6:.0f} MB  peak RSS {peak/1e6:.0f} MB (ratio {peak/weights:.2f}x)  "
              f"growth over import {(peak-base)/1e6:.0f} MB (ratio {(peak-base)/weights:.2f}x)  {r['s']:.1f}s sqnr {r['sqnr']}")
