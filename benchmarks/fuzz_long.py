"""The fuzz properties of ``tests/test_fuzz.py`` with 500 examples each (too slow for CI; run before a release).

    python benchmarks/fuzz_long.py                 # static then dynamic, 500 derandomized examples each
    python benchmarks/fuzz_long.py --mode dynamic  # only Toolkit.quantize_dynamic (also: qoperator; all = the three)
    python benchmarks/fuzz_long.py --survey        # run all examples, list every failing case, don't shrink
    python benchmarks/fuzz_long.py -n 2000 --seed 3

Prints, per mode, a tally of outcomes (quantized / clean OrtqError by message / skipped), the lowest output
SQNR among quantized cases, and the wall time.
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import UnsatisfiedAssumption

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_fuzz import cases, check_case, check_dynamic_case, dynamic_options  # noqa: E402

#: mode -> (the property, the strategy of its extra arguments)
MODES = {
    "static": (lambda case, options, sqnrs: check_case(case, sqnrs), st.just(None)),
    "dynamic": (check_dynamic_case, dynamic_options),
    "qoperator": (lambda case, options, sqnrs: check_case(case, sqnrs, quant_format="qoperator"), st.just(None)),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--examples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: derandomized)")
    parser.add_argument("--survey", action="store_true", help="record failures and go on instead of shrinking")
    parser.add_argument("--save", type=Path, default=None, help="save failing models and data here")
    parser.add_argument("--mode", choices=["static", "dynamic", "qoperator", "both", "all"], default="both")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    status = 0
    modes = {"both": ["static", "dynamic"], "all": ["static", "dynamic", "qoperator"]}.get(args.mode, [args.mode])
    for mode in modes:
        status |= run_mode(mode, args)
    return status


def run_mode(mode: str, args: argparse.Namespace) -> int:
    check, extra = MODES[mode]

    tally: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    sqnrs: list[float] = []
    last: list = []  # the case being checked: after shrinking, the minimal failing one

    def save(case, exc: BaseException) -> None:  # noqa: ANN001
        if args.save is not None:
            args.save.mkdir(parents=True, exist_ok=True)
            stem = args.save / f"{mode}_failure_{len(failures)}"
            onnx.save(case.model, f"{stem}.onnx")
            np.savez(f"{stem}.npz", **case.data)
            Path(f"{stem}.txt").write_text(f"{type(exc).__name__}: {exc}\n{case!r}\n")

    @settings(
        max_examples=args.examples, deadline=None, derandomize=args.seed is None, database=None, print_blob=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(cases(), extra)
    def prop(case, options) -> None:  # noqa: ANN001
        last[:] = [case]
        try:
            outcome = check(case, options, sqnrs)
        except UnsatisfiedAssumption:
            tally["skipped by assume (constant output, saturated Sigmoid/Softmax, Clip/Relu/Split/Slice keeping a sliver, one tensor rounded alone already below the floor)"] += 1
            raise
        except AssertionError as exc:
            if not args.survey:
                raise
            failures.append(str(exc))
            outcome = "FAILED"
            save(case, exc)
        except Exception as exc:  # noqa: BLE001 - anything else is a failure of the property
            if not args.survey:
                raise
            failures.append(f"{type(exc).__name__}: {exc}\n{case!r}; {options}")
            save(case, exc)
            outcome = f"FAILED ({type(exc).__name__})"
        tally[outcome[:140]] += 1

    if args.seed is not None:
        prop = seed(args.seed)(prop)
    t0 = time.perf_counter()
    status = 0
    try:
        prop()
    except Exception as exc:  # noqa: BLE001
        print(f"property failed: {exc}", file=sys.stderr)
        status = 1
        if args.save is not None and last:
            save(last[-1], exc)
    elapsed = time.perf_counter() - t0
    print(f"[{mode}] {sum(tally.values())} generated case(s) checked in {elapsed:.1f} s")
    for outcome, count in tally.most_common():
        print(f"  {count:5d}  {outcome}")
    if sqnrs:
        low = sorted(sqnrs)
        print(f"  output SQNR of quantized cases: min {low[0]:.1f} dB, 5th percentile "
              f"{low[len(low) // 20]:.1f} dB, median {low[len(low) // 2]:.1f} dB ({len(low)} outputs)")
    for i, f in enumerate(failures):
        print(f"--- failure {i + 1}\n{f}")
    return 1 if failures or status else 0


if __name__ == "__main__":
    sys.exit(main())
