"""What a model expects as input: names, element types and shapes, read once from the graph.

Its own module so that every reader of calibration data (arrays, folders, images) shares it without
importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

__all__ = ["InputSpec", "model_inputs", "DEFAULT_BATCH_SIZE"]

DEFAULT_BATCH_SIZE = 16


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None  # None: rank unknown; a None dim: symbolic


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The real inputs of the model (initializers listed as inputs are optional and skipped)."""
    initializers = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        tt = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else np.dtype("float32")
        shape = None
        if tt.HasField("shape"):
            # A negative dim_value (-1, as some exporters write) is dynamic, as ONNX Runtime reads it;
            # onnx.checker accepts it, so refusing every batch for it would only break working models.
            shape = tuple(
                d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in tt.shape.dim
            )
        specs.append(InputSpec(vi.name, np.dtype(dtype), shape))
    return specs
