"""Mixture-of-experts layers as one linear map per expert, so each expert's matrices can be factored.

transformers 5 stores the experts of a layer as fused 3-D parameters (Mixtral, Qwen2/3-MoE, DeepSeek, …):

    mlp.experts.gate_up_proj  (E, 2·I, H)        mlp.experts.down_proj  (E, H, I)

:class:`FactoredExperts` takes that module's place and holds one module per expert and projection,
named after the fused tensor, ``mlp.experts.gate_up_proj.3``: an nn.Linear (dense) or a
LowRankLinear (factored). The MoE block calls it as it called the fused module, with the routing it
computed (``top_k_index``, ``top_k_weights``), so routing is untouched:

    x (tokens, H) ──router (mlp.gate)──▶ top-k experts and weights per token
    tokens routed to e ─▶ gate_up_proj[e] ─▶ act(g)·u ─▶ down_proj[e] ─▶ × weight ─▶ Σ into y

Supported are the experts classes written for transformers' experts interface
(``@use_experts_implementation``: layout flags ``has_gate``, ``has_bias``, ``is_transposed``); the fused
module itself is kept, its weights on the meta device, to gate as its class does and to be fused again
(:meth:`FactoredExperts.fused`) for a dense export.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .layers import LowRankLinear

_LAYOUT_FLAGS = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm")
_EXPERT_INDEX = re.compile(r"((?:^|\.)experts\.\w+)\.\d+$")  # "….experts.<projection>.<e>"


@dataclass(frozen=True)
class ExpertsLayout:
    """How a fused experts module stores its weights: what a loader needs to rebuild it."""

    num_experts: int
    shapes: dict  # projection name → (out, in) of one expert, nn.Linear orientation
    bias: bool  # per-expert biases ``<projection>_bias`` (E, out)
    transposed: bool  # fused tensors stored (E, in, out) instead of (E, out, in)
    class_name: str  # the fused module's class, e.g. MixtralExperts

    def manifest(self) -> dict:
        """JSON-able record for ``lora_compress.json``."""
        return {"class": self.class_name, "num_experts": self.num_experts, "bias": self.bias,
                "transposed": self.transposed, "projections": {p: list(s) for p, s in self.shapes.items()}}


def experts_layout(module: nn.Module) -> ExpertsLayout | None:
    """The layout of a supported fused experts module, or None for any other module."""
    if not all(hasattr(module, flag) for flag in _LAYOUT_FLAGS):
        return None
    projections = ("gate_up_proj" if module.has_gate else "up_proj", "down_proj")
    weights = [getattr(module, p, None) for p in projections]
    if not all(isinstance(w, nn.Parameter) and w.dim() == 3 for w in weights):
        return None
    expected = set(projections) | ({f"{p}_bias" for p in projections} if module.has_bias else set())
    if set(dict(module.named_parameters(recurse=False))) != expected:
        return None  # weights this module does not know how to route
    shapes = {p: tuple(w.shape[1:][::-1]) if module.is_transposed else tuple(w.shape[1:])
              for p, w in zip(projections, weights)}
    return ExpertsLayout(weights[0].shape[0], shapes, bool(module.has_bias), bool(module.is_transposed),
                         type(module).__name__)


def fused_tensor_names(module: nn.Module) -> tuple[str, ...]:
    """The 3-D expert parameters of a module (supported or not), by leaf name."""
    return tuple(n for n, p in module.named_parameters(recurse=False) if p.dim() == 3)


class FactoredExperts(nn.Module):
    """The experts of one MoE layer, one module per expert and projection, routed by the MoE block.

    ``<projection>[e]`` is an nn.Linear (out×in, as the fused tensor's slice e) or a LowRankLinear.
    Every expert is visited, also one that receives no token (its input has 0 rows), so that
    calibration statistics exist for each expert.
    """

    def __init__(self, template: nn.Module, layout: ExpertsLayout):
        super().__init__()
        self.layout = layout
        object.__setattr__(self, "template", template)  # not a submodule: its weights are on meta, never saved
        self.projections = tuple(layout.shapes)
        for projection, (out_features, in_features) in layout.shapes.items():
            setattr(self, projection, nn.ModuleList(
                nn.Linear(in_features, out_features, bias=layout.bias, device="meta")
                for _ in range(layout.num_experts)))
        if template.has_post_expert_norm:
            self.post_expert_norm = template.post_expert_norm

    @classmethod
    @torch.no_grad()
    def from_fused(cls, module: nn.Module) -> "FactoredExperts":
        """The same experts, split: expert e's slice of each fused tensor becomes its own nn.Linear."""
        layout = experts_layout(module)
        experts = cls(module, layout)
        for projection in layout.shapes:
            fused = getattr(module, projection)  # (E, out, in), or (E, in, out) when transposed
            bias = getattr(module, f"{projection}_bias") if layout.bias else None  # (E, out)
            for index, linear in enumerate(getattr(experts, projection)):
                weight = fused[index].T if layout.transposed else fused[index]
                linear.weight = nn.Parameter(weight.clone(), requires_grad=fused.requires_grad)
                if bias is not None:
                    linear.bias = nn.Parameter(bias[index].clone(), requires_grad=bias.requires_grad)
        for name, param in list(module.named_parameters(recurse=False)):
            module.register_parameter(name, nn.Parameter(param.to("meta"), requires_grad=param.requires_grad))
        return experts

    def expert_modules(self) -> dict[str, nn.Module]:
        """``"<projection>.<e>"`` → that expert's module, projection by projection."""
        return {f"{p}.{i}": m for p in self.projections for i, m in enumerate(getattr(self, p))}

    @torch.no_grad()
    def fused(self) -> nn.Module:
        """The original experts module holding every expert's dense weight again (B·A where factored)."""
        module = self.template
        for projection in self.projections:
            experts = getattr(self, projection)
            trainable = next(experts[0].parameters()).requires_grad
            weights = [dense_expert_weight(m) for m in experts]  # (out, in) each
            stacked = torch.stack([w.T if self.layout.transposed else w for w in weights])
            module.register_parameter(projection, nn.Parameter(stacked.contiguous(), requires_grad=trainable))
            if self.layout.bias:
                biases = torch.stack([m.bias.detach() for m in experts])  # (E, out)
                module.register_parameter(f"{projection}_bias", nn.Parameter(biases, requires_grad=trainable))
        return module

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        output = torch.zeros_like(hidden_states)  # (tokens, H)
        first, down = getattr(self, self.projections[0]), getattr(self, self.projections[1])
        for index in range(self.layout.num_experts):
            token, slot = torch.where(top_k_index == index)  # (n_e,), (n_e,)
            h = first[index](hidden_states[token])  # (n_e, 2·I) or (n_e, I)
            h = self.template._apply_gate(h) if self.template.has_gate else self.template.act_fn(h)  # (n_e, I)
            h = down[index](h)  # (n_e, H)
            if self.template.has_post_expert_norm:
                h = self.post_expert_norm(h)
            output.index_add_(0, token, (h * top_k_weights[token, slot, None]).to(output.dtype))
        return output

    def extra_repr(self) -> str:
        return f"{self.layout.class_name}, num_experts={self.layout.num_experts}"


def dense_expert_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) matrix of one expert's module: its weight, or B·A when factored."""
    if isinstance(module, LowRankLinear):
        return (module.lora_B.float() @ module.lora_A.float()).to(module.lora_A.dtype)
    return module.weight.detach()


