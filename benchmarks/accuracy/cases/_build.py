"""Small helpers for cases that turn a PyTorch state dict shipped in a wheel into an ONNX graph.

The graphs are written by hand with ``onnx.helper`` (BatchNorm folded into the convolution, as every
exporter does), so no exporter and no model-zoo package is needed; torch is needed only to read the
``.pt``/``.pth`` file, once: the ONNX file is cached.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_state_dict(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - environment
        raise RuntimeError(
            f"reading {path.name} needs torch once (the ONNX file is cached afterwards): "
            "pip install torch==2.13.0 in the benchmark venv") from e
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    return {k: v.detach().numpy().copy() for k, v in sd.items() if hasattr(v, "numpy")}


class Graph:
    """Accumulates nodes and initializers; names are generated."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: list = []
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, base: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), n))
        return n

    def op(self, op_type: str, inputs: list[str], base: str | None = None, n_out: int = 1, **attrs) -> str | list[str]:
        from onnx import helper

        base = base or op_type.lower()
        nm = self.name(base)
        outs = [f"{nm}_out{i}" if n_out > 1 else nm for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=nm, **attrs))
        return outs if n_out > 1 else outs[0]

    def conv(self, x: str, w: np.ndarray, b: np.ndarray | None, stride: int = 1, pad: int = 0, group: int = 1,
             base: str = "conv") -> str:
        k = w.shape[-1]
        b = np.zeros(w.shape[0], np.float32) if b is None else b
        return self.op("Conv", [x, self.const(base + "_w", w.astype(np.float32)),
                                self.const(base + "_b", b.astype(np.float32))], base,
                       kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=group)

    def model(self, inputs: list, outputs: list, opset: int = 17, name: str = "model"):
        from onnx import checker, helper

        g = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="ortq-bench")
        m.ir_version = 8
        checker.check_model(m)
        return m


def fold_bn(w: np.ndarray, b: np.ndarray | None, gamma, beta, mean, var, eps: float = 1e-5):
    scale = gamma / np.sqrt(var + eps)
    w = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
    b0 = np.zeros_like(mean) if b is None else b
    return w.astype(np.float32), ((b0 - mean) * scale + beta).astype(np.float32)
