"""ESP-DL v3's packed filter layouts (ESP32-S3 and ESP32-P4), both directions.

Facts (esp-ppq ``esp_ppq/parser/espdl/export_patterns.py``, ``ResetParamLayoutPattern``, read through the search
tool; not copied): a Conv filter [N, C, kh, kw] is taken to NHWC, the first ``N // align * align`` output
channels are stored in blocks of ``align`` (16 for int8, 8 for int16) as (N/align, H, W, C, align) -- the
block's channels innermost -- and the remaining channels follow in NHWC order (depthwise: in CHWN order).
The tensor's ``dims`` are then written as [kh, kw, C, N] (depthwise: [kh, kw, N, C]); the element order is
the blocked one above, whatever the dims say. A Gemm weight is transposed to [K, N] if ``transB`` and laid
out as the 1x1 filter [N, K, 1, 1]. The exporter names the layout in the tensor's ``doc_string``
(``layout ==> (N/16)HWC16``, or ``N16HWC16`` / ``N16HWC16_UNALIGNED`` in older files).
"""

from __future__ import annotations

import numpy as np

__all__ = ["align_of", "pack_filter", "unpack_filter", "layout_name"]


def align_of(dtype: np.dtype | str) -> int:
    """Output channels per block: 16 for int8, 8 for int16."""
    return 16 if np.dtype(dtype).itemsize == 1 else 8


def layout_name(n: int, align: int) -> str:
    """The exporter's name for a 2-D filter layout (``LayoutAnnotation`` in esp-ppq)."""
    return f"(N/{align})HWC{align}" + ("_UNALIGNED" if n % align else "")


def pack_filter(w: np.ndarray, depthwise: bool) -> tuple[np.ndarray, list[int]]:
    """ONNX filter [N, C, kh, kw] -> (flat elements in the packed order, dims as the file states them)."""
    w = np.asarray(w)
    n, c, h, wd = w.shape
    align = align_of(w.dtype)
    nhwc = w.transpose(0, 2, 3, 1)
    aligned = n // align * align
    head = nhwc[:aligned].reshape(n // align, align, h, wd, c).transpose(0, 2, 3, 4, 1).reshape(-1)
    rest = nhwc[aligned:]
    if depthwise:
        rest = rest.transpose(3, 1, 2, 0)  # CHWN
    flat = np.concatenate([head, rest.reshape(-1)])
    dims = [h, wd, n, c] if depthwise else [h, wd, c, n]
    return flat, dims


def unpack_filter(flat: np.ndarray, dims: list[int] | tuple[int, ...], depthwise: bool, blocked: bool = True) -> np.ndarray:
    """The inverse of :func:`pack_filter`: stored elements and dims -> ONNX filter [N, C, kh, kw].

    ``blocked=False`` reads plain NHWC order (the layout esp-ppq writes for chips without PIE instructions;
    depthwise HWCN there)."""
    flat = np.asarray(flat).reshape(-1)
    if depthwise:
        h, wd, n, c = dims
    else:
        h, wd, c, n = dims
    if not blocked:
        if depthwise:
            return flat.reshape(h, wd, c, n).transpose(3, 2, 0, 1)
        return flat.reshape(n, h, wd, c).transpose(0, 3, 1, 2)
    align = align_of(flat.dtype)
    aligned = n // align * align
    split = aligned * h * wd * c
    head = flat[:split].reshape(n // align, h, wd, c, align).transpose(0, 4, 1, 2, 3).reshape(aligned, h, wd, c)
    rest = flat[split:]
    if depthwise:
        rest = rest.reshape(c, h, wd, n - aligned).transpose(3, 1, 2, 0)
    else:
        rest = rest.reshape(n - aligned, h, wd, c)
    return np.concatenate([head, rest]).transpose(0, 3, 1, 2)