def fused_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Every supported fused experts module of ``model``, by name."""
    return {n: m for n, m in model.named_modules() if experts_layout(m) is not None}


def fused_expert_names(model: nn.Module) -> list[str]:
    """``"<experts>.<projection>.<e>"`` of every expert's matrix still inside a fused module: the names
    it gets once split, which --include/--exclude patterns may name."""
    return [f"{name}.{projection}.{index}" for name, module in fused_experts(model).items()
            for projection in experts_layout(module).shapes for index in range(experts_layout(module).num_experts)]


def factored_experts(model: nn.Module) -> dict[str, FactoredExperts]:
    """Every FactoredExperts module of ``model``, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FactoredExperts)}


def unfuse_experts_(model: nn.Module, names=None) -> dict[str, FactoredExperts]:
    """Replace fused experts modules (every supported one, or those in ``names``) by FactoredExperts.

    The weights are copied into the per-expert modules and the fused tensors moved to the meta device,
    so memory holds each expert once. Returns the new modules by name.
    """
    from .patch import replace_module

    chosen = {n: m for n, m in fused_experts(model).items() if names is None or n in names}
    for name, module in chosen.items():
        replace_module(model, name, FactoredExperts.from_fused(module))
    return {name: model.get_submodule(name) for name in chosen}


