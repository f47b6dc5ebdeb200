"""Linear layers that are left dense by default, each with the reason ``inspect`` prints.

    output embedding (lm_head)   the vocabulary projection: large, often tied, and what every token's loss reads
    tied to an embedding         factoring it would untie it from the embedding it shares
    router of experts            maps a token to expert scores (out ≤ E): small, and a change reroutes tokens
    task head                    outside the base model (a classifier, a QA head): small and task-specific

Routers and task heads can be opted in with an ``--include`` pattern that matches their whole name.
"""
from __future__ import annotations

from torch import nn

from .experts import FactoredExperts, experts_layout, fused_tensor_names
from .layers import dense_weight, is_conv1d

OPT_IN = ("router", "task head")  # kinds an --include pattern matching the whole name brings back


def is_factorable(module: nn.Module) -> bool:
    """A dense 2-D linear map that this library knows how to factor."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def left_out(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Factorable modules left dense by default: name → (kind, why), kind one of the module docstring's."""
    reasons = {}
    reasons.update(_task_heads(model))
    reasons.update(_routers(model))
    reasons.update({n: ("tied", "shares its weight with an embedding (tied); left dense")
                    for n in _tied_to_embeddings(model)})
    reasons.update({n: ("output embedding", "the output embedding (lm_head); left dense")
                    for n in _output_embedding_names(model)})
    return reasons


def unsupported_experts(model: nn.Module) -> dict[str, str]:
    """3-D expert tensors this library cannot factor (experts classes outside transformers' experts
    interface), by tensor name → why."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, FactoredExperts) or experts_layout(module) is not None:
            continue
        for leaf in fused_tensor_names(module):
            found[f"{name}.{leaf}"] = (f"fused experts of {type(module).__name__}, which is not written for "
                                       f"transformers' experts interface; not supported, left dense")
    return found


def _output_embedding_names(model: nn.Module) -> set[str]:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def _tied_to_embeddings(model: nn.Module) -> set[str]:
    """Names of linear modules whose weight is an embedding's weight (tied, left alone)."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {name for name, module in model.named_modules()
            if is_factorable(module) and id(module.weight) in embedding_weights}


def _num_experts(module: nn.Module) -> int | None:
    """Experts held by a MoE block's ``experts`` child (fused, split, or a ModuleList), else None."""
    experts = getattr(module, "experts", None)
    if isinstance(experts, FactoredExperts):
        return experts.layout.num_experts
    if isinstance(experts, nn.ModuleList):
        return len(experts)
    layout = experts_layout(experts) if isinstance(experts, nn.Module) else None
    return layout.num_experts if layout else None


def _routers(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Children of a MoE block, outside its experts, mapping a token to at most one output per expert:
    the router ``gate`` (an nn.Linear, or a router module holding a 2-D weight as in transformers 5)
    and Qwen-MoE's ``shared_expert_gate``."""
    found = {}
    for block_name, block in model.named_modules():
        count = _num_experts(block)
        if count is None:
            continue
        for name, module in block.named_children():
            weight = getattr(module, "weight", None)
            linear = is_factorable(module) or (isinstance(weight, nn.Parameter) and weight.dim() == 2)
            if name != "experts" and linear and dense_weight(module).shape[0] <= count:
                found[f"{block_name}.{name}" if block_name else name] = (
                    "router", f"routes tokens to the {count} experts: small and sensitive; left dense")
    return found


def _task_heads(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Linear layers outside the base model (``model.base_model``), when the model has a head around one."""
    base = getattr(model, "base_model", model)
    if base is model:
        return {}
    inside = {id(m) for m in base.modules()}
    prefix = next(n for n, m in model.named_modules() if m is base)
    return {name: ("task head", f"task head, outside the base model `{prefix}`; left dense as lm_head is")
            for name, module in model.named_modules()
            if is_factorable(module) and id(module) not in inside}
