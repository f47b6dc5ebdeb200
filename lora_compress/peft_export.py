"""Fine-tunes as PEFT LoRA adapters, and lora-compress folders as plain dense checkpoints.

Extraction factors what fine-tuning changed in each targeted linear layer::

    W_tuned − W_base  =  Δ (out×in)  ≈  lora_B (out×r) · lora_A (r×in)        (truncated SVD)

PEFT computes W + (lora_alpha/r)·B·A. Σ goes into B (svd.py's convention) and every layer gets
lora_alpha = r (alpha_pattern = rank_pattern), so the scale is 1 in PEFT, vLLM and anything else.
A and B are stored in the nn.Linear orientation; GPT-2 Conv1D layers set fan_in_fan_out.

What a LoRA cannot hold is carried the way PEFT carries it: changed biases of factored layers as
``lora_B.bias`` (lora_bias = true); any other changed module (norms, embeddings, lm_head, a layer
left out by --exclude) whole, through ``modules_to_save``.

Rank options (exactly one):
    rank    the same r for every changed layer; a layer smaller than r keeps its full rank
            min(out, in) instead (exact) and the report says so
    energy  per layer, the smallest r keeping that fraction of the delta's Σσ²
    budget  adapter weights Σ r·(m+n) at most ``budget`` × Σ m·n, the dense size of the changed
            layers' deltas; ranks go to the largest σ² per parameter first, across all layers
With calibration text, the delta is also factored activation-aware (SVD of Δ·L, L Lᵀ = XᵀX of
the tuned model's layer inputs); both are checked on held-out calibration tokens and the one
with the lower output error is written.
"""
from __future__ import annotations

import copy
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import svd as svdmath
from .card import Card, manifest_settings, write_card
from .checkpoint import (MANIFEST, Source, atomic_folder, check_output_folder, check_weight_files,
                         copy_side_files, factored_modules, load, load_dense, load_tokenizer, read_manifest,
                         resolve_source)
