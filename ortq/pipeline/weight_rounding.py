"""Layer-wise weight rounding (GPTQ-style): round each weight so the layer's output error is least.

Rounding every weight to its nearest grid point minimizes the weight error, not the output error: the
errors of one output channel add up over its inputs, and inputs are correlated. GPTQ rounds the weight
columns one input at a time and pushes each column's rounding error onto the inputs not yet rounded, in
proportion to the inputs' second moments ``H = E[x xᵀ]``, which minimizes ``E‖x·W - x·W_q‖²`` greedily.

``H`` is gathered in the same calibration pass as the ranges, one ``K x K`` matrix per layer input (``K``
= input features, or ``channels / groups x kernel area`` for a Conv, whose patches are unfolded from each
batch): memory is flat in the number of samples but grows with ``K²``, hence opt-in (``weight_rounding=
"gptq"``). The scales and zero points stay exactly those min/max gave: only which grid point each weight
takes changes, so the quantized graph, its kernels and its latency are unchanged.

Layers: Conv (any groups, dilation, stride and explicit padding; ``auto_pad`` other than NOTSET is
skipped), Gemm, and MatMul with a constant 2-D weight, each with a weight used by that layer only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import onnx

if TYPE_CHECKING:
    from ortq.core.graph import GraphIndex
    from ortq.core.plan import QuantPlan
    from ortq.core.scheme import QuantParams

__all__ = ["RoundingLayer", "SecondMoments", "find_layers", "gptq_round", "round_weights", "WEIGHT_ROUNDING"]

log = logging.getLogger(__name__)

#: Accepted values of ``weight_rounding`` (None: round to nearest).
WEIGHT_ROUNDING = ("gptq",)

#: Dampening added to H's diagonal, relative to its mean (GPTQ's usual 1%): keeps the inverse well posed.
_DAMP = 0.01
#: Layers whose H would exceed this many elements are skipped (K = 4096 is 128 MB in float64).
_MAX_H_ELEMENTS = 4096 * 4096
#: Columns rounded between two matrix-product updates of the remaining columns.
_BLOCK = 128
#: Rows (pixels or tokens) of one batch that enter H: an evenly strided subset beyond this. H is a mean,
#: well estimated from thousands of rows; all 12,544 pixels of a 112x112 map cost 3x more for no gain.
_MAX_ROWS = 4096


def _attr(node: onnx.NodeProto, name: str, default):  # noqa: ANN001, ANN202
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


@dataclass(frozen=True)
class RoundingLayer:
    node: str
    op_type: str
    input: str
    weight: str
    groups: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    trans_a: bool = False
    trans_b: bool = False


def find_layers(index: GraphIndex, plan: QuantPlan, params: dict | None = None) -> list[RoundingLayer]:
    """The quantized Conv/Gemm/MatMul layers with an unshared constant weight that GPTQ can round."""
    layers = []
    for node in index.graph.node:
        if node.name not in plan.quantized_nodes or len(node.input) < 2:
            continue
        x, w = node.input[0], node.input[1]
        if x not in plan.tensors or index.is_constant(x) or w not in index.initializers:
            continue
        if len(index.consumers.get(w, [])) != 1:
            continue
        shape = list(index.initializers[w].dims)
        if node.op_type == "Conv" and len(shape) >= 3:
            if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                continue
            n = len(shape) - 2
            kernel = tuple(shape[2:])
            groups = int(_attr(node, "group", 1))
            k = shape[1] * int(np.prod(kernel))
            if k * k * groups > _MAX_H_ELEMENTS:
                continue
            layers.append(RoundingLayer(
                node.name, "Conv", x, w, groups, kernel, tuple(_attr(node, "strides", [1] * n)),
                tuple(_attr(node, "pads", [0] * 2 * n)), tuple(_attr(node, "dilations", [1] * n)),
            ))
        elif node.op_type in ("Gemm", "MatMul") and len(shape) == 2:
            trans_b = bool(_attr(node, "transB", 0)) if node.op_type == "Gemm" else False
            k = shape[1] if trans_b else shape[0]
            if k * k > _MAX_H_ELEMENTS:
                continue
            trans_a = bool(_attr(node, "transA", 0)) if node.op_type == "Gemm" else False
            layers.append(RoundingLayer(node.name, node.op_type, x, w, trans_a=trans_a, trans_b=trans_b))
    return layers


def _patches(x: np.ndarray, layer: RoundingLayer) -> np.ndarray:
    """Conv input [N, C, *spatial] unfolded to [rows, groups, C/groups x kernel area]."""
    n, c = x.shape[:2]
    dims = len(layer.kernel)
    pads = layer.pads
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + dims]) for i in range(dims)])
    window = tuple((k - 1) * d + 1 for k, d in zip(layer.kernel, layer.dilations))
    view = np.lib.stride_tricks.sliding_window_view(padded, window, axis=tuple(range(2, 2 + dims)))
    # view: [N, C, *out_full, *window]; take strides on the output and dilation inside the window
    out_index = tuple(slice(None, None, s) for s in layer.strides)
    win_index = tuple(slice(None, None, d) for d in layer.dilations)
    view = view[(slice(None), slice(None), *out_index, *win_index)]
    view = np.moveaxis(view, 1, 1 + dims)  # [N, *out, C, *kernel]
    rows = int(np.prod(view.shape[: 1 + dims]))
    g = layer.groups
    return view.reshape(rows, g, (c // g) * int(np.prod(layer.kernel)))


def _subsample(rows: np.ndarray) -> np.ndarray:
    """At most :data:`_MAX_ROWS` rows, evenly strided (deterministic)."""
    if rows.shape[0] <= _MAX_ROWS:
        return rows
    return rows[:: -(-rows.shape[0] // _MAX_ROWS)]


class SecondMoments:
    """Running ``sum x xᵀ`` and row counts of each layer's input (per group for grouped Convs)."""

    def __init__(self, layers: list[RoundingLayer]) -> None:
        self.layers = list(layers)
        self.sums: dict[str, np.ndarray] = {}
        self.rows: dict[str, int] = {}

    def updates(self) -> dict[str, Callable[[np.ndarray], None]]:
        """One update function per observed input tensor (a tensor may feed several layers)."""
        by_input: dict[str, list[RoundingLayer]] = {}
        for layer in self.layers:
            by_input.setdefault(layer.input, []).append(layer)

        def make(group: list[RoundingLayer]) -> Callable[[np.ndarray], None]:
            def update(values: np.ndarray) -> None:
                for layer in group:
                    self._add(layer, values)
            return update

        return {name: make(group) for name, group in by_input.items()}

    def _add(self, layer: RoundingLayer, values: np.ndarray) -> None:
        if values.size == 0:
            return
        if layer.op_type == "Conv":
            if values.ndim != 2 + len(layer.kernel):
                raise ValueError(f"input of {layer.node!r} has rank {values.ndim}, expected {2 + len(layer.kernel)}")
            x = values.astype(np.float32, copy=False)
            if layer.groups == 1 and all(k == 1 for k in layer.kernel) and not any(layer.pads):
                stride = tuple(slice(None, None, s) for s in layer.strides)
                rows = _subsample(np.moveaxis(x[(slice(None), slice(None), *stride)], 1, -1).reshape(-1, x.shape[1]))
                h = (rows.T @ rows)[None]  # a pointwise Conv is a MatMul over pixels: no unfolding
                count = rows.shape[0]
            else:
                patches = np.ascontiguousarray(_subsample(_patches(x, layer)).transpose(1, 2, 0))  # [groups, K, rows]
                h = np.matmul(patches, patches.transpose(0, 2, 1))  # batched BLAS in float32 per batch
                count = patches.shape[2]
            h = h.astype(np.float64)  # summed over batches in float64
        else:
            x = values.T if (layer.trans_a and values.ndim == 2) else values
            rows = _subsample(x.reshape(-1, x.shape[-1])).astype(np.float32, copy=False)
            h = (rows.T @ rows)[None].astype(np.float64)
            count = rows.shape[0]
        if layer.node in self.sums:
            if self.sums[layer.node].shape != h.shape:
                raise ValueError(f"input of {layer.node!r} changed its feature count between batches")
            self.sums[layer.node] += h
        else:
            self.sums[layer.node] = h
        self.rows[layer.node] = self.rows.get(layer.node, 0) + count

    def moments(self, node: str) -> np.ndarray | None:
        if not self.rows.get(node):
            return None
        return self.sums[node] / self.rows[node]


