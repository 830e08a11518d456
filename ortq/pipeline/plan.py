"""Stage 2: decide which tensors get which scheme, by asking the op quantizers under the backend's policy.

Planning needs no data, so ``ortq info`` shows the plan (and every reason a node stays float) before
anything is calibrated. Graph-wide rules live here, not in the op quantizers:

- one quantization per tensor: every quantized consumer shares the same Q/DQ;
- a data-movement output (:class:`SameAs`) is quantized only if its input already is, or if that input is
  a graph input and the target feeds its network integers (``QuantConfig.quantize_graph_inputs``, ESP-DL):
  the input then gets an Activation quantization of its own;
- a node that ONNX Runtime fuses into the integer kernel producing its input (ReLU/Clip(0, x), whose
  clamp a zero point at the type minimum performs exactly; a MatMul's bias Add) takes that input's
  place: the input gets no Q/DQ and producer, node and Q become one kernel (see ``fused_input``);
- a quantized tensor that only float nodes read loses its Q/DQ when that costs no integer kernel: a
  data-movement op feeding only float ops goes back to float, and a MatMul writes float directly. Left in
  place, such a DQ would also let ONNX Runtime fuse a float-planned MatMul of two activations into its
  slow U8U8 kernel;
- vetoed tensors (unusable calibrated ranges) leave every node touching them in float;
- inside transformer blocks (``QuantConfig.transformer_policy``, :mod:`ortq.pipeline.transformer`) only
  MatMul/Gemm inputs and weights (and data movement after them) are quantized: the residual stream's
  element-wise ops, LayerNorm, GELU, Softmax and the mask stay float, since its outlier channels do not
  fit one 8-bit scale.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import onnx

from ortq.core.errors import OrtqError, PluginError
from ortq.core.graph import GraphIndex, node_label
from ortq.core.op_quantizer import Activation, Bias, LeaveFloat, NodePlan, PlanContext, SameAs, Weight
from ortq.core.plan import FloatNode, QuantPlan, TensorPlan
from ortq.pipeline.transformer import QUANTIZED_IN_REGION, RESIDUAL_FLOAT_REASON, find_transformer

if TYPE_CHECKING:
    from ortq.core.backend import Backend
    from ortq.core.config import QuantConfig
    from ortq.host.plugin_host import PluginHost

__all__ = ["TensorPlan", "QuantPlan", "make_plan"]

log = logging.getLogger(__name__)


def make_plan(
    toolkit: PluginHost,
    index: GraphIndex,
    config: QuantConfig,
    backend: Backend,
    vetoed: dict[str, str] | None = None,
) -> QuantPlan:
    """Plan every node of the main graph, in order (ONNX graphs are topologically sorted)."""
    vetoed = vetoed or {}
    plan = QuantPlan()
    quantized: set[str] = set()
    ctx = PlanContext(index, config, quantized)
    instances: dict[type, object] = {}
    fused: dict[str, int] = {}
    float_output_ok: set[str] = set()
    region: frozenset[str] = frozenset()
    if config.transformer_policy:
        layout = find_transformer(index)
        region = layout.region
        if layout:
            log.info("transformer blocks found: %s; their residual stream stays float", layout.summary())
    for node in index.graph.node:
        result = _plan_node(toolkit, node, ctx, config, backend, instances, region)
        if isinstance(result, NodePlan):
            _check_indices(toolkit, node, result)
            result = _admit(node, result, plan, index, config, vetoed, quantized)
        if isinstance(result, LeaveFloat):
            plan.float_nodes.append(FloatNode(node.name, node.op_type, result.reason))
            continue
        plan.quantized_nodes[node.name] = node.op_type
        quantizer = instances[toolkit.op_quantizer_for(node.op_type, node.domain)]
        try:
            fused_input = quantizer.fused_input(node, ctx)
        except Exception as exc:
            raise PluginError(f"{type(quantizer).__name__}.fused_input failed on node {node_label(node)}: {exc!r}") from exc
        if fused_input is not None:
            fused[node.name] = fused_input
        if quantizer.float_output_ok:
            float_output_ok.add(node.name)
    _fold_into_producers(plan, index, fused)
    _prune_float_only_tensors(plan, index, float_output_ok)
    return plan


def _plan_node(toolkit, node, ctx, config, backend, instances, region=frozenset()) -> NodePlan | LeaveFloat:
    if node.name in config.nodes_to_exclude:
        return LeaveFloat("excluded by nodes_to_exclude")
    if config.nodes_to_quantize is not None and node.name not in config.nodes_to_quantize:
        return LeaveFloat("not listed in nodes_to_quantize")
    cls = toolkit.op_quantizer_for(node.op_type, node.domain)
    if cls is None:
        return LeaveFloat(f"no op quantizer is registered for {node.op_type}")
    if config.op_types is not None and node.op_type not in config.op_types:
        return LeaveFloat(f"{node.op_type} is not in the op types selected for target {backend.name!r}")
    if node.op_type in config.excluded_op_types:
        return LeaveFloat(
            f"target {backend.name!r} runs {node.op_type} no faster quantized (no integer kernel, or a slower one); "
            "name it in op_types_to_quantize to quantize it anyway"
        )
    if (node.name in region and config.op_types is None and node.op_type not in QUANTIZED_IN_REGION
            and any(ctx.is_float(o) for o in node.output if o)):  # shape arithmetic keeps its own reason
        return LeaveFloat(RESIDUAL_FLOAT_REASON)  # op types the user names are quantized regardless
    try:
        veto = backend.leave_float(node, ctx)
    except OrtqError:
        raise
    except Exception as exc:
        raise PluginError(f"backend {backend.name!r} failed on node {node_label(node)}: {exc!r}") from exc
    if veto:
        return LeaveFloat(veto)
    quantizer = instances.get(cls)
    if quantizer is None:
        quantizer = instances[cls] = cls()
    try:
        result = quantizer.plan(node, ctx)
    except OrtqError:
        raise
    except Exception as exc:
        plugin = toolkit.plugin_of(toolkit.op_quantizers, _key(node))
        raise PluginError(
            f"op quantizer {cls.__name__} (plugin {plugin!r}) failed on node {node_label(node)}: {exc!r}"
        ) from exc
    if not isinstance(result, (NodePlan, LeaveFloat)):
        raise PluginError(f"op quantizer {cls.__name__} returned {result!r} for node {node_label(node)}")
    return result


def _check_indices(toolkit: PluginHost, node: onnx.NodeProto, node_plan: NodePlan) -> None:
    """A role referring to an input the node does not have is the plugin's bug: say whose.

    Roles on absent inputs or outputs themselves are fine: ONNX inputs such as a bias are optional.
    """
    bad: list[str] = []
    for role in (*node_plan.inputs.values(), *node_plan.outputs.values()):
        refs = [role.input] if isinstance(role, SameAs) else [role.input, role.weight] if isinstance(role, Bias) else []
        bad += [f"input {i} (in {role})" for i in refs if not 0 <= i < len(node.input)]
    if bad:
        cls = toolkit.op_quantizer_for(node.op_type, node.domain)
        plugin = toolkit.plugin_of(toolkit.op_quantizers, _key(node))
        raise PluginError(
            f"op quantizer {cls.__name__} (plugin {plugin!r}) planned {', '.join(bad)} of node {node_label(node)}, "
            f"which has {len(node.input)} input(s) and {len(node.output)} output(s)"
        )


def _key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def _admit(
    node: onnx.NodeProto,
    node_plan: NodePlan,
    plan: QuantPlan,
    index: GraphIndex,
    config: QuantConfig,
    vetoed: dict[str, str],
    quantized: set[str],
) -> NodePlan | LeaveFloat:
    """Check a node's declared roles against the graph and earlier decisions, then commit them."""
    staged: dict[str, TensorPlan] = {}
    outputs = {} if node.op_type in config.op_types_no_output_quantization else node_plan.outputs
    entries = [(node.input, i, r) for i, r in node_plan.inputs.items()]
    entries += [(node.output, i, r) for i, r in outputs.items()]
    for names, i, role in entries:
        if i >= len(names) or not names[i]:
            continue  # optional input or output not present
        name = names[i]
        if name in vetoed:
            return LeaveFloat(f"tensor {name!r}: {vetoed[name]}")
        if not index.is_float(name):
            return LeaveFloat(f"tensor {name!r} is not a float32 or float16 tensor")
        constant = index.is_constant(name)
        if isinstance(role, Bias):
            if not config.quantize_bias:
                continue
            bias_in, bias_w = node.input[role.input], node.input[role.weight]
            if not constant:
                continue  # a computed bias stays float; the kernel still runs integer math on the rest
            tp = TensorPlan(name, role, None, True, node.name, bias_input=bias_in, bias_weight=bias_w)
        elif isinstance(role, Weight):
            if not constant:
                return LeaveFloat(f"input {name!r} is not a constant, so it cannot be a quantized weight")
            tp = TensorPlan(name, role, config.weight.with_axis(role.axis), True, node.name)
        elif isinstance(role, SameAs):
            source = node.input[role.input]
            if source not in quantized and source not in staged:
                if not _quantizable_graph_input(source, index, config, vetoed):
                    return LeaveFloat(f"its input {source!r} is not quantized, so moving it in "
                                      f"{config.activation.qtype.bits} bits gains nothing")
                staged[source] = TensorPlan(source, Activation(), config.activation, False, node.name)
            tp = TensorPlan(name, role, None, False, node.name, source=source)
        else:
            tp = TensorPlan(name, role, config.activation, constant, node.name)
        existing = plan.tensors.get(name) or staged.get(name)
        if existing is not None and not _compatible(existing, tp):
            return LeaveFloat(
                f"tensor {name!r} is already quantized differently for node {existing.node!r}"
            )
        if existing is None:
            staged[name] = tp
    bias_ok = all(
        t.bias_input in (plan.tensors.keys() | staged.keys()) and t.bias_weight in (plan.tensors.keys() | staged.keys())
        for t in staged.values()
        if isinstance(t.role, Bias)
    )
    if not bias_ok:
        staged = {k: t for k, t in staged.items() if not isinstance(t.role, Bias)}
    plan.tensors.update(staged)
    quantized.update(n for n, t in staged.items() if not t.constant and not isinstance(t.role, (Weight, Bias)))
    return node_plan