from .compress import check_finite_float
from .errors import LoraCompressError
from .layers import dense_weight, is_conv1d
from .patch import replace_module
from .targets import find_targets

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class ExtractConfig:
    """How to turn a fine-tune's delta into a LoRA adapter; validated on creation."""

    rank: int | None = None  # one rank for every changed layer (capped at its smaller dimension)
    energy: float | None = None  # keep this fraction of each delta's Σσ²
    budget: float | None = None  # adapter weights as a fraction of the changed layers' dense Σ m·n
    include: tuple[str, ...] = ()  # regexes on module names; empty = every linear layer
    exclude: tuple[str, ...] = ()  # regexes on module names never factored (saved whole if changed)
    svd: str = "auto"  # auto | full | randomized | gram (energy and budget always use the full SVD)
    seed: int = 0  # seed of the randomized SVD
    calib_samples: int = 16  # with calibration text: sequences; 3/4 fit the factors, 1/4 check them
    calib_len: int = 256  # tokens per calibration sequence
    check_tokens: int = 512  # without calibration text: random token ids the output check runs on

    def __post_init__(self):
        chosen = [name for name in ("rank", "energy", "budget") if getattr(self, name) is not None]
        if len(chosen) != 1:
            given = ", ".join(f"--{n}" for n in chosen) or "none"
            raise LoraCompressError(f"give exactly one of --rank, --energy, --budget (got {given})")
        if self.rank is not None and self.rank <= 0:
            raise LoraCompressError(f"--rank {self.rank} must be a positive integer")
        for name in ("energy", "budget"):
            value = getattr(self, name)
            if value is not None and not (0 < value <= 1):
                raise LoraCompressError(f"--{name} {value} is outside (0, 1]; pass a fraction such as 0.9")
        if self.svd not in svdmath.SVD_METHODS:
            raise LoraCompressError(f"--svd {self.svd!r} is unknown; choose one of {', '.join(svdmath.SVD_METHODS)}")
        if self.calib_samples < 2 or self.calib_len < 2 or self.check_tokens < 4:
            raise LoraCompressError("calibration needs at least 2 samples of 2 tokens and 4 check tokens; raise them")

    def settings(self) -> dict:
        """The config as plain JSON-able data."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass
class ExtractedLayer:
    """One factored delta."""

    name: str
    shape: tuple[int, int]  # (out, in), nn.Linear orientation
    rank: int
    energy_kept: float  # of Δ (or Δ·L when activation-aware)
    note: str = ""

    @property
    def params(self) -> int:
        """lora_A + lora_B elements (a lora_B.bias is not counted)."""
        return self.rank * sum(self.shape)


@dataclass
class ExtractionReport:
    """What extraction did, layer by layer, and how close base + adapter comes to the tuned model."""

    config: ExtractConfig
    layers: list[ExtractedLayer] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # targeted layers whose delta is zero (skipped)
    saved_whole: list[str] = field(default_factory=list)  # modules_to_save
    bias_layers: list[str] = field(default_factory=list)  # factored layers whose bias changed
    method: str = "svd"  # svd (plain) | whitened (activation-aware)
    output_error: dict = field(default_factory=dict)  # variant → {logits_rel_error, kl_per_token, …}
    check_inputs: str = ""  # what the output check ran on
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def dense_params(self) -> int:
        """Σ m·n of the factored layers: what the deltas hold densely."""
        return sum(layer.shape[0] * layer.shape[1] for layer in self.layers)


@dataclass
class _Deltas:
    """Everything that differs between base and tuned, sorted by how an adapter carries it."""

    weights: dict[str, torch.Tensor]  # targeted layer → Δ (out, in), float32
    biases: dict[str, torch.Tensor]  # factored layer → Δbias (out,)
    whole: dict[str, torch.Tensor]  # parameter name → tuned tensor, for modules_to_save
    unchanged: list[str]
    conv1d: set[str]


def _check_same_architecture(base: nn.Module, tuned: nn.Module) -> None:
    """Same class, same parameter names and shapes; a different vocabulary is named as such."""
    if type(base) is not type(tuned):
        raise LoraCompressError(f"base is a {type(base).__name__} but tuned is a {type(tuned).__name__}; "
                                f"pass the checkpoint the fine-tune started from as --base")
    vocab_base = base.get_input_embeddings().weight.shape[0]
    vocab_tuned = tuned.get_input_embeddings().weight.shape[0]
    if vocab_base != vocab_tuned:
        raise LoraCompressError(f"the vocabulary differs (base {vocab_base} tokens, tuned {vocab_tuned}); a LoRA "
                                f"cannot add tokens: resize the base's embeddings to match first")
    base_params, tuned_params = dict(base.named_parameters()), dict(tuned.named_parameters())
    only_one = sorted(base_params.keys() ^ tuned_params.keys())
    if only_one:
        raise LoraCompressError(f"parameter {only_one[0]} is in only one of base and tuned; pass checkpoints of one "
                                f"architecture")
    for name, param in base_params.items():
        if param.shape != tuned_params[name].shape:
            raise LoraCompressError(f"{name} is {tuple(param.shape)} in base but {tuple(tuned_params[name].shape)} "
                                    f"in tuned; pass checkpoints of one architecture and size")


@torch.no_grad()
def model_deltas(base: nn.Module, tuned: nn.Module, include=(), exclude=()) -> _Deltas:
    """Compare two models of one architecture parameter by parameter.

    Raises:
        LoraCompressError: different architectures or shapes, or nothing changed at all.
    """
    _check_same_architecture(base, tuned)
    targets = find_targets(base, include, exclude)
    tuned_params = dict(tuned.named_parameters())
    deltas = _Deltas({}, {}, {}, [], {n for n, m in targets.items() if is_conv1d(m)})
    for name, module in targets.items():
        check_finite_float(name, dense_weight(tuned.get_submodule(name)))
        delta = dense_weight(tuned.get_submodule(name)).float() - dense_weight(module).float()  # (out, in)
        bias = getattr(module, "bias", None)
        bias_delta = None if bias is None else tuned_params[f"{name}.bias"].float() - bias.float()
        if bool(delta.any()):
            deltas.weights[name] = delta
            if bias_delta is not None and bool(bias_delta.any()):
                deltas.biases[name] = bias_delta
        elif bias_delta is not None and bool(bias_delta.any()):  # only the bias changed: save the module whole
            deltas.whole.update({f"{name}.{p}": t for p, t in tuned.get_submodule(name).named_parameters()})
        else:
            deltas.unchanged.append(name)
    _changed_elsewhere(base, tuned_params, set(targets), deltas)
    if not deltas.weights and not deltas.whole:
        raise LoraCompressError("tuned is identical to base: there is nothing to extract; pass the fine-tuned "
                                "checkpoint as --tuned")
    return deltas


def _changed_elsewhere(base: nn.Module, tuned_params: dict, targets: set[str], deltas: _Deltas) -> None:
    """Changed parameters outside the factored layers: whole modules go to modules_to_save."""
    changed = {name.rpartition(".")[0] for name, param in base.named_parameters()
               if name.rpartition(".")[0] not in targets and not torch.equal(param, tuned_params[name])}
    for name, param in tuned_params.items():
        if name.rpartition(".")[0] in changed:
            deltas.whole[name] = param


@torch.no_grad()
def factor_deltas(weights: dict[str, torch.Tensor], config: ExtractConfig, gram=None,
                  progress: bool = True) -> tuple[dict[str, svdmath.Factors], dict[str, str]]:
    """Rank-chosen factors of each delta; activation-aware when ``gram(name)`` gives a layer's XᵀX.

    Returns:
        ``(factors, notes)``: factors per layer (layers given rank 0 by --budget left out) and
        a note for each layer whose rank was capped or zeroed.
    """
    full = {}
    for name, delta in tqdm(weights.items(), desc="factoring", unit="layer", disable=not progress):
        whitening = svdmath.cholesky_factor(gram(name))[0] if gram else None
        smallest = min(delta.shape)
        rank = smallest if config.rank is None else min(config.rank, smallest)
        svd = "full" if config.rank is None else config.svd
        full[name] = svdmath.factorize(delta, rank, whitening=whitening, svd=svd, seed=config.seed)
    ranks = _choose_ranks(full, weights, config)
    notes = {name: f"--rank {config.rank} capped at the smaller dimension (full rank, exact)" for name, f in full.items()
             if config.rank is not None and f.rank < config.rank}
    notes.update({name: "rank 0 under --budget; no adapter" for name, rank in ranks.items() if rank == 0})
    return {name: svdmath.truncate(f, ranks[name]) for name, f in full.items() if ranks[name] > 0}, notes


def _choose_ranks(full: dict, weights: dict, config: ExtractConfig) -> dict[str, int]:
    if config.rank is not None:
        return {name: f.rank for name, f in full.items()}
    if config.energy is not None:
        return {name: svdmath.rank_for_energy(f.singular_values, config.energy) for name, f in full.items()}
    return budget_ranks({n: f.singular_values for n, f in full.items()},
                        {n: tuple(w.shape) for n, w in weights.items()}, config.budget)


def budget_ranks(spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], budget: float) -> dict[str, int]:
    """Ranks whose Σ r·(m+n) stays within ``budget`` × Σ m·n, greedily by σ² per parameter.

    Each rank-1 component of a layer costs m+n parameters and removes σ² of squared error; taking
    components in order of σ²/(m+n) keeps each layer's components in σ order (equal cost per layer).
    """
    allowed = budget * sum(m * n for m, n in shapes.values())
    gains = [(float(s) ** 2 / sum(shapes[name]), name) for name, spectrum in spectra.items() for s in spectrum]
    ranks, used = dict.fromkeys(spectra, 0), 0
    for _, name in sorted(gains, key=lambda item: item[0], reverse=True):
        cost = sum(shapes[name])
        if used + cost <= allowed:
            ranks[name] += 1
            used += cost
    return ranks


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


def _model_output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) when the model has them, else the last hidden states (B, T, C)."""
    output = model(input_ids=ids)
    logits = getattr(output, "logits", None)
    return (logits if logits is not None else output.last_hidden_state).float()


