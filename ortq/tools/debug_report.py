"""The debug report: one :class:`TensorComparison` row per matched tensor, and its two views, a terminal
table and a self-contained HTML page (:mod:`ortq.tools.debug` runs the models and fills it).

The HTML page loads nothing from anywhere (no CDN, no web font, no remote script): it is opened from a
disk, a CI artifact or a mail attachment, often offline. Tensor and node names come from the model, which
is someone else's data, so every one of them is escaped. The per-layer plot needs matplotlib (the
``report`` extra) and is embedded as a base64 PNG; without matplotlib the page says so and keeps the table.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from ortq.core.errors import ConfigError

__all__ = ["DebugReport", "TensorComparison", "SORT_KEYS", "DEFAULT_SORT", "SORT_DESCRIPTIONS", "render_table", "render_html"]

log = logging.getLogger(__name__)

#: Ways to rank the report; each maps a row to a key sorted ascending (worst first).
SORT_KEYS = ("injected", "sqnr", "channel-sqnr", "cosine", "max-error", "order")
#: The default ranks by the noise a tensor's own quantizer injects, so the cause comes before its effects.
DEFAULT_SORT = "injected"

#: What each sort key ranks by; shown in the CLI help and the HTML page.
SORT_DESCRIPTIONS = {
    "injected": "noise this tensor's own quantizer adds to the float values (worse of whole-tensor and "
                "per-channel-averaged SQNR), lowest first: the cause of the damage, not its accumulation",
    "sqnr": "accumulated SQNR of the quantized model's tensor against the float one, lowest first",
    "channel-sqnr": "accumulated per-channel-averaged SQNR, lowest first",
    "cosine": "cosine similarity, lowest first",
    "max-error": "largest absolute error, largest first",
    "order": "graph order of the float model",
}


def _db(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.1f}"


def _num(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.2f}%"


def _short(text: str | None, width: int) -> str:
    text = text or "-"
    return text if len(text) <= width else text[: width - 1] + "~"


_COLUMNS = [
    ("#", 4), ("tensor", 28), ("kind", 10), ("node (op)", 26), ("inj dB", 7), ("inj ch dB", 9),
    ("SQNR dB", 8), ("ch dB", 7), ("cosine", 8), ("max err", 9), ("clipped", 8),
]


def _cells(rank: int, row: TensorComparison) -> list[str]:
    node = f"{row.node or '-'} ({row.op_type})" if row.op_type else (row.node or "-")
    return [
        str(rank), row.tensor, row.kind, node, _db(row.injected_sqnr_db), _db(row.injected_channel_sqnr_db),
        _db(row.sqnr_db), _db(row.channel_sqnr_db), f"{row.cosine:.5f}", _num(row.max_abs_error),
        _pct(row.clipped_fraction),
    ]


def render_table(report: DebugReport, top: int | None = 20, sort: str = "injected") -> str:
    """The ``top`` worst rows by ``sort`` as fixed-width text, with a header naming the models and samples."""
    rows = report.sorted(sort)
    shown = rows if top is None else rows[:top]
    lines = [
        f"float {report.float_model} vs quantized {report.quantized_model}: {len(rows)} tensor(s) compared on "
        f"{report.samples} sample(s); sorted by {sort} (worst first)"
    ]
    header = "  ".join(name.ljust(width) if i in (1, 2, 3) else name.rjust(width) for i, (name, width) in enumerate(_COLUMNS))
    lines += [header, "-" * len(header)]
    for rank, row in enumerate(shown, 1):
        cells = _cells(rank, row)
        lines.append("  ".join(
            _short(cell, width).ljust(width) if i in (1, 2, 3) else _short(cell, width).rjust(width)
            for i, (cell, (_, width)) in enumerate(zip(cells, _COLUMNS))
        ))
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more (--top 0 shows all, --json/--html write everything)")
    if report.unmatched:
        lines.append(f"{len(report.unmatched)} quantized tensor(s) without a float counterpart: "
                     + ", ".join(report.unmatched[:5]) + (" ..." if len(report.unmatched) > 5 else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
td.t, th.t { text-align: left; font-family: monospace; }
th { background: #eee; cursor: pointer; user-select: none; position: sticky; top: 0; }
tr.bad td { background: #fde8e8; }
.note { color: #555; }
img { max-width: 100%; }
"""

