"""The PEFT LoRA adapter folder, written and read: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT computes W + (lora_alpha/r)·B·A. Σ goes into B (core/svd.py's convention) and every layer gets
lora_alpha = r (alpha_pattern = rank_pattern), so the scale is 1 in PEFT, vLLM and anything else.
A and B are stored in the nn.Linear orientation; GPT-2 Conv1D layers set fan_in_fan_out.

What a LoRA cannot hold is carried the way PEFT carries it: changed biases of factored layers as
``lora_B.bias`` (lora_bias = true); any other changed module (norms, embeddings, lm_head, a layer
left out by --exclude) whole, through ``modules_to_save``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core import svd as svdmath
from ..core.layers import dense_weight
from ..errors import LoraCompressError
from ..storage.checkpoint import check_weight_files, is_causal_lm


ADAPTER_CONFIG = "adapter_config.json"


ADAPTER_WEIGHTS = "adapter_model.safetensors"


PEFT_PREFIX = "base_model.model."


@dataclass
class Deltas:
    """Everything that differs between base and tuned, sorted by how an adapter carries it."""

    weights: dict[str, torch.Tensor]  # targeted layer → Δ (out, in), float32
    biases: dict[str, torch.Tensor]  # factored layer → Δbias (out,)
    whole: dict[str, torch.Tensor]  # parameter name → tuned tensor, for modules_to_save
    unchanged: list[str]
    conv1d: set[str]


@torch.no_grad()
def merge_(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], biases: dict | None = None,
           whole: dict | None = None) -> nn.Module:
    """Add B·A (and bias deltas) to the named layers and copy whole tensors in, in place.

    Args:
        factors: layer name → (B (out×r), A (r×in)), any scale already folded in.
        biases: layer name → bias delta (out,).
        whole: parameter name → tensor that replaces it.
    """
    for name, (B, A) in factors.items():
        weight = dense_weight(model.get_submodule(name))  # (out, in); a view for Conv1D
        weight.add_((B.float() @ A.float()).to(weight.dtype))
    for name, bias in (biases or {}).items():
        target = model.get_submodule(name).bias
        target.add_(bias.to(target.dtype))
    for name, tensor in (whole or {}).items():
        model.get_parameter(name).copy_(tensor)
    return model


def module_names(parameters: dict) -> list[str]:
    """The modules that own the named parameters, sorted."""
    return sorted({name.rpartition(".")[0] for name in parameters})


def write_adapter(folder: Path, factors: dict[str, svdmath.Factors], deltas: Deltas, model: nn.Module,
                  base_name: str) -> dict:
    """``adapter_model.safetensors`` (PEFT key names) and ``adapter_config.json`` into ``folder``."""
    dtype = next(model.parameters()).dtype
    tensors = {}
    for name, f in factors.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = f.A.to(dtype).contiguous()  # (r, in)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = f.B.to(dtype).contiguous()  # (out, r)
        if deltas.biases:  # lora_bias is all or nothing in PEFT: zeros where the bias did not change
            bias = deltas.biases.get(name, torch.zeros(f.B.shape[0]))
            tensors[f"{PEFT_PREFIX}{name}.lora_B.bias"] = bias.to(dtype).contiguous()  # (out,)
    config = adapter_config({n: f.rank for n, f in factors.items()}, model, base_name,
                            conv1d=bool(deltas.conv1d & set(factors)), saved_whole=module_names(deltas.whole),
                            lora_bias=bool(deltas.biases))
    whole = dict(deltas.whole)
    if config.get("ensure_weight_tying"):  # PEFT then expects the tied output embedding's copy as well
        whole[f"{_module_name(model, model.get_output_embeddings())}.weight"] = \
            whole[f"{_module_name(model, model.get_input_embeddings())}.weight"]
    for name, tensor in whole.items():
        tensors[f"{PEFT_PREFIX}{name}"] = tensor.detach().clone().contiguous()
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return config


def adapter_config(ranks: dict[str, int], model: nn.Module, base_name: str, *, conv1d: bool = False,
                   saved_whole: list[str] = (), lora_bias: bool = False) -> dict:
    """A PEFT LoraConfig as JSON: the commonest rank as ``r``, the others in rank/alpha patterns, scale 1."""
    from collections import Counter

    r = Counter(ranks.values()).most_common(1)[0][0]
    others = {name: rank for name, rank in ranks.items() if rank != r}
    config = {"peft_type": "LORA", "task_type": task_type(model), "base_model_name_or_path": base_name,
              "r": r, "lora_alpha": r, "target_modules": sorted(ranks), "rank_pattern": others,
              "alpha_pattern": dict(others), "fan_in_fan_out": conv1d, "lora_dropout": 0.0, "bias": "none",
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": list(saved_whole) or None}
    if lora_bias:
        config["lora_bias"] = True
    if saved_whole and _ties_embeddings(model) and model.get_input_embeddings() in \
            [model.get_submodule(name) for name in saved_whole]:
        config["ensure_weight_tying"] = True
    return config


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def _ties_embeddings(model: nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and head.weight is model.get_input_embeddings().weight


def task_type(model: nn.Module) -> str | None:
    """PEFT's task type: what PeftModel.from_pretrained wraps the base model as."""
    if is_causal_lm(model):
        return "CAUSAL_LM"
    return "FEATURE_EXTRACTION" if type(model).__name__.endswith("Model") else None