def gptq_round(
    weight: np.ndarray, h: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int
) -> np.ndarray:
    """Integer weights for ``weight`` [groups, rows, K] given the inputs' second moments ``h`` [groups, K, K].

    ``scale`` and ``zero_point`` broadcast to [groups, rows] (one per output channel, or one for all).
    Returns int64 grid values of the same shape as ``weight``.
    """
    w = weight.astype(np.float64).copy()
    g, _, k = w.shape
    idx = np.arange(k)
    diag = h[:, idx, idx].astype(np.float64)
    diag[diag <= 0] = 1.0  # an input that is always zero: nothing to compensate, any rounding is exact for it
    mean = diag.mean(axis=1)
    # GPTQ's update rows are the upper Cholesky factor of H⁻¹; more dampening where that is not posdef.
    for damp in (_DAMP, 0.1, 1.0):
        damped = h.astype(np.float64).copy()
        damped[:, idx, idx] = diag + damp * mean[:, None]
        try:
            u = np.linalg.cholesky(np.linalg.inv(damped)).transpose(0, 2, 1)
            break
        except np.linalg.LinAlgError:
            continue
    else:  # pragma: no cover - H + I·mean is positive definite
        raise np.linalg.LinAlgError("second moments are not positive definite")
    scale = np.broadcast_to(scale, w.shape[:2]).astype(np.float64)
    zp = np.broadcast_to(zero_point, w.shape[:2]).astype(np.float64)
    q = np.empty(w.shape, dtype=np.int64)
    # GPTQ's lazy batch updates: errors are pushed within a block column by column, and onto the columns
    # after the block in one matrix product (the same arithmetic, at BLAS speed).
    for start in range(0, k, _BLOCK):
        end = min(start + _BLOCK, k)
        errors = np.empty(w.shape[:2] + (end - start,))
        for i in range(start, end):
            col = w[:, :, i]
            qi = np.clip(np.rint(col / scale) + zp, qmin, qmax)
            q[:, :, i] = qi.astype(np.int64)
            err = (col - (qi - zp) * scale) / u[:, i, i][:, None]
            errors[:, :, i - start] = err
            w[:, :, i + 1:end] -= err[:, :, None] * u[:, None, i, i + 1:end]
        if end < k:
            w[:, :, end:] -= np.matmul(errors, u[:, start:end, end:])
    return q


