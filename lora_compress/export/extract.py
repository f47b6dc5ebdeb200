"""Fine-tunes as PEFT LoRA adapters: what fine-tuning changed in each targeted linear layer, factored::

    W_tuned − W_base  =  Δ (out×in)  ≈  lora_B (out×r) · lora_A (r×in)        (truncated SVD)

written as a PEFT adapter folder (peft_format.py).

Rank options (exactly one):
    rank    the same r for every changed layer; a layer smaller than r keeps its full rank
            min(out, in) instead (exact) and the report says so
    energy  per layer, the smallest r keeping that fraction of the delta's Σσ²
    budget  adapter weights Σ r·(m+n) at most ``budget`` × Σ m·n, the dense size of the changed
            layers' deltas; ranks go to the largest σ² per parameter first, across all layers
With calibration text, the delta is also factored activation-aware (``whiten``: SVD of Δ·L, L Lᵀ = XᵀX
of the tuned model's layer inputs); both are checked on held-out calibration tokens and the one
with the lower output error is written.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibrate.collectors import InputGram, forward_statistics
from ..calibrate.tokens import calibration_tokens, read_calibration_text
from ..core import svd as svdmath
from ..core.layers import check_finite_float, dense_weight, is_conv1d
from ..core.targets import find_targets
from ..core.whitening import Whitening
from ..errors import LoraCompressError
from ..methods.allocate import LayerCost, allocate
from ..storage.card import Card, write_card
from ..storage.checkpoint import load_dense, load_tokenizer, resolve_source
from ..storage.output import atomic_folder, check_output_folder, holds_outputs
from ..storage.remote_code import auto_class
from ..version import versions
from .peft_format import Deltas, merge_, module_names, task_type, write_adapter

@dataclass(frozen=True)
class ExtractConfig:
    """How to turn a fine-tune's delta into a LoRA adapter; validated on creation."""

    rank: int | None = None  # one rank for every changed layer (capped at its smaller dimension)
    energy: float | None = None  # keep this fraction of each delta's Σσ²
    budget: float | None = None  # adapter weights as a fraction of the changed layers' dense Σ m·n
    include: tuple[str, ...] = ()  # regexes on module names; empty = every linear layer
    exclude: tuple[str, ...] = ()  # regexes on module names never factored (saved whole if changed)
    solver: str = "auto"  # auto | full | randomized | gram (energy and budget always use the full SVD)
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
        if self.solver not in svdmath.SVD_METHODS:
            raise LoraCompressError(f"--solver {self.solver!r} is unknown; choose one of {', '.join(svdmath.SVD_METHODS)}")
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
    method: str = "svd"  # svd (plain) | whiten (activation-aware)
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
def model_deltas(base: nn.Module, tuned: nn.Module, include=(), exclude=()) -> Deltas:
    """Compare two models of one architecture parameter by parameter.

    Raises:
        LoraCompressError: different architectures or shapes, or nothing changed at all.
    """
    _check_same_architecture(base, tuned)
    targets = find_targets(base, include, exclude)
    tuned_params = dict(tuned.named_parameters())
    deltas = Deltas({}, {}, {}, [], {n for n, m in targets.items() if is_conv1d(m)})
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


