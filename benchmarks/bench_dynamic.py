"""Dynamic quantization of a 2-layer BERT-style encoder (seq 128, hidden 768, 12 heads): ortq vs
onnxruntime.quantization.quantize_dynamic, side by side in one run.

Latency with one intra-op thread (the machine is shared; one thread measures the kernels), median of 30
runs at batch 1; cosine similarity of the outputs against the float model on 4 held-out samples; file
sizes. The encoder layers are the test suite's builder (tests/models.py) at BERT-base widths.
Then an LSTM (input 256, hidden 512, seq 64, batch 1; forward and bidirectional): float vs ortq per tensor
and per channel vs onnxruntime.quantization.quantize_dynamic, and ortq's difference from ONNX Runtime's.
Usage: python benchmarks/bench_dynamic.py
"""
import os, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import numpy as np, onnx, onnxruntime as ort
from onnx import compose
from models import transformer_block
import ortq
from ortq.core.error_measures import cosine_similarity
WORK = tempfile.mkdtemp(prefix='ortq_bench_dynamic_')
from onnxruntime.quantization import quantize_dynamic, QuantType
m1, _, ev = transformer_block(seed=0, seq=128, dim=768, heads=12, ffn=3072, n_calibration=1, n_evaluation=4)
m2, _, _ = transformer_block(seed=1, seq=128, dim=768, heads=12, ffn=3072, n_calibration=1, n_evaluation=1)
m2 = compose.add_prefix(m2, "l2_")
m = compose.merge_models(m1, m2, io_map=[("output", "l2_hidden")])
del m.opset_import[:]; m.opset_import.append(onnx.helper.make_opsetid("", 17)); onnx.save(m, WORK + "/bert2.onnx")
feeds = dict(ev); feeds["l2_attention_mask"] = ev["attention_mask"]
ortq.quantize_dynamic(WORK + "/bert2.onnx", WORK + "/bert2.ortq.onnx", per_channel=False)
quantize_dynamic(WORK + "/bert2.onnx", WORK + "/bert2.ort.onnx", weight_type=QuantType.QInt8)
def sess(p):
    so=ort.SessionOptions(); so.intra_op_num_threads=1; so.inter_op_num_threads=1
    return ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
one = {k: v[:1] for k, v in feeds.items()}
ref = sess(WORK + "/bert2.onnx").run(None, feeds)[0]
for name in ("bert2.onnx", "bert2.ortq.onnx", "bert2.ort.onnx"):
    s = sess(WORK + "/"+name); s.run(None, one); ts=[]
    for _ in range(30):
        t=time.perf_counter(); s.run(None, one); ts.append(time.perf_counter()-t)
    y = s.run(None, feeds)[0]
    print(f"{name:18s} median {np.median(ts)*1e3:7.2f} ms  cosine vs float {cosine_similarity(ref, y):.5f}  size {os.path.getsize(WORK + '/'+name)/1e6:.1f} MB")

import shutil
shutil.rmtree(WORK, ignore_errors=True)

# -- LSTM: DynamicQuantizeLSTM (input 256, hidden 512, seq 64, batch 1), forward and bidirectional ---------------
from onnx import helper, numpy_helper, TensorProto
from ortq.core.error_measures import sqnr_db
WORK = tempfile.mkdtemp(prefix='ortq_bench_dynamic_lstm_')
def lstm_model(direction, features=256, hidden=512, seq=64, seed=0):
    rng = np.random.default_rng(seed); dirs = 2 if direction == "bidirectional" else 1
    inits = [numpy_helper.from_array((rng.standard_normal((dirs, 4 * hidden, n)) / np.sqrt(n)).astype(np.float32), name)
             for name, n in (("W", features), ("R", hidden))]
    inits.append(numpy_helper.from_array((rng.standard_normal((dirs, 8 * hidden)) * 0.1).astype(np.float32), "B"))
    g = helper.make_graph([helper.make_node("LSTM", ["X", "W", "R", "B"], ["Y", "Y_h", "Y_c"], name="lstm", hidden_size=hidden, direction=direction)],
        "lstm", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [seq, "N", features])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [seq, dirs, "N", hidden])], inits)
    feeds = [{"X": rng.standard_normal((seq, 1, features)).astype(np.float32)} for _ in range(4)]
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)], ir_version=8), feeds
for direction in ("forward", "bidirectional"):
    m, feeds = lstm_model(direction)
    base = f"{WORK}/lstm_{direction}"
    onnx.save(m, base + ".onnx")
    ortq.quantize_dynamic(base + ".onnx", base + ".ortq.onnx", per_channel=False)
    ortq.quantize_dynamic(base + ".onnx", base + ".ortq_pc.onnx", per_channel=True)
    quantize_dynamic(base + ".onnx", base + ".ort.onnx", weight_type=QuantType.QInt8)
    refs = [sess(base + ".onnx").run(None, f)[0] for f in feeds]
    outputs = {}
    for suffix in (".onnx", ".ortq.onnx", ".ortq_pc.onnx", ".ort.onnx"):
        s = sess(base + suffix); s.run(None, feeds[0]); ts = []
        for _ in range(30):
            t = time.perf_counter(); s.run(None, feeds[0]); ts.append(time.perf_counter() - t)
        ys = outputs[suffix] = [s.run(None, f)[0] for f in feeds]
        ops = sorted({n.op_type for n in onnx.load(base + suffix).graph.node})
        print(f"lstm {direction:13s} {suffix[1:]:14s} median {np.median(ts)*1e3:6.2f} ms  cosine vs float "
              f"{min(cosine_similarity(r, y) for r, y in zip(refs, ys)):.5f}  SQNR {min(sqnr_db(r, y) for r, y in zip(refs, ys)):5.1f} dB  "
              f"size {os.path.getsize(base + suffix)/1e6:.2f} MB  {ops}")
    diff = max(float(np.abs(a - b).max()) for a, b in zip(outputs[".ortq.onnx"], outputs[".ort.onnx"]))
    print(f"lstm {direction:13s} ortq (per tensor) vs onnxruntime.quantization: max |difference| {diff:.2e}")
shutil.rmtree(WORK, ignore_errors=True)