def round_weights(
    index: GraphIndex,
    layers: list[RoundingLayer],
    params: dict[str, QuantParams],
    moments: SecondMoments,
    set_constant: Callable[[GraphIndex, str, np.ndarray], None],
) -> dict[str, np.ndarray]:
    """Replace each layer's float weight by its GPTQ-rounded values (dequantized, so the pipeline's own
    quantization with the same parameters gives exactly those integers); return the original weights."""
    originals: dict[str, np.ndarray] = {}
    for layer in layers:
        p, h = params.get(layer.weight), moments.moments(layer.node)
        weight = index.constant_value(layer.weight)
        if p is None or h is None or weight is None or weight.dtype != np.float32:
            continue
        info = np.iinfo(p.qtype.numpy_dtype)
        if layer.op_type == "Conv":
            out_ch = weight.shape[0]
            g = layer.groups
            rows = weight.reshape(g, out_ch // g, -1)
            out_axis_ok = not p.per_channel or p.axis == 0
            shape_rows = (g, out_ch // g)
        else:
            rows = (weight if layer.trans_b else weight.T)[None]  # [1, N, K]
            out_axis_ok = not p.per_channel or p.axis == (0 if layer.trans_b else 1)
            shape_rows = (1, rows.shape[1])
        if not out_axis_ok or rows.shape[2] != h.shape[-1] or rows.shape[0] != h.shape[0]:
            log.debug("weight rounding skips %r: its scales are not per output channel", layer.node)
            continue
        scale = p.scale.reshape(shape_rows) if p.per_channel else p.scale.reshape(1, 1)
        zp = p.zero_point.reshape(shape_rows) if p.per_channel else p.zero_point.reshape(1, 1)
        q = gptq_round(rows, h, scale, zp.astype(np.int64), int(info.min), int(info.max))
        rounded = ((q - zp.astype(np.int64)[..., None]) * scale[..., None]).astype(np.float32)
        if layer.op_type == "Conv":
            new = rounded.reshape(weight.shape)
        else:
            new = rounded[0] if layer.trans_b else rounded[0].T
        originals[layer.weight] = weight
        set_constant(index, layer.weight, new)
    if originals:
        log.info("GPTQ weight rounding rounded %d weight(s)", len(originals))
    return originals