def read_adapter_config(folder: Path) -> dict:
    """``adapter_config.json`` of a plain PEFT LoRA adapter folder.

    Raises:
        LoraCompressError: missing or unreadable, or not a plain LoRA (another PEFT method, DoRA).
    """
    path = Path(folder) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise LoraCompressError(f"{path} is missing or not valid JSON ({error}); pass a PEFT adapter folder") from None
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise LoraCompressError(f"{folder} is a {config.get('peft_type')} adapter{' with DoRA' if config.get('use_dora') else ''}; "
                                f"only plain LoRA adapters are merged here; merge it with peft's merge_and_unload()")
    return config


def merge_adapter_(model: nn.Module, folder: str | Path) -> nn.Module:
    """Merge a PEFT LoRA adapter folder into ``model`` in place: W += (alpha/r)·B·A per layer.

    Handles rank/alpha patterns, rsLoRA, fan_in_fan_out, lora_B.bias and modules_to_save.

    Raises:
        LoraCompressError: the config or the weights name modules that ``model`` does not have.
    """
    folder = Path(folder)
    config = read_adapter_config(folder)
    _check_target_modules(model, config, folder)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise LoraCompressError(f"{folder} has no {ADAPTER_WEIGHTS}; pass a PEFT adapter folder saved with safetensors")
    check_weight_files([folder / ADAPTER_WEIGHTS])
    parts, whole = _split_adapter(load_file(str(folder / ADAPTER_WEIGHTS)))
    modules, params = dict(model.named_modules()), dict(model.named_parameters(remove_duplicate=False))
    for name in [*parts, *whole]:
        if name not in modules and name not in params:
            raise LoraCompressError(f"{folder.name} holds weights for {name}, which is not in the base model; "
                                    f"pass the base the adapter was made for (--base)")
    factors, biases = {}, {}
    for name, part in parts.items():
        scale = _scale(config, name, part["A"].shape[0])
        factors[name] = (part["B"] * scale, part["A"])
        if "bias" in part:
            biases[name] = part["bias"] * scale
    return merge_(model, factors, biases, whole)


def _split_adapter(tensors: dict) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """PEFT keys → {layer: {A, B, bias}} and {parameter: tensor} for modules_to_save."""
    parts, whole = {}, {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        match = re.fullmatch(r"(.+)\.lora_(A\.weight|B\.weight|B\.bias)", name)
        if match:
            parts.setdefault(match[1], {})[{"A.weight": "A", "B.weight": "B", "B.bias": "bias"}[match[2]]] = tensor
        else:
            whole[name] = tensor
    return parts, whole


def _check_target_modules(model: nn.Module, config: dict, folder: Path) -> None:
    """Every name in target_modules must match a module (PEFT's rule: equal or a dotted suffix)."""
    names = [name for name, _ in model.named_modules()]
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, name) for name in names):
            raise LoraCompressError(f"{folder.name} targets {targets!r}, which matches no module of the base model; "
                                    f"pass the base the adapter was made for (--base)")
        return
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            raise LoraCompressError(f"{folder.name} targets module {target}, which is not in the base model; "
                                    f"pass the base the adapter was made for (--base)")


def _scale(config: dict, name: str, rank: int) -> float:
    """PEFT's scale for one layer: alpha/r, or alpha/√r with rsLoRA; alpha_pattern as PEFT matches it."""
    alpha = config.get("lora_alpha", 8)
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            alpha = value
            break
    return alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