@torch.no_grad()
def output_error(reference: list[torch.Tensor], model: nn.Module, inputs: list[torch.Tensor],
                 logits: bool = True) -> dict:
    """Relative Frobenius error of ``model``'s outputs against ``reference``; for causal LMs (``logits``)
    also KL(reference ‖ model) of the next-token distributions, per token."""
    diff_sq = ref_sq = kl = 0.0
    for want, ids in zip(reference, inputs):
        got = _model_output(model, ids)
        diff_sq += (got - want).pow(2).sum().item()
        ref_sq += want.pow(2).sum().item()
        if logits:
            kl += nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                       reduction="sum").item()
    error = (diff_sq / ref_sq) ** 0.5
    if not logits:
        return {"output_rel_error": error}
    return {"logits_rel_error": error, "kl_per_token": max(kl / sum(ids.numel() for ids in inputs), 0.0)}


def _check_inputs(tokenizer, text: str | None, config: ExtractConfig, vocab: int) -> tuple[list, list, str]:
    """(fit batches, check batches, description): calibration text split 3:1, else random ids."""
    if text is None:
        ids = torch.randint(0, vocab, (2, config.check_tokens // 2), generator=torch.Generator().manual_seed(config.seed))
        return [], [ids], f"{ids.numel()} random token ids (seed {config.seed}; pass --calib for real text)"
    from .calibrate import calibration_tokens

    if tokenizer is None:
        raise LoraCompressError("--calib needs a tokenizer but the base folder has none; copy its tokenizer files")
    tokens = calibration_tokens(tokenizer, text, config.calib_samples, config.calib_len)  # (S, T)
    fit = max(1, len(tokens) * 3 // 4)
    return list(tokens[:fit].split(4)), list(tokens[fit:].split(4)), \
        f"{tokens[fit:].numel()} held-out tokens of the --calib text ({tokens[:fit].numel()} fitted the factors)"


def extract(base: str, tuned: str, out: str | Path, config: ExtractConfig, *, calib: str | Path | None = None,
            force: bool = False, command: str | None = None, progress: bool = True) -> ExtractionReport:
    """Write a fine-tune (``tuned`` − ``base``) as a PEFT LoRA adapter folder ``out``.

    Args:
        base, tuned: checkpoint folders (or Hub ids) of one architecture.
        out: the adapter folder to write (adapter_config.json, adapter_model.safetensors, README.md).
        config: rank option, targets, SVD settings.
        calib: a text file; factor activation-aware too and keep what checks better.

    Returns:
        An ExtractionReport: per-layer ranks, and the output error of base + adapter against tuned.

    Example:
        >>> report = extract("models/base", "models/tuned", "out/adapter", ExtractConfig(rank=16))
        >>> model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("models/base"), "out/adapter")

    Raises:
        LoraCompressError: different architectures, nothing changed, an existing --out, bad text.
    """
    from .text import read_text

    start = time.perf_counter()
    check_output_folder(Path(out), force)
    base_source, tuned_source = resolve_source(base), resolve_source(tuned)
    base_model, tuned_model = load_dense(base_source), load_dense(tuned_source)
    deltas = model_deltas(base_model, tuned_model, config.include, config.exclude)
    if not deltas.weights:
        raise LoraCompressError(f"only modules a LoRA cannot hold changed ({', '.join(_modules(deltas.whole))}); "
                                f"share the tuned checkpoint itself instead of an adapter")
    text = read_text(calib, "--calib") if calib is not None else None
    fit, check, described = _check_inputs(load_tokenizer(base_source), text, config,
                                          base_model.get_input_embeddings().weight.shape[0])
    variants = {"svd": factor_deltas(deltas.weights, config, progress=progress)}
    if fit:
        variants["whitened"] = factor_deltas(deltas.weights, config, _grams(tuned_model, fit, deltas, progress),
                                             progress=progress)
    report = _compare(base_model, tuned_model, deltas, variants, check, config)
    report.check_inputs = described
    factors = variants[report.method][0]
    with atomic_folder(Path(out), force) as tmp:
        write_adapter(tmp, factors, deltas, base_model, base_source.name)
        report.seconds = time.perf_counter() - start
        write_card(tmp, _extraction_card(report, base_source.name, tuned, command), load_path=str(out))
    return report


def _grams(model: nn.Module, fit: list[torch.Tensor], deltas: _Deltas, progress: bool):
    """XᵀX of each changed layer's inputs in the tuned model (what base + adapter will see)."""
    from .calibrate import collect_statistics

    targets = {name: model.get_submodule(name) for name in deltas.weights}
    return collect_statistics(model, torch.cat(fit), targets, fisher=False, progress=progress).gram


def _compare(base_model, tuned_model, deltas: _Deltas, variants: dict, check: list, config) -> ExtractionReport:
    """Output error of base alone and of base + each variant's adapter; the lowest error wins."""
    reference = [_model_output(tuned_model, ids) for ids in check]
    logits = _task_type(tuned_model) == "CAUSAL_LM"
    report = ExtractionReport(config, unchanged=deltas.unchanged, saved_whole=_modules(deltas.whole),
                              bias_layers=sorted(deltas.biases))
    report.output_error["base"] = output_error(reference, base_model, check, logits)
    for variant, (factors, _) in variants.items():
        if not factors:
            raise LoraCompressError(f"--budget {config.budget} leaves every layer rank 0; raise the budget")
        candidate = merge_(copy.deepcopy(base_model), _pairs(factors), deltas.biases, deltas.whole)
        report.output_error[variant] = output_error(reference, candidate, check, logits)
    report.method = min(variants, key=lambda v: next(iter(report.output_error[v].values())))
    factors, notes = variants[report.method]
    report.layers = [ExtractedLayer(name, tuple(deltas.weights[name].shape), f.rank, f.energy_kept,
                                    notes.get(name, "")) for name, f in factors.items()]
    report.notes = _summary_notes(report, notes, deltas)
    return report


def _summary_notes(report: ExtractionReport, notes: dict[str, str], deltas: _Deltas) -> list[str]:
    """One line per kind of thing a user must know about the adapter."""
    lines = [f"{sum(1 for n in notes.values() if n == note)} layers: {note}" for note in sorted(set(notes.values()))]
    if report.saved_whole:
        lines.append(f"saved whole (modules_to_save): {', '.join(report.saved_whole)}")
    if report.bias_layers:
        lines.append(f"bias changes of {len(report.bias_layers)} layers carried as lora_B.bias (lora_bias=true); "
                     f"servers without lora_bias support (vLLM) drop them")
    if deltas.unchanged:
        lines.append(f"{len(deltas.unchanged)} targeted layers did not change and have no adapter")
    return lines


def _pairs(factors: dict[str, svdmath.Factors]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (f.B, f.A) for name, f in factors.items()}


def _modules(parameters: dict) -> list[str]:
    return sorted({name.rpartition(".")[0] for name in parameters})


def write_adapter(folder: Path, factors: dict[str, svdmath.Factors], deltas: _Deltas, model: nn.Module,
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
                            conv1d=bool(deltas.conv1d & set(factors)), saved_whole=_modules(deltas.whole),
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
    config = {"peft_type": "LORA", "task_type": _task_type(model), "base_model_name_or_path": base_name,
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


def _task_type(model: nn.Module) -> str | None:
    """PEFT's task type: what PeftModel.from_pretrained wraps the base model as."""
    from .evaluate import is_causal_lm

    if is_causal_lm(model):
        return "CAUSAL_LM"
    return "FEATURE_EXTRACTION" if type(model).__name__.endswith("Model") else None


def _extraction_card(report: ExtractionReport, base_name: str, tuned: str, command: str | None) -> Card:
    from .pipeline import versions

    method = {"svd": "truncated SVD of each layer's delta (tuned − base)",
              "whitened": "activation-aware truncated SVD of each layer's delta (SVD of Δ·L, L Lᵀ = XᵀX of "
                          "the tuned model's layer inputs on --calib text)"}[report.method]
    figures = {"layers factored": len(report.layers), "adapter parameters (lora_A + lora_B)": report.params,
               "dense parameters of those deltas": report.dense_params,
               **{f"{metric} vs tuned, {_VARIANTS[variant]}": value for variant, errors in report.output_error.items()
                  for metric, value in errors.items()},
               "output error measured on": report.check_inputs, "seconds": round(report.seconds, 1)}
    config = report.config
    settings = {"tuned model": tuned, "rank": config.rank, "energy": config.energy, "budget": config.budget,
                "include": config.include, "exclude": config.exclude, "svd": config.svd, "seed": config.seed,
                "versions": versions()}
    return Card("adapter", base_name, method, command or f"extract({base_name!r}, {tuned!r})", settings, figures,
                tuple(report.notes))


_VARIANTS = {"base": "base alone", "svd": "base + adapter (plain SVD)",
             "whitened": "base + adapter (activation-aware SVD)"}


def export_dense(folder: str | Path, out: str | Path, *, base: str | None = None, force: bool = False,
                 command: str | None = None) -> Path:
    """Write a plain transformers checkpoint of the original architecture to ``out``.

    ``folder`` is a compressed folder (B·A multiplied back into each factored layer) or a PEFT LoRA
    adapter folder (merged into ``base``, or into the base its config names). The result loads
    with ``AutoModel*.from_pretrained(out)`` and no lora-compress installed.

    Example:
        >>> export_dense("out/smollm2-50", "out/smollm2-50-plain")
        >>> AutoModelForCausalLM.from_pretrained("out/smollm2-50-plain")

    Raises:
        LoraCompressError: ``folder`` is neither kind, its base lacks the adapter's modules, ``out`` exists.
    """
    folder = Path(folder)
    check_output_folder(Path(out), force)
    if (folder / MANIFEST).is_file():
        model, source, card = _dense_from_compressed(folder, command)
    elif (folder / ADAPTER_CONFIG).is_file():
        model, source, card = _dense_from_adapter(folder, base, command)
    else:
        raise LoraCompressError(f"{folder} holds neither {MANIFEST} nor {ADAPTER_CONFIG}; pass a folder written by "
                                f"`lora-compress compress` or a PEFT LoRA adapter folder")
    with atomic_folder(Path(out), force) as tmp:
        model.save_pretrained(tmp)
        copy_side_files(source, model, load_tokenizer(source), tmp)
        write_card(tmp, card, load_path=str(out))
    return Path(out)


def _dense_from_compressed(folder: Path, command: str | None):
    manifest = read_manifest(folder)
    model = densify_(load(folder), {name for name, layer in manifest["layers"].items() if layer.get("conv1d")})
    card = Card("dense", manifest["base_model"], f"the compressed folder `{folder}` ({manifest['method']}) with "
                f"each layer's B·A multiplied back into a dense weight", command or f"export_dense({str(folder)!r})",
                {**manifest_settings(manifest), "compressed with": manifest.get("command")})
    return model, Source(folder, str(folder)), card


def _dense_from_adapter(folder: Path, base: str | None, command: str | None):
    config = read_adapter_config(folder)
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise LoraCompressError(f"{folder / ADAPTER_CONFIG} names no base model; pass --base BASE")
    source = resolve_source(base)
    model = merge_adapter_(load_dense(source), folder)
    card = Card("dense", source.name, f"the PEFT LoRA adapter `{folder}` merged into the base weights",
                command or f"export_dense({str(folder)!r}, base={base!r})", {"adapter": str(folder)})
    return model, source, card


@torch.no_grad()
def densify_(model: nn.Module, conv1d: set[str] = frozenset()) -> nn.Module:
    """Replace every LowRankLinear by the original layer type holding B·A (Conv1D for ``conv1d`` names)."""
    from transformers.pytorch_utils import Conv1D

    for name, module in factored_modules(model).items():
        weight = (module.lora_B.float() @ module.lora_A.float()).to(module.lora_A.dtype)  # (out, in)
        if name in conv1d:
            dense = Conv1D(module.out_features, module.in_features).to(weight)
            dense.weight.copy_(weight.T)  # Conv1D stores (in, out)
        else:
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None).to(weight)
            dense.weight.copy_(weight)
        if module.bias is not None:
            dense.bias.copy_(module.bias)
        replace_module(model, name, dense)
    return model


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
