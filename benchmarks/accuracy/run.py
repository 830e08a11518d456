"""Real-model accuracy benchmark: ortq vs ONNX Runtime's quantize_static vs NNCF, side by side.

    python benchmarks/accuracy/run.py                      # every case, every config
    python benchmarks/accuracy/run.py --small              # 40 evaluation samples, 5 configs, 10 timing runs
    python benchmarks/accuracy/run.py --cases mobilenetv2 --configs ortq-default,ort-minmax
    python benchmarks/accuracy/run.py --report             # only re-tabulate the JSON already written

Each (case, config) runs in a fresh process; see harness.py. JSON records and the markdown table go to
benchmarks/results/accuracy/ (git-ignored). Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "–"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.{digits}f}"


def _headline(rec: dict) -> tuple[str, float] | None:
    m = rec.get("metrics")
    if not m:
        return None
    k = next(iter(m))
    return k, m[k]


def _best(recs: dict[str, dict], tool: str) -> tuple[str, dict] | None:
    """The tool's config with the best headline metric, among its own settings: "+excl" configs (a node list the
    case hands over) are not a setting of the tool, so they are shown in the full table but never picked."""
    cands = [(c, r) for c, r in recs.items() if r.get("tool") == tool and r.get("metrics") and "+excl" not in c]
    if not cands:
        return None
    sign = 1 if next(iter(recs.values())).get("higher_is_better", True) else -1
    return max(cands, key=lambda cr: (sign * _headline(cr[1])[1], cr[0] == f"{tool}-default"))


def tables(records: list[dict]) -> str:
    by_case: dict[str, dict[str, dict]] = {}
    for r in records:
        by_case.setdefault(r["case"], {})[r["config"]] = r
    lines = []
    # 1. summary: headline metric per tool
    lines += ["### Headline metric (first metric of the case; agreement metrics compare with the float model)", "",
              "| model | metric | float | ortq default (as shipped) | ortq default, verify=False | ortq best "
              "| ORT minmax | ORT percentile | ORT entropy | ORT best | NNCF default | NNCF best |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for case, recs in by_case.items():
        fl = recs.get("float", {})
        anyrec = next((r for r in recs.values() if r.get("metrics")), {})
        hk = _headline(anyrec)[0] if anyrec else "?"

        def cell(cfg: str) -> str:
            r = recs.get(cfg)
            if r is None:
                return "–"
            if r.get("error"):
                return "error" if "not installed" not in r["error"] else "n/a"
            return _fmt(r["metrics"].get(hk))

        best_o = _best(recs, "ortq")
        best_n = _best(recs, "nncf")
        best_r = _best(recs, "ort")
        br = f"{_fmt(best_r[1]['metrics'][hk])} ({best_r[0].removeprefix('ort-')})" if best_r else "–"
        bo = f"{_fmt(best_o[1]['metrics'][hk])} ({best_o[0].removeprefix('ortq-')})" if best_o else "–"
        bn = f"{_fmt(best_n[1]['metrics'][hk])} ({best_n[0].removeprefix('nncf-')})" if best_n else "n/a"
        flv = _fmt(fl["metrics"].get(hk)) if fl.get("metrics") else "–"
        lines.append(f"| {case} | {hk} | {flv} | {cell('ortq-default+verify')} | {cell('ortq-default')} | {bo} "
                     f"| {cell('ort-minmax')} | "
                     f"{cell('ort-percentile')} | {cell('ort-entropy')} | {br} | {cell('nncf-default')} | {bn} |")
    # 2. costs: latency against ONNX Runtime's int8 model and the float model; quantize time and memory
    lines += ["", "### Cost (1-thread latency, median; quantize: wall time of the call in a fresh process; "
              "peak: Δ RSS over the process before the call)", "",
              "| model | latency ms: float / ortq default (as shipped) / ortq default, verify=False / ortq best "
              "/ ORT minmax / NNCF default | ortq default (as shipped / verify=False) vs ORT int8 "
              "| quantize s: ortq default (as shipped) / ortq default, verify=False / ortq best / ORT minmax "
              "/ ORT percentile / NNCF default | peak Δ MB: ortq default (as shipped) / ortq default, verify=False "
              "/ ORT minmax / ORT percentile / NNCF default |",
              "|---|---|---|---|---|"]
    for case, recs in by_case.items():
        best_o = _best(recs, "ortq")
        bo = best_o[0] if best_o else None

        def val(cfg: str | None, key: str) -> float | None:
            r = recs.get(cfg) if cfg else None
            if not r or r.get("error"):
                return None
            if key == "peak_delta":
                return r["peak_rss_mb"] - r["rss_before_mb"] if r.get("peak_rss_mb") is not None else None
            return r.get(key)

        def row(cfgs: list[str | None], key: str, digits: int = 2) -> str:
            return " / ".join(_fmt(val(c, key), digits) for c in cfgs)

        theirs = val("ort-minmax", "latency_ms_median")
        ratio = " / ".join(f"{mine / theirs:.2f}x" if mine and theirs else "–" for mine in
                           (val("ortq-default+verify", "latency_ms_median"), val("ortq-default", "latency_ms_median")))
        shipped = ["ortq-default+verify", "ortq-default"]
        lines.append(
            f"| {case} | {row(['float', *shipped, bo, 'ort-minmax', 'nncf-default'], 'latency_ms_median')} "
            f"| {ratio} | {row([*shipped, bo, 'ort-minmax', 'ort-percentile', 'nncf-default'], 'quantize_s', 1)} "
            f"| {row([*shipped, 'ort-minmax', 'ort-percentile', 'nncf-default'], 'peak_delta', 0)} |")
    # 3. every config, every metric
    lines += ["", "### Every config (metrics, quantize time and peak RSS in a fresh process, 1-thread latency)", ""]
    for case, recs in by_case.items():
        anyrec = next((r for r in recs.values() if r.get("metrics")), {})
        keys = list(anyrec.get("metrics", {}))
        lines += [f"**{case}** — {anyrec.get('kind', '')}; {anyrec.get('calibration_samples', '?')} calibration / "
                  f"{anyrec.get('evaluation_samples', '?')} evaluation samples", "",
                  "| config | " + " | ".join(keys) + " | quantize s | peak RSS MB (Δ) | latency ms (1 thr, median) | MB |",
                  "|---|" + "---|" * (len(keys) + 4)]
        for cfg, r in recs.items():
            if r.get("error"):
                msg = r["error"].strip().splitlines()[-1][:120].replace("|", "/")
                lines.append(f"| {cfg} | " + " | ".join("–" for _ in keys) + f" | error: {msg} | | | |")
                continue
            ms = " | ".join(_fmt(r["metrics"].get(k)) for k in keys)
            if cfg == "float":
                qs, mem = "–", "–"
            else:
                qs = f"{r['quantize_s']:.1f}"
                mem = f"{r['peak_rss_mb']:.0f} ({r['peak_rss_mb'] - r['rss_before_mb']:+.0f})"
            lines.append(f"| {cfg} | {ms} | {qs} | {mem} | {r['latency_ms_median']:.2f} | {r['model_mb']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def _order(records: list[dict], cases: list[str], configs: list[str]) -> list[dict]:
    pos = {(c, k): i for i, (c, k) in enumerate((c, k) for c in cases for k in ["float"] + configs)}
    return sorted(records, key=lambda r: pos.get((r["case"], r["config"]), 10**9))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        return _worker_main(argv[1:])
    if argv and argv[0] == "_latency":
        return _latency_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", help="comma-separated case names (default: all in cases/)")
    ap.add_argument("--configs", help=f"comma-separated configs (default: all): {','.join(harness.CONFIGS)}")
    ap.add_argument("--small", action="store_true", help="40 evaluation samples, fewer configs, 10 timing runs")
    ap.add_argument("--runs", type=int, help="timed inference runs per model (default 30, --small 10)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    ap.add_argument("--workdir", type=Path, help="where quantized models go (default: <cache>/quantized)")
    ap.add_argument("--report", action="store_true", help="only tabulate the JSON records already written")
    ap.add_argument("--latency-only", action="store_true",
                    help="re-measure only the interleaved latency of the models already quantized, then tabulate")
    ap.add_argument("--no-latency", action="store_true",
                    help="skip the final interleaved latency pass (keep each worker's own timing)")
    args = ap.parse_args(argv)
    cases = args.cases.split(",") if args.cases else harness.case_names()
    configs = (args.configs.split(",") if args.configs
               else (harness.SMALL_CONFIGS if args.small else list(harness.CONFIGS)))
    unknown = [c for c in configs if c not in harness.CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; known: {list(harness.CONFIGS)}")
    runs = args.runs or (10 if args.small else 30)
    workdir = args.workdir or harness.cache_dir() / "quantized"
    workdir.mkdir(parents=True, exist_ok=True)
    suffix = "__small" if args.small else ""
    records: list[dict] = []
    if args.report or args.latency_only:
        for case in cases:
            for cfg in ["float"] + configs:
                p = harness.RESULTS / f"{case}__{cfg}{suffix}.json"
                if p.exists():
                    records.append(json.loads(p.read_text()))
        if args.latency_only:
            for case in cases:
                print(f"{case} / interleaved latency ...", file=sys.stderr, flush=True)
                _latency_pass(records, case, configs, args.small, runs, workdir, suffix)
    else:
        have_nncf = harness.nncf_available()
        t0 = time.perf_counter()
        for case in cases:
            hints = False
            for cfg in ["float"] + configs:
                if harness.CONFIGS.get(cfg, ("",))[0] == "nncf" and not have_nncf:
                    records.append({"case": case, "config": cfg, "error": "nncf not installed"})
                    continue
                if cfg.endswith("+excl") and not hints:
                    continue  # the case gives no nodes_to_exclude hint
                t = time.perf_counter()
                print(f"[{time.perf_counter() - t0:6.0f}s] {case} / {cfg} ...", file=sys.stderr, flush=True)
                rec = harness.spawn_worker(case, cfg, args.small, runs, workdir, args.timeout)
                records.append(rec)
                if cfg == "float":
                    hints = bool(rec.get("nodes_to_exclude"))
                if rec.get("error"):
                    print(f"    ERROR: {rec['error'].splitlines()[-1]}", file=sys.stderr, flush=True)
                    if cfg == "float":
                        break
                else:
                    print(f"    {rec['metrics']}  ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
            if not args.no_latency:
                print(f"[{time.perf_counter() - t0:6.0f}s] {case} / interleaved latency ...", file=sys.stderr, flush=True)
                _latency_pass(records, case, configs, args.small, runs, workdir, suffix)
    records = _order(records, cases, configs)
    md = tables(records)
    print(md)
    harness.RESULTS.mkdir(parents=True, exist_ok=True)
    (harness.RESULTS / f"results{suffix}.md").write_text(md + "\n")
    (harness.RESULTS / f"results{suffix}.json").write_text(json.dumps(records, indent=1))
    print(f"\nwritten: {harness.RESULTS / f'results{suffix}.md'}", file=sys.stderr)
    return 0


def _latency_pass(records: list[dict], case: str, configs: list[str], small: bool, runs: int, workdir: Path,
                  suffix: str) -> None:
    """Replace each record's latency by the interleaved measurement (the worker's own stays as *_isolated)."""
    lat = harness.spawn_latency(case, configs, small, runs, workdir)
    for rec in records:
        if rec["case"] == case and rec["config"] in lat and not rec.get("error"):
            rec.setdefault("latency_ms_isolated", rec["latency_ms_median"])
            rec["latency_ms_median"] = lat[rec["config"]]["median_ms"]
            rec["latency_ms_p90"] = lat[rec["config"]]["p90_ms"]
            rec["latency_interleaved"] = True
            (harness.RESULTS / f"{case}__{rec['config']}{suffix}.json").write_text(json.dumps(rec, indent=1))


def _latency_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("case")
    ap.add_argument("configs")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args(argv)
    lat = harness.interleaved_latency(a.case, a.configs.split(","), a.small, a.runs, a.workdir)
    a.json.write_text(json.dumps(lat, indent=1))
    return 0


def _worker_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("case")
    ap.add_argument("config")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args(argv)
    rec = harness.worker(a.case, a.config, a.small, a.runs, a.workdir)
    a.json.write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