def _changed_elsewhere(base: nn.Module, tuned_params: dict, targets: set[str], deltas: Deltas) -> None:
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
        smallest = min(delta.shape)
        rank = smallest if config.rank is None else min(config.rank, smallest)
        if gram is not None:  # the whitened SVD of the delta: the one Whitening the methods use
            full[name] = Whitening(delta, gram(name)).factors(rank)
        else:
            full[name] = svdmath.factorize(delta, rank, solver="full" if config.rank is None else config.solver,
                                           seed=config.seed)
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
    costs = {name: LayerCost.from_spectrum(tuple(weights[name].shape), f.singular_values.double().pow(2))
             for name, f in full.items()}
    return allocate(costs, config.budget, adapters=True)  # the one allocator, as compress --budget


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
    tokens = calibration_tokens(tokenizer, text, config.calib_samples, config.calib_len)  # (S, T)
    fit = max(1, len(tokens) * 3 // 4)
    return list(tokens[:fit].split(4)), list(tokens[fit:].split(4)), \
        f"{tokens[fit:].numel()} held-out tokens of the --calib text ({tokens[:fit].numel()} fitted the factors)"


@holds_outputs()
def extract(base: str, tuned: str, out: str | Path, config: ExtractConfig, *, calib: str | Path | None = None,
            gguf_file: str | None = None, tuned_gguf_file: str | None = None, force: bool = False,
            command: str | None = None, progress: bool = True) -> ExtractionReport:
    """Write a fine-tune (``tuned`` − ``base``) as a PEFT LoRA adapter folder ``out``.

    Args:
        base, tuned: checkpoint folders (or Hub ids) of one architecture.
        out: the adapter folder to write (adapter_config.json, adapter_model.safetensors, README.md).
        config: rank option, targets, SVD settings.
        calib: a text file or a ``datasets`` name; factor activation-aware too and keep what checks better.
        gguf_file, tuned_gguf_file: a GGUF file inside the base / tuned folder, when it holds one.

    Returns:
        An ExtractionReport: per-layer ranks, and the output error of base + adapter against tuned.

    Example:
        >>> report = extract("models/base", "models/tuned", "out/adapter", ExtractConfig(rank=16))
        >>> model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("models/base"), "out/adapter")

    Raises:
        LoraCompressError: different architectures, nothing changed, an existing --out, bad text.
    """
    start = time.perf_counter()
    check_output_folder(Path(out), force, inputs=(base, tuned))
    base_source, tuned_source = resolve_source(base, gguf_file), resolve_source(tuned, tuned_gguf_file)
    base_model, tuned_model = load_dense(base_source), load_dense(tuned_source)
    deltas = model_deltas(base_model, tuned_model, config.include, config.exclude)
    if not deltas.weights:
        raise LoraCompressError(f"only modules a LoRA cannot hold changed ({', '.join(module_names(deltas.whole))}); "
                                f"share the tuned checkpoint itself instead of an adapter")
    text = read_calibration_text(calib) if calib is not None else None
    fit, check, described = _check_inputs(load_tokenizer(base_source), text, config,
                                          base_model.get_input_embeddings().weight.shape[0])
    variants = {"svd": factor_deltas(deltas.weights, config, progress=progress)}
    if fit:
        variants["whiten"] = factor_deltas(deltas.weights, config, _grams(tuned_model, fit, deltas, progress),
                                             progress=progress)
    report = _compare(base_model, tuned_model, deltas, variants, check, config)
    report.check_inputs = described
    factors = variants[report.method][0]
    with atomic_folder(Path(out), force, inputs=(base, tuned)) as tmp:
        write_adapter(tmp, factors, deltas, base_model, base_source.name)
        report.seconds = time.perf_counter() - start
        card = _extraction_card(report, base_source.name, tuned, command)
        write_card(tmp, replace(card, auto_class=auto_class(type(base_model).__name__)), load_path=str(out))
    return report


def _grams(model: nn.Module, fit: list[torch.Tensor], deltas: Deltas, progress: bool):
    """``gram(name)``: XᵀX of each changed layer's inputs in the tuned model (what base + adapter will see)."""
    targets = {name: model.get_submodule(name) for name in deltas.weights}
    stats = forward_statistics(model, torch.cat(fit), targets, (InputGram(every_layer=True),), progress)
    return lambda name: stats[name]["gram"]


def _compare(base_model, tuned_model, deltas: Deltas, variants: dict, check: list, config) -> ExtractionReport:
    """Output error of base alone and of base + each variant's adapter; the lowest error wins."""
    reference = [_model_output(tuned_model, ids) for ids in check]
    logits = task_type(tuned_model) == "CAUSAL_LM"
    report = ExtractionReport(config, unchanged=deltas.unchanged, saved_whole=module_names(deltas.whole),
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


def _summary_notes(report: ExtractionReport, notes: dict[str, str], deltas: Deltas) -> list[str]:
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


def _extraction_card(report: ExtractionReport, base_name: str, tuned: str, command: str | None) -> Card:
    method = {"svd": "truncated SVD of each layer's delta (tuned − base)",
              "whiten": "activation-aware truncated SVD of each layer's delta (SVD of Δ·L, L Lᵀ = XᵀX of "
                          "the tuned model's layer inputs on --calib text)"}[report.method]
    figures = {"layers factored": len(report.layers), "adapter parameters (lora_A + lora_B)": report.params,
               "dense parameters of those deltas": report.dense_params,
               **{f"{metric} vs tuned, {_VARIANTS[variant]}": value for variant, errors in report.output_error.items()
                  for metric, value in errors.items()},
               "output error measured on": report.check_inputs, "seconds": round(report.seconds, 1)}
    config = report.config
    settings = {"tuned model": tuned, "rank": config.rank, "energy": config.energy, "budget": config.budget,
                "include": config.include, "exclude": config.exclude, "solver": config.solver, "seed": config.seed,
                "versions": versions()}
    return Card("adapter", base_name, method, command or f"extract({base_name!r}, {tuned!r})", settings, figures,
                tuple(report.notes))


_VARIANTS = {"base": "base alone", "svd": "base + adapter (plain SVD)",
             "whiten": "base + adapter (activation-aware SVD)"}


