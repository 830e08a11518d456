"""Ops that only move or select values: the output carries exactly the input's scale and zero point.

ONNX Runtime drops the Q/DQ around these and runs them on 8-bit data, but only when the scales and zero
points match exactly, which :class:`ortq.SameAs` guarantees.
"""

from __future__ import annotations

import numpy as np
import onnx

from ortq.core.hookspecs import hookimpl
from ortq.core.op_quantizer import Activation, LeaveFloat, NodePlan, OpQuantizer, PlanContext, QOperatorContext, SameAs
from ortq.pipeline.rewrite_qoperator import MS_DOMAIN, check_kernel_types, run_on_quantized


class DataMovementQuantizer(OpQuantizer):
    op_types = (
        "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Expand", "Tile",
        "Identity",
    )

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        return NodePlan(outputs={0: SameAs(0)})

    def qoperator(self, node: onnx.NodeProto, q: QOperatorContext) -> list[onnx.NodeProto] | LeaveFloat:
        return run_on_quantized(node, q)


class SplitQuantizer(OpQuantizer):
    op_types = ("Split",)

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        return NodePlan(outputs={i: SameAs(0) for i in range(len(node.output))})

    def qoperator(self, node: onnx.NodeProto, q: QOperatorContext) -> list[onnx.NodeProto] | LeaveFloat:
        return run_on_quantized(node, q)


class GatherQuantizer(OpQuantizer):
    op_types = ("Gather",)

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        if ctx.is_constant(node.input[0]):
            if not ctx.config.quantize_embeddings:
                return LeaveFloat("gathering from a constant table (an embedding) would dequantize all of it per run")
            values = _table_size(ctx, node.input[0])
            if values < MIN_TABLE_VALUES:
                return LeaveFloat(f"constant table {node.input[0]!r} is small ({values} values): 8 bits would save little "
                                  "and one scale for all of it costs accuracy")
            # The table is stored in 8 bits with one scale and the output keeps it: ONNX Runtime drops the
            # DQ -> Gather -> Q and gathers 8-bit rows (checked in tests/test_transformer_policy.py).
            return NodePlan(inputs={0: Activation()}, outputs={0: SameAs(0)})
        return NodePlan(outputs={0: SameAs(0)})

    def qoperator(self, node: onnx.NodeProto, q: QOperatorContext) -> list[onnx.NodeProto] | LeaveFloat:
        return run_on_quantized(node, q)


#: A constant table read by Gather is stored in 8 bits from this many values on (1 MiB of float32). Measured
#: on paraphrase-MiniLM-L3-v2 (docs/accuracy.md, Transformers): the word embeddings (11.7 M values) in 8 bits
#: cost 0.0003 cosine and save 35 MB; the position embeddings (197 k values, one outlier channel, 20 dB in
#: one 8-bit scale) cost another 0.0007 for 0.6 MB.
MIN_TABLE_VALUES = 1 << 18


def _table_size(ctx: PlanContext, name: str) -> int:
    shape = ctx.index.shape(name)
    if shape is not None and all(isinstance(d, int) for d in shape):
        return int(np.prod(shape, dtype=np.int64))
    value = ctx.index.constant_value(name)
    return 0 if value is None else int(value.size)


class ResizeQuantizer(OpQuantizer):
    """Nearest and linear interpolation stay within the input's range; cubic can overshoot it."""

    op_types = ("Resize",)

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        if ctx.string_attribute(node, "mode", "nearest") == "cubic":
            return self.extend_chain(node, ctx)
        return NodePlan(outputs={0: SameAs(0)})

    def qoperator(self, node: onnx.NodeProto, q: QOperatorContext) -> list[onnx.NodeProto] | LeaveFloat:
        """Nearest and linear interpolation of integers stay within the input's codes (8-bit kernels only)."""
        if q.attribute(node, "mode", b"nearest") in (b"cubic", "cubic"):
            return LeaveFloat("cubic interpolation can overshoot the input's range")
        return run_on_quantized(node, q, eight_bit_only=True)


class PadQuantizer(OpQuantizer):
    """Zero (or edge/reflect) padding adds no new values; a non-zero constant may lie outside the range."""

    op_types = ("Pad",)

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        value = 0.0
        if ctx.string_attribute(node, "mode", "constant") == "constant":
            if len(node.input) > 2 and node.input[2]:
                const = ctx.index.constant_value(node.input[2])
                if const is None:
                    return LeaveFloat("its pad value is computed at run time")
                value = float(const.reshape(-1)[0]) if const.size else 0.0
            else:
                value = float(ctx.attribute(node, "value", 0.0))
        if value == 0.0:
            return NodePlan(outputs={0: SameAs(0)})
        return self.extend_chain(node, ctx)

    def qoperator(self, node: onnx.NodeProto, q: QOperatorContext) -> list[onnx.NodeProto] | LeaveFloat:
        """Pad on the integer data; a real 0 is the zero point there, so constant padding pads with it."""
        if q.attribute(node, "mode", b"constant") not in (b"constant", "constant"):
            return run_on_quantized(node, q)
        if q.opset() < 11:
            return LeaveFloat("before opset 11 the pad value is a float attribute, not a tensor of the data's type")
        value = q.constant_value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if value is not None and value.size and float(value.reshape(-1)[0]) != 0.0:
            return LeaveFloat("a non-zero pad value has no exact integer code")
        if len(node.input) > 2 and node.input[2] and value is None:
            return LeaveFloat("its pad value is computed at run time")
        kernels = run_on_quantized(node, q)  # a LeaveFloat unless input 0 is quantized
        if isinstance(kernels, LeaveFloat):
            return kernels
        x = q.input(0)
        if not x.per_tensor:
            return LeaveFloat("its input is quantized per channel, so no one zero point pads it")
        pad = kernels[0]
        while len(pad.input) < 3:
            pad.input.append("")
        pad.input[2] = x.zero_point
        return kernels