def _quantizable_graph_input(name: str, index: GraphIndex, config: QuantConfig, vetoed: dict[str, str]) -> bool:
    """``config.quantize_graph_inputs``: a float graph input (not a constant) a data-movement op reads becomes an
    activation of its own, for targets whose firmware is fed integers (the network input IS quantized there)."""
    return (
        config.quantize_graph_inputs
        and name in index.graph_inputs
        and not index.is_constant(name)
        and index.is_float(name)
        and name not in vetoed
    )


def _compatible(a: TensorPlan, b: TensorPlan) -> bool:
    activation_like = (Activation, SameAs)
    if isinstance(a.role, activation_like) and isinstance(b.role, Activation) and b.role.fixed_range is None:
        return True  # a consumer reuses the Q/DQ already placed on its input
    return type(a.role) is type(b.role) and a.role == b.role and a.spec == b.spec and a.source == b.source


def _fold_into_producers(plan: QuantPlan, index: GraphIndex, fused: dict[str, int]) -> None:
    for node in index.graph.node:
        if node.name not in fused or node.name not in plan.quantized_nodes or not node.output:
            continue
        tensor, out = node.input[fused[node.name]], node.output[0]
        t, o = plan.tensors.get(tensor), plan.tensors.get(out)
        if t is None or o is None or not isinstance(o.role, Activation) or o.role.fixed_range is not None:
            continue
        producer = index.producer.get(tensor)
        if producer is None or producer.name not in plan.quantized_nodes:
            continue
        if not isinstance(t.role, Activation) or t.node != producer.name or t.role.fixed_range is not None:
            continue
        if len(index.consumers.get(tensor, [])) != 1 or tensor in index.graph_outputs:
            continue
        del plan.tensors[tensor]
        plan.folded[tensor] = node.name