# Click a header to sort by it; a second click reverses. Numbers come from data-v (empty: missing).
_JS = """
document.querySelectorAll('#tensors th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = document.querySelector('#tensors tbody');
    var rows = Array.prototype.slice.call(body.rows);
    var asc = th.getAttribute('data-dir') !== 'asc';
    document.querySelectorAll('#tensors th').forEach(function (h) { h.removeAttribute('data-dir'); });
    th.setAttribute('data-dir', asc ? 'asc' : 'desc');
    var numeric = th.hasAttribute('data-num');
    rows.sort(function (a, b) {
      var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
      var r;
      if (numeric) {
        x = x === '' ? Infinity : parseFloat(x); y = y === '' ? Infinity : parseFloat(y);
        r = x < y ? -1 : x > y ? 1 : 0;
      } else { r = x.localeCompare(y); }
      return asc ? r : -r;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""

_HTML_COLUMNS = [
    ("#", True), ("tensor", False), ("quantized tensor", False), ("kind", False), ("node", False), ("op", False),
    ("injected dB", True), ("injected per-channel dB", True), ("SQNR dB", True), ("per-channel SQNR dB", True),
    ("cosine", True), ("max abs error", True), ("injected max abs error", True), ("clipped", True),
    ("float min", True), ("float max", True), ("scale", True), ("zero point", True), ("type", False),
]


def _sort_value(value: float | int | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if math.isinf(value):
            return "1e308" if value > 0 else "-1e308"
    return str(value)


def _html_row(rank: int, row: TensorComparison) -> str:
    values = [
        (rank, str(rank)), (row.tensor, row.tensor), (row.quantized_tensor, row.quantized_tensor or "-"),
        (row.kind, row.kind), (row.node, row.node or "-"), (row.op_type, row.op_type or "-"),
        (row.injected_sqnr_db, _db(row.injected_sqnr_db)),
        (row.injected_channel_sqnr_db, _db(row.injected_channel_sqnr_db)),
        (row.sqnr_db, _db(row.sqnr_db)), (row.channel_sqnr_db, _db(row.channel_sqnr_db)),
        (row.cosine, f"{row.cosine:.6f}"), (row.max_abs_error, _num(row.max_abs_error)),
        (row.injected_max_abs_error, _num(row.injected_max_abs_error)),
        (row.clipped_fraction, _pct(row.clipped_fraction)), (row.float_min, _num(row.float_min)),
        (row.float_max, _num(row.float_max)), (row.scale, _num(row.scale)),
        (row.zero_point, "-" if row.zero_point is None else str(row.zero_point)),
        (row.quant_type, (row.quant_type or "-") + (" per-channel" if row.per_channel else "")),
    ]
    cells = []
    for (name, _), (raw, text) in zip(_HTML_COLUMNS, values):
        cls = ' class="t"' if name in ("tensor", "quantized tensor", "node") else ""
        cells.append(f'<td{cls} data-v="{html.escape(_sort_value(raw), quote=True)}">{html.escape(text)}</td>')
    score = row.injected_score_db
    bad = ' class="bad"' if score is not None and score < 20.0 else ""
    return f"<tr{bad}>" + "".join(cells) + "</tr>"


def _plot_png(report: DebugReport) -> bytes | None:
    """Per-layer SQNR (accumulated and injected) along the float graph; None without matplotlib."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    except ImportError:
        return None
    rows = [r for r in report.sorted("order") if r.kind != "weight"]
    if not rows:
        return None

    def finite(value: float | None) -> float:
        if value is None or math.isnan(value):
            return math.nan
        return max(min(value, 120.0), -20.0)

    x = list(range(len(rows)))
    fig = Figure(figsize=(max(6.0, min(0.35 * len(rows), 24.0)), 4.2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(x, [finite(r.sqnr_db) for r in rows], "o-", label="accumulated SQNR")
    ax.plot(x, [finite(r.channel_sqnr_db) for r in rows], ".:", label="accumulated per-channel SQNR")
    ax.plot(x, [finite(r.injected_score_db) for r in rows], "s--", label="injected (this quantizer only)")
    ax.set_ylabel("dB (higher is better)")
    ax.set_title("Per-layer error, float graph order")
    step = max(1, len(rows) // 40)
    ax.set_xticks(x[::step])
    ax.set_xticklabels([_short(r.tensor, 24) for r in rows][::step], rotation=60, ha="right", fontsize=7)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def render_html(report: DebugReport, sort: str = "injected") -> str:
    """A standalone HTML page: summary, the per-layer plot (or why it is missing), and a sortable table."""

    rows = report.sorted(sort)
    esc = html.escape
    png = _plot_png(report)
    if png is not None:
        plot = f'<img alt="per-layer SQNR" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
    else:
        plot = ('<p class="note">The per-layer plot needs matplotlib: <code>pip install \'ortq[report]\'</code>. '
                "The table below has every number.</p>")
    head = "".join(
        f'<th{" data-num" if numeric else ""}{" class=t" if name in ("tensor", "quantized tensor", "node") else ""}>'
        f"{esc(name)}</th>"
        for name, numeric in _HTML_COLUMNS
    )
    body = "\n".join(_html_row(rank, row) for rank, row in enumerate(rows, 1))
    keys = "".join(f"<li><b>{esc(k)}</b>: {esc(SORT_DESCRIPTIONS[k])}</li>" for k in SORT_KEYS)
    unmatched = ""
    if report.unmatched:
        unmatched = ("<p>Quantized tensors without a float counterpart: "
                     + ", ".join(f"<code>{esc(n)}</code>" for n in report.unmatched) + "</p>")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>ortq debug: {esc(report.quantized_model)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>ortq debug report</h1>
<p>Float model <code>{esc(report.float_model)}</code> against quantized model <code>{esc(report.quantized_model)}</code>:
{len(rows)} tensor(s) compared on {report.samples} sample(s) in {report.batches} batch(es).
Rows are sorted by <b>{esc(sort)}</b>, worst first; click a column header to re-sort.
Rows whose injected SQNR is below 20 dB are highlighted.</p>
<details><summary>What the columns and sort keys mean</summary>
<p><i>Injected</i>: the quantized model's own scale and zero point applied to the float model's values of the
tensor, so only this quantizer's noise is measured. <i>SQNR</i>, <i>cosine</i>, <i>max abs error</i>: the
quantized model's value of the tensor against the float model's, everything upstream included.
<i>Per-channel</i>: the mean over channels of each channel's SQNR in dB (an outlier channel that crushes the others
shows here). <i>Clipped</i>: share of float values outside the quantizer's range.</p>
<ul>{keys}</ul></details>
{plot}
<table id="tensors">
<thead><tr>{head}</tr></thead>
<tbody>
{body}
</tbody>
</table>
{unmatched}
<script>{_JS}</script>
</body>
</html>
"""


# ---------------------------------------------------------------------------------------------------------
# the report


@dataclass
class TensorComparison:
    """One row of the report. SQNRs are in dB (``inf``: no error at all); ``None``: not applicable."""

    tensor: str  # the float model's name
    quantized_tensor: str | None  # the integer tensor in the quantized model (None: an unquantized output)
    # "activation", "weight" (biases too), "output" (a graph output the quantized model leaves float) or
    # "float" (a float tensor a dynamic integer kernel writes: MatMulIntegerToFloat, DynamicQuantizeLSTM ...)
    kind: str
    node: str | None  # the float model's producer (activations) or first consumer (weights)
    op_type: str | None
    order: int  # position of that node in the float graph (graph order)
    sqnr_db: float
    channel_sqnr_db: float | None
    cosine: float
    max_abs_error: float
    injected_sqnr_db: float | None
    injected_channel_sqnr_db: float | None
    injected_max_abs_error: float | None
    clipped_fraction: float | None  # share of float values outside the quantizer's representable range
    float_min: float
    float_max: float
    scale: float | None  # the quantizer's scale (the largest one when per-channel; None when set per batch)
    zero_point: int | None
    per_channel: bool
    quant_type: str | None
    elements: int
    matched_by: str | None

    @property
    def injected_score_db(self) -> float | None:
        """The default sort key: the worse of whole-tensor and per-channel-averaged injected SQNR."""
        values = [v for v in (self.injected_sqnr_db, self.injected_channel_sqnr_db) if v is not None]
        return min(values) if values else None

    def sort_key(self, key: str) -> tuple:
        def asc(value: float | None) -> float:
            return math.inf if value is None or math.isnan(value) else value

        if key == "injected":
            return (asc(self.injected_score_db), self.order)
        if key == "sqnr":
            return (asc(self.sqnr_db), self.order)
        if key == "channel-sqnr":
            value = self.channel_sqnr_db if self.channel_sqnr_db is not None else self.sqnr_db
            return (asc(value), self.order)
        if key == "cosine":
            return (asc(self.cosine), self.order)
        if key == "max-error":
            return (-self.max_abs_error, self.order)
        if key == "order":
            return (self.order, self.tensor)
        raise ValueError(key)

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["injected_score_db"] = self.injected_score_db
        return {k: _json_number(v) for k, v in out.items()}


def _json_number(value: Any) -> Any:
    """JSON has no infinities: +inf SQNR (no error) is written as null, like every undefined number."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class DebugReport:
    """Every matched tensor of a float/quantized model pair, compared on the same inputs."""

    float_model: str
    quantized_model: str
    samples: int
    batches: int
    tensors: list[TensorComparison] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # quantized tensors with no float counterpart

    def sorted(self, key: str = DEFAULT_SORT) -> list[TensorComparison]:
        """Rows worst first by ``key`` (one of :data:`SORT_KEYS`)."""
        if key not in SORT_KEYS:
            raise ConfigError(f"unknown sort key {key!r}; choose one of {', '.join(SORT_KEYS)}")
        return sorted(self.tensors, key=lambda row: row.sort_key(key))

    def to_dict(self, sort: str = DEFAULT_SORT) -> dict[str, Any]:
        """The JSON document described by ``ortq/schemas/debug-report.schema.json``."""
        return {
            "format": "ortq.debug-report",
            "version": 1,
            "float_model": self.float_model,
            "quantized_model": self.quantized_model,
            "samples": self.samples,
            "batches": self.batches,
            "sort": sort,
            "tensors": [row.to_dict() for row in self.sorted(sort)],
            "unmatched": list(self.unmatched),
        }

    def to_json(self, sort: str = DEFAULT_SORT) -> str:
        import json

        return json.dumps(self.to_dict(sort), indent=1, allow_nan=False)

    def table(self, top: int | None = 20, sort: str = DEFAULT_SORT) -> str:
        return render_table(self, top=top, sort=sort)

    def to_html(self, sort: str = DEFAULT_SORT) -> str:
        return render_html(self, sort=sort)