def _asked_for(node: onnx.NodeProto, ctx: PlanContext) -> bool:
    """Named in ``op_types_to_quantize``, or graph inputs are quantized (``quantize_graph_inputs``: a target fed
    integers, or the drop-in's ``ForceQuantizeNoInputCheck``)."""
    named = ctx.config.op_types is not None and node.op_type in ctx.config.op_types
    return named or ctx.config.quantize_graph_inputs


class SelectionQuantizer(OpQuantizer):
    """GatherElements and TopK pick input values (TopK's indices are int64 and stay so): the picked values
    carry the input's scale. ONNX Runtime quantizes both when asked to (by name, or with
    ``ForceQuantizeNoInputCheck``); ortq's own defaults leave them float, since a host runtime gains nothing
    from moving 8-bit values through them unless a later integer kernel reads them."""

    op_types = ("GatherElements", "TopK")

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        if not _asked_for(node, ctx):
            return LeaveFloat(f"{node.op_type} is quantized only when op_types_to_quantize names it")
        return NodePlan(outputs={0: SameAs(0)})

    def qoperator(self, node: onnx.NodeProto, q: QOperatorContext) -> list[onnx.NodeProto] | LeaveFloat:
        if node.op_type == "TopK":
            return LeaveFloat("ONNX Runtime's CPU TopK has no 8-bit kernel")
        return run_on_quantized(node, q, eight_bit_only=True)


class WhereQuantizer(OpQuantizer):
    """Where selects from X and Y, which may have different ranges: each gets its own Q/DQ and the output its
    own (QLinearWhere on the CPU). Quantized only when asked for, as ONNX Runtime does (by name, or with
    ``ForceQuantizeNoInputCheck``): in ortq's own defaults a Where is mostly an attention mask, which 8 bits
    would clip."""

    op_types = ("Where",)

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        if not _asked_for(node, ctx):
            return LeaveFloat("Where is quantized only when op_types_to_quantize names it")
        return NodePlan(inputs={1: Activation(), 2: Activation()}, outputs={0: Activation()})

    def qoperator(self, node: onnx.NodeProto, q: QOperatorContext) -> list[onnx.NodeProto] | LeaveFloat:
        """com.microsoft.QLinearWhere(condition, X, X_scale, X_zp, Y, Y_scale, Y_zp, Z_scale, Z_zp)."""
        x, y, z = q.input(1), q.input(2), q.output(0)
        if x is None or y is None or z is None:
            return LeaveFloat("its inputs and output are not all quantized")
        bad = check_kernel_types([x, y, z])
        if bad is not None:
            return bad
        return [onnx.helper.make_node(
            "QLinearWhere", [node.input[0], x.name, x.scale, x.zero_point, y.name, y.scale, y.zero_point,
                             z.scale, z.zero_point],
            [z.name], name=q.fresh_name(f"{node.name}_quant"), domain=MS_DOMAIN,
        )]


class ArgMaxQuantizer(OpQuantizer):
    """ArgMax/ArgMin of the quantized codes is the ArgMax/ArgMin of the real values (one scale, and a
    positive one keeps the order), so the index comes straight from the 8-bit input. Only when named in
    ``op_types_to_quantize`` (as ONNX Runtime does): its output is an index, so nothing downstream gains."""

    op_types = ("ArgMax", "ArgMin")

    def plan(self, node: onnx.NodeProto, ctx: PlanContext) -> NodePlan | LeaveFloat:
        if ctx.config.op_types is None or node.op_type not in ctx.config.op_types:
            return LeaveFloat(f"{node.op_type} is quantized only when op_types_to_quantize names it")
        return NodePlan(inputs={0: Activation()})

    def qoperator(self, node: onnx.NodeProto, q: QOperatorContext) -> list[onnx.NodeProto] | LeaveFloat:
        x = q.input(0)
        if x is None:
            return LeaveFloat("its data input is not quantized")
        if not x.is_8bit:
            return LeaveFloat(f"ONNX Runtime runs {node.op_type} on 8-bit integers only")
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = q.fresh_name(f"{node.name}_quant")
        copy.input[0] = x.name
        return [copy]


@hookimpl
def ortq_register_op_quantizers(register):
    register(ArgMaxQuantizer)
    register(SelectionQuantizer)
    register(WhereQuantizer)
    register(DataMovementQuantizer)
    register(SplitQuantizer)
    register(GatherQuantizer)
    register(ResizeQuantizer)
    register(PadQuantizer)
