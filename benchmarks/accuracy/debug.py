"""Where does a quantized model of the benchmark lose accuracy? ``ortq.debug_models`` on one (case, config).

    python benchmarks/accuracy/debug.py mobilenetv2 ortq-default [--top 15] [--sort injected] [--samples 32]

Compares every quantized tensor of ``<cache>/quantized/<case>.<config>.onnx`` (written by run.py) with its
float counterpart on the first evaluation samples of the case, and prints the worst tensors (default: by
the noise each tensor's own quantizer injects, so the cause ranks before its effects downstream).
Works for the models of any tool (ortq, ORT, NNCF), since all are QDQ.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case")
    ap.add_argument("config")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--sort", default="injected", help="injected, sqnr, channel-sqnr, cosine, max-error, order")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--workdir", type=Path)
    a = ap.parse_args()
    import ortq

    case = harness.prepare_case(a.case)
    qpath = (a.workdir or harness.cache_dir() / "quantized") / f"{a.case}.{a.config}.onnx"
    report = ortq.debug_models(str(case.model_path), str(qpath), case.evaluation[: a.samples])
    print(report.table(top=a.top, sort=a.sort))
    worst = report.sorted(a.sort)[: a.top]
    print("\nop types among the worst:", dict(Counter(r.op_type for r in worst)))
    print("kinds among the worst:", dict(Counter(r.kind for r in worst)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
