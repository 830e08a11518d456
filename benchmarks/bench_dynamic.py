"""Dynamic quantization of a 2-layer BERT-style encoder (seq 128, hidden 768, 12 heads): ortq vs
onnxruntime.quantization.quantize_dynamic, side by side in one run.

Latency with one intra-op thread (the machine is shared; one thread measures the kernels), median of 30
runs at batch 1; cosine similarity of the outputs against the float model on 4 held-out samples; file
sizes. The encoder layers are the test suite's builder (tests/models.py) at BERT-base widths.
Usage: python benchmarks/bench_dynamic.py
"""
import os, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import numpy as np, onnx, onnxruntime as ort
from onnx import compose
from models import transformer_block
import ortq
from ortq.metrics import cosine_similarity
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