def _prune_float_only_tensors(plan: QuantPlan, index: GraphIndex, float_output_ok: set[str]) -> None:
    """Drop Q/DQ that no integer kernel needs, walking upstream until nothing changes."""

    def read_quantized(name: str) -> bool:
        return name in index.graph_outputs or any(
            c.name in plan.quantized_nodes for c in index.consumers.get(name, [])
        )

    changed = True
    while changed:
        changed = False
        for name, tp in list(plan.tensors.items()):
            if name not in plan.tensors or tp.constant or isinstance(tp.role, (Weight, Bias)) or read_quantized(name):
                continue
            producer = index.producer.get(name)
            if producer is None or producer.name not in plan.quantized_nodes:
                dropped, reason = [name], "no quantized node reads it"
            elif isinstance(tp.role, SameAs):
                if index.is_constant(tp.source):
                    continue  # an 8-bit table (embedding) moved as is: without this Q its DQ would run on all of it
                outputs = [o for o in producer.output if o in plan.tensors]
                if any(read_quantized(o) for o in outputs):
                    continue  # e.g. one Split output still feeds an integer kernel
                plan.quantized_nodes.pop(producer.name)
                plan.float_nodes.append(FloatNode(producer.name, producer.op_type, "its output feeds only float ops"))
                dropped, reason = outputs, "moved by a node that now stays float"
            elif producer.name in float_output_ok:
                dropped, reason = [name], "only float ops read it; the producing integer kernel writes float directly"
            else:
                continue
            for tensor in dropped:
                del plan.tensors[tensor]
                plan.pruned[tensor] = reason
            changed = True
