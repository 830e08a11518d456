"""Write the peer suite's summary page from its ``table.md`` and :mod:`peer_ort_sqnr`'s log.

    python benchmarks/peer_ort_report.py /tmp/ort-peer-suite/table.md /tmp/sqnr.jsonl > part.md

Each test ONNX Runtime passes and ortq fails gets a kind (an assertion on ONNX Runtime's exact graph or
storage; an option ortq refuses by name; anything else) and, where both tools produced a model, the worst
output SQNR against the float model of each (dB, on the same data). Only the first kind, with ortq's SQNR
at least ONNX Runtime's, is an acceptable difference.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

#: First-line patterns of failures that assert ONNX Runtime's exact graph, names or storage.
_GRAPH = re.compile(
    r"Assert failed|op count is not same|is not in order|Lists differ|not greater than 0 : Expected at least one|"
    r"^AssertionError: \d+ != \d+$|StopIteration|IndexError|KeyError: '|Unable to guess type|"
    r"^AssertionError: True is not false|not found in \{"
)


def kind(message: str) -> str:
    if "ConfigError" in message or "not implemented" in message or "is not supported" in message:
        return "refused (not implemented)"
    if _GRAPH.search(message):
        return "asserts ONNX Runtime's graph"
    return "other"


def main(table: str, log: str) -> str:
    failures = []
    for line in Path(table).read_text().splitlines():
        if line.startswith("- ") and "::" in line:
            test, _, message = line[2:].partition(": ")
            failures.append((test, message))
    sqnr: dict[str, list[dict]] = {}
    if Path(log).exists():
        for line in Path(log).read_text().splitlines():
            rec = json.loads(line)
            sqnr.setdefault(rec["test"].removesuffix(" (call)"), []).append(rec)
    out = ["| test | kind | ortq SQNR (dB) | ONNX Runtime SQNR (dB) | first message line |", "|---|---|---|---|---|"]
    for test, message in failures:
        calls = sqnr.get(test, [])

        def worst(key: str) -> str:
            values = [v for r in calls for v in (r.get(key) or []) if v is not None]
            return f"{min(values):.2f}" if values else "-"

        short = message.replace("|", "\\|")[:140]
        out.append(f"| `{test}` | {kind(message)} | {worst('ortq_sqnr')} | {worst('ort_sqnr')} | {short} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(main(sys.argv[1], sys.argv[2]))