def fuse_experts_(model: nn.Module, names=None) -> None:
    """Put the fused module back in place of FactoredExperts modules (all, or those in ``names``)."""
    from .patch import replace_module

    for name, module in factored_experts(model).items():
        if names is None or name in names:
            replace_module(model, name, module.fused())


def expert_of(model: nn.Module, name: str) -> tuple[str, str, int] | None:
    """``(experts module name, projection, expert index)`` when ``name`` is one expert's matrix
    (``…experts.gate_up_proj.3``), whether the experts are split or still fused; else None."""
    owner, _, index = name.rpartition(".")
    experts_name, _, projection = owner.rpartition(".")
    if not index.isdigit() or not experts_name:
        return None
    try:
        module = model.get_submodule(experts_name)
    except AttributeError:
        return None
    layout = module.layout if isinstance(module, FactoredExperts) else experts_layout(module)
    if layout is None or projection not in layout.shapes or int(index) >= layout.num_experts:
        return None
    return experts_name, projection, int(index)


def fused_name(name: str) -> str:
    """An expert's matrix named by its fused tensor, ``…experts.gate_up_proj.3`` → ``…experts.gate_up_proj``
    (read off the name alone; other names are returned as they are)."""
    return _EXPERT_INDEX.sub(r"\1", name)


def experts_by_matrix(model: nn.Module, names) -> dict[str, list[str]]:
    """Experts' matrices among ``names`` grouped by the fused tensor they come from
    (``…experts.gate_up_proj`` → ``[…experts.gate_up_proj.0, …]``), in the order given."""
    groups: dict[str, list[str]] = {}
    for name in names:
        found = expert_of(model, name)
        if found is not None:
            groups.setdefault(f"{found[0]}.{found[1]}", []).append(name)
    return groups


def expert_weight_numel(model: nn.Module, name: str) -> int | None:
    """Weight elements of one expert's matrix ``name`` while its experts are fused; None otherwise."""
    found = expert_of(model, name)
    if found is None or isinstance(model.get_submodule(found[0]), FactoredExperts):
        return None
    out_features, in_features = experts_layout(model.get_submodule(found[0])).shapes[found[1]]
    return out_features * in_features


def experts_manifest(model: nn.Module) -> dict:
    """``{experts module name: layout}`` of every split experts module, for the manifest: a loader
    splits these (:func:`unfuse_experts_`) before it installs the factors of their experts."""
    return {name: module.layout.manifest() for name, module in factored_experts(model).items()}


def expert_sources(name: str, module: FactoredExperts) -> dict[str, tuple[str, int, bool]]:
    """Where each tensor of a split experts module ``name`` lies in the fused checkpoint:
    ``"<name>.<projection>.<e>.weight"`` → (``"<name>.<projection>"``, e, transposed), biases alike."""
    sources = {}
    for projection in module.projections:
        for index in range(module.layout.num_experts):
            prefix = f"{name}.{projection}.{index}"
            sources[f"{prefix}.weight"] = (f"{name}.{projection}", index, module.layout.transposed)
            if module.layout.bias:
                sources[f"{prefix}.bias"] = (f"{name}.{projection}_bias", index, False)
    return sources


def tie_factor_(model: nn.Module, name: str, factor: str, owner: str) -> None:
    """Make LowRankLinear ``name`` use ``owner``'s ``factor`` (``lora_A`` or ``lora_B``) itself: one tensor,
    a basis shared across experts (core/shared_basis.py)."""
    setattr(model.get_submodule(name), factor, getattr(model.get_submodule(owner), factor))


def tie_shared_factors_(model: nn.Module, layers: dict) -> None:
    """Tie every factor a manifest's layer table records as shared (``"shared": {"factor", "with"}``)."""
    for name, layer in layers.items():
        if layer.get("shared") and layer.get("rank") is not None:
            tie_factor_(model, name, layer["shared"]["factor"], layer["shared"]["with"])
