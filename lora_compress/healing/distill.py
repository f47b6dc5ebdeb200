"""Healing: fine-tune a compressed model's factors to match its dense teacher (distillation).

    teacher (dense, frozen) ─► features h_t ─► cached once ─► teacher head ─► p_t
    student (factored)      ─► features h_s ────────────────► student head ─► p_s

    loss "kl":     KL(p_t ‖ p_s), mean per token               (causal LMs; the default there)
    loss "hidden": ‖h_s − h_t‖² / ‖h_t‖² over the batch          (encoders; the default there)
    loss "kl+blocks": KL plus ``block_weight`` × the mean per-token ‖h_s − h_t‖²/‖h_t‖² at up to
                   BLOCK_TARGETS evenly spaced decoder-block outputs (causal LMs)

Features are the last hidden states (the input of the LM head), with the matched block outputs
stacked before them for "blocks"; the teacher's are cached, so it runs at most once per
calibration sequence (on first use), never again in later epochs.

``generate`` adds teacher-written sequences to the training set (teacher_text.py): a short text
is otherwise learnt by heart, and new contexts generalise better (SmolLM2, 15 minutes, 20% cut:
31.90 → 31.48 alice perplexity; 40%: 57.90 → 54.15).

What learns (``train``): "AB" both factors of every LowRankLinear, first rebalanced so each rank
component has equal norms in B and A (B·A unchanged); "B" only lora_B; "lora" a small extra
LoRA (b·a, b starting at zero) on each factored layer, concatenated into the factors at the end
(rank grows by ``lora_rank``). Every other parameter stays bit-identical. Training runs in eval
mode (no dropout) with float32 weights and AdamW state, linear warm-up, cosine decay and gradient
clipping. The student's transformer body runs in bfloat16 autocast where the device has fast bf16
kernels (``precision``: about 1.35× the steps per minute on an AVX512-BF16 CPU, same loss per step
on a well-compressed model); the LM heads, the KL and the teacher's cached features stay float32,
because bf16 logits shift the KL. On a badly broken model (plain SVD, KL ≈ 5.7) bf16 steps still
heal less per step than float32 ones: pass ``--precision float32`` there.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..calibrate.forward import forward
from ..calibrate.seq2seq import is_encoder_decoder
from ..calibrate.tokens import read_calibration_text
from ..core.layers import LowRankLinear
from ..core.patch import replace_module
from ..core.precision import bf16_is_fast
from ..errors import LoraCompressError, LoraCompressWarning
from ..storage.checkpoint import Source, copy_side_files, load_dense, load_tokenizer, resolve_source
from ..storage.compressed import factored_modules, load, read_manifest, write_compressed
from ..storage.output import atomic_folder, check_output_folder, holds_outputs
from .kl import linear_kl
from .teacher_text import teacher_sequences

TRAIN_SETS = ("AB", "B", "lora")
LOSSES = ("auto", "kl", "hidden", "kl+hidden", "kl+blocks")
BLOCK_TARGETS = 8  # decoder-block outputs matched by the "blocks" loss term (evenly spaced)
PRECISIONS = ("auto", "float32", "bfloat16")
SEQ_LEN = 512  # default tokens per training sequence (capped at the model's context)


@dataclass(frozen=True)
class HealConfig:
    """How to heal; validated on creation. Give ``steps``, ``minutes`` or both (first reached stops)."""

    steps: int | None = None  # optimizer steps; the learning-rate schedule spans them
    minutes: float | None = None  # training wall-clock budget; spans the schedule when steps is None
    lr: float = 3e-4  # peak AdamW learning rate
    train: str = "AB"  # AB | B | lora: which parameters learn
    lora_rank: int = 8  # rank of the extra LoRA when train == "lora"
    loss: str = "auto"  # auto (kl for causal LMs, hidden for encoders) | kl | hidden | kl+hidden | kl+blocks
    block_weight: float = 1.0  # weight of the block-output term of "kl+blocks"
    calib_len: int | None = None  # tokens per calibration sequence; None = 512, or the model's context if shorter
    calib_samples: int | None = None  # at most this many calibration sequences (held-out ones included); None = all
    batch_size: int = 2  # sequences per step
    warmup: int = 10  # steps of linear warm-up, then cosine decay to 10% of lr
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    clip: float = 1.0  # gradient-norm clipping
    held_out: int = 8  # calibration sequences kept out of training (the text's last ones)
    generate: int = 0  # teacher-written sequences added to the training set (causal LMs; their time counts)
    seed: int = 0  # batch order and extra-LoRA init
    checkpointing: bool = False  # gradient checkpointing: less activation memory, more time
    precision: str = "auto"  # student body matmuls: bfloat16 autocast (auto: where the device has fast bf16
    # kernels) or float32; weights, optimizer state, heads, KL, teacher features and held-out loss stay float32
    seq_len: int | None = None  # deprecated spelling of calib_len

    def __post_init__(self):
        if self.seq_len is not None:
            warnings.warn("seq_len (--seq-len) is deprecated; use calib_len (--calib-len)", LoraCompressWarning,
                          stacklevel=3)
            object.__setattr__(self, "calib_len", self.seq_len)
            object.__setattr__(self, "seq_len", None)
        if self.steps is None and self.minutes is None:
            raise LoraCompressError("give --steps or --minutes (or both) to bound healing")
        for name in ("steps", "minutes", "lr", "lora_rank", "calib_len", "calib_samples", "batch_size", "clip",
                     "block_weight"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise LoraCompressError(f"--{name.replace('_', '-')} {value} must be positive")
        if self.train not in TRAIN_SETS:
            raise LoraCompressError(f"--train {self.train!r} is unknown; choose one of {', '.join(TRAIN_SETS)}")
        if self.loss not in LOSSES:
            raise LoraCompressError(f"--loss {self.loss!r} is unknown; choose one of {', '.join(LOSSES)}")
        if self.precision not in PRECISIONS:
            raise LoraCompressError(f"--precision {self.precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
        if self.held_out < 1:
            raise LoraCompressError(f"held_out {self.held_out} must be at least 1 sequence")
        if self.warmup < 0 or self.weight_decay < 0 or self.generate < 0:
            raise LoraCompressError("--warmup, --weight-decay and --generate must not be negative")

    def settings(self) -> dict:
        """The config as plain JSON-able data."""
        return asdict(self)


@dataclass
class HealStep:
    """What the optional callback of :func:`heal_` sees after each optimizer step."""

    step: int
    minutes: float  # training wall time so far
    loss: float
    model: nn.Module


@dataclass
class HealReport:
    """The outcome of a healing run: held-out loss before/after, loss history, why it stopped."""

    config: HealConfig
    loss: str  # the loss actually used (auto resolved)
    precision: str = ""  # the precision actually used (auto resolved)
    held_out_before: float = math.nan
    held_out_after: float = math.nan
    history: list[dict] = field(default_factory=list)  # {"step", "minutes", "loss"} per step
    stopped: str = ""  # steps | time | nan
    note: str = ""
    minutes: float = 0.0  # training wall time
    teacher_minutes: float = 0.0  # teacher forwards: held-out set first, training sequences on first use
    generation_minutes: float = 0.0  # writing the teacher's sequences (part of the time budget)
    trained_params: int = 0
    tokens: dict = field(default_factory=dict)  # {"train": n, "held_out": n}

    @property
    def steps(self) -> int:
        return self.history[-1]["step"] if self.history else 0

    def manifest(self, **extra) -> dict:
        """The manifest's ``healing`` entry (``extra``: calib file, teacher, command)."""
        settings = {**self.config.settings(), "loss": self.loss, "precision": self.precision, **extra}
        return {"settings": settings, "history": self.history, "held_out_before": self.held_out_before,
                "held_out_after": self.held_out_after, "stopped": self.stopped, "note": self.note,
                "steps": self.steps, "minutes": self.minutes, "teacher_minutes": self.teacher_minutes,
                "generation_minutes": self.generation_minutes,
                "trained_params": self.trained_params, "tokens": self.tokens}


@dataclass
class _Data:
    """Calibration sequences, split train / held-out, with the teacher's features cached.

    Training sequences get their teacher features on first use, so a short run never pays for
    a teacher pass over text it does not reach; later epochs read the cache.
    """

    teacher: nn.Module
    train_ids: torch.Tensor  # (N, T)
    held_ids: torch.Tensor  # (M, T)
    head: nn.Module | None  # the teacher's output embedding (KL losses only)
    blocks: bool = False  # cache matched block outputs too ("blocks" loss)
    cache: dict[int, torch.Tensor] = field(default_factory=dict)  # train sequence → (T, C), (K + 1, T, C) with blocks
    held_targets: torch.Tensor | None = None  # (M, T, C) float32
    teacher_seconds: float = 0.0

    @torch.no_grad()
    def teacher_features(self, ids: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        result = features(self.teacher, ids, self.blocks).float()  # (B, T, C) or (B, K + 1, T, C)
        self.teacher_seconds += time.perf_counter() - start
        return result

    def train_targets(self, index: torch.Tensor) -> torch.Tensor:
        """Teacher features of training sequences ``index``: (B, T, C)."""
        missing = [i for i in index.tolist() if i not in self.cache]
        if missing:
            self.cache.update(zip(missing, self.teacher_features(self.train_ids[missing])))
        return torch.stack([self.cache[i] for i in index.tolist()])


@holds_outputs()
def heal(folder: str | Path, calib: str | Path, out: str | Path, config: HealConfig, *,
         base: str | None = None, gguf_file: str | None = None, force: bool = False, command: str | None = None,
         progress: bool = True, teacher: str | None = None) -> HealReport:
    """Heal a compressed folder against its dense base model (the teacher) and write the result to ``out``.

    The teacher is the manifest's ``base_model`` unless ``base`` names another checkpoint (``gguf_file``:
    a GGUF file inside it). ``calib`` is a text file or a ``datasets`` name. ``out`` has the same
    format as ``folder``; its manifest gains a ``healing`` entry. ``teacher`` is the deprecated
    spelling of ``base``.

    Example:
        >>> report = heal("out/smol-80", "asyoulik.txt", "out/smol-80-healed", HealConfig(minutes=15))
        >>> report.held_out_before, report.held_out_after

    Raises:
        LoraCompressError: not a compressed folder, text too short, base missing or different,
            ``out`` exists (without ``force``). Nothing is written then.
    """
    if teacher is not None:
        warnings.warn("teacher (--teacher) is deprecated; use base (--base)", LoraCompressWarning, stacklevel=2)
        base = base or teacher
    folder, out = Path(folder), Path(out)
    manifest = read_manifest(folder)
    if any(layer.get("shared") for layer in manifest["layers"].values()):
        raise LoraCompressError(f"{folder} shares one basis across experts (--method {manifest['method']}), which heal "
                                f"does not train: it trains each layer's own factors; heal a folder of another method")
    check_output_folder(out, force, inputs=(folder, base))
    text = read_calibration_text(str(calib))
    source = Source(folder.resolve(), str(folder))
    tokenizer = load_tokenizer(source)
    if tokenizer is None:
        raise LoraCompressError(f"{folder} has no tokenizer; copy the base model's tokenizer files into it")
    model, dense = load(folder), _load_base(base, gguf_file, manifest)
    report = heal_(model, dense, tokenizer, text, config, progress=progress)
    del dense
    healing = report.manifest(calib=str(calib), teacher=base or manifest["base_model"], command=command)
    if "healing" in manifest:
        healing["previous"] = manifest["healing"]
    manifest = {**manifest, "healing": healing, "layers": _layers_with_ranks(manifest["layers"], model)}
    with atomic_folder(out, force, inputs=(folder, base)) as tmp:
        copy_side_files(source, model, tokenizer, tmp)
        write_compressed(tmp, model, manifest)
    return report


def _load_base(base: str | None, gguf_file: str | None, manifest: dict) -> nn.Module:
    """``base``, else the checkpoint the folder was compressed from: the folder it was read from
    while that still exists (the recorded name may be a path relative to another directory)."""
    folder = manifest.get("base_model_folder")
    name = base or (folder if folder and Path(folder).is_dir() else manifest["base_model"])
    try:
        return load_dense(resolve_source(name, gguf_file if base else manifest.get("gguf_file")))
    except LoraCompressError as error:
        raise LoraCompressError(f"base model {name}: {error} (or pass --base with the dense model)") from None


def _layers_with_ranks(layers: dict, model: nn.Module) -> dict:
    """The manifest's layer table with each factored layer's current rank (grown by train=lora)."""
    modules = factored_modules(model)
    return {name: {**layer, "rank": modules[name].rank if name in modules else layer["rank"]}
            for name, layer in layers.items()}


def heal_(model: nn.Module, teacher: nn.Module, tokenizer, text: str, config: HealConfig, *,
          progress: bool = True, callback: Callable[[HealStep], None] | None = None) -> HealReport:
    """Fine-tune ``model``'s factors in place so its outputs match ``teacher``'s on ``text``.

    Args:
        model: a compressed model (with LowRankLinear layers), e.g. from :func:`load`.
        teacher: the dense model it was compressed from (left unchanged).
        tokenizer: their tokenizer.
        text: calibration text; its last ``held_out`` sequences are never trained on.
        config: steps / time budget, learning rate, trained set, loss.
        callback: called with a :class:`HealStep` after every optimizer step.

    Returns:
        A HealReport. On a NaN loss training stops and the last weights with a finite loss are kept.

    Raises:
        LoraCompressError: no factored layers, text too short, teacher shapes differ, or the loss is
            not finite before training.
    """
    config = _with_calib_len(config, model)
    _check_pair(model, teacher, config)
    report = HealReport(config, _loss_kind(config.loss, model),
                        resolve_precision(next(model.parameters()).device, config.precision))
    data = _prepare_data(teacher, tokenizer, text, config, report.loss)
    config = _add_teacher_text(teacher, data, config, report)
    report.tokens = {"train": data.train_ids.numel(), "held_out": data.held_ids.numel()}
    dtype, grad_flags = next(model.parameters()).dtype, {p: p.requires_grad for p in model.parameters()}
    model.float()  # train in float32 whatever the storage dtype; casting back is exact for frozen tensors
    torch.manual_seed(config.seed)
    params, extra = _trainable(model, config)
    try:
        report.trained_params = sum(p.numel() for p in params)
        report.held_out_before = _held_out_loss(model, data, report.loss, config)
        if not math.isfinite(report.held_out_before):
            raise LoraCompressError("the compressed model's loss is not finite before healing; compress it again")
        _train(model, params, data, config, report, progress, callback)
        report.held_out_after = _held_out_loss(model, data, report.loss, config)
        report.teacher_minutes = data.teacher_seconds / 60
        if extra:
            extra.merge_(model)
    finally:
        if extra:
            extra.remove()
        _restore(model, dtype, grad_flags)
    return report


def _add_teacher_text(teacher: nn.Module, data: _Data, config: HealConfig, report: HealReport) -> HealConfig:
    """Append ``config.generate`` teacher-written sequences to the training set; returns the config
    with the time they took taken off the budget."""
    if not config.generate:
        return config
    if data.head is None:
        raise LoraCompressError("--generate needs a causal LM (a KL loss); drop it for this model")
    start = time.perf_counter()
    written = teacher_sequences(teacher, data.train_ids, config.generate, config.seed, report.precision == "bfloat16")
    data.train_ids = torch.cat([data.train_ids, written])
    report.generation_minutes = (time.perf_counter() - start) / 60
    if config.minutes is None:
        return config
    if report.generation_minutes >= config.minutes:
        raise LoraCompressError(f"writing {config.generate} teacher sequences took {report.generation_minutes:.1f} "
                                f"of the {config.minutes:g} minutes; lower --generate or raise --minutes")
    return replace(config, minutes=config.minutes - report.generation_minutes)


def _restore(model: nn.Module, dtype: torch.dtype, grad_flags: dict) -> None:
    model.to(dtype)
    model.activation_checkpointing_disable() if model.is_activation_checkpointing else None
    for p in model.parameters():
        p.requires_grad_(grad_flags.get(p, True))
    model.eval()


def _loss_kind(loss: str, model: nn.Module) -> str:
    has_head = getattr(model, "get_output_embeddings", lambda: None)() is not None
    if loss == "auto":
        return "kl" if has_head else "hidden"
    if "kl" in loss and not has_head:
        raise LoraCompressError(f"--loss {loss} needs an LM head, which this model lacks; use --loss hidden")
    return loss


def _with_calib_len(config: HealConfig, model: nn.Module) -> HealConfig:
    """``config`` with ``calib_len`` set: the default is SEQ_LEN, or the model's positions if fewer."""
    if config.calib_len is not None:
        return config
    positions = getattr(model.config, "max_position_embeddings", None) or SEQ_LEN
    return replace(config, calib_len=min(SEQ_LEN, positions))


def _check_pair(model: nn.Module, teacher: nn.Module, config: HealConfig) -> None:
    """A compressed student, and a teacher whose untouched tensors have the student's shapes."""
    factored = factored_modules(model)
    if not factored:
        raise LoraCompressError("the model has no factored layers to heal; compress it first")
    if is_encoder_decoder(model):
        raise LoraCompressError(f"{type(model).__name__} is an encoder-decoder; heal distils causal LMs and encoders, "
                                f"not encoder-decoders yet (compress, evaluate and export work)")
    shapes = {n: p.shape for n, p in teacher.named_parameters()}
    for name, param in model.named_parameters():
        if name.rpartition(".")[0] not in factored and shapes.get(name) != param.shape:
            found = tuple(shapes[name]) if name in shapes else "missing"
            raise LoraCompressError(f"the base model's {name} is {found}, the compressed model's {tuple(param.shape)}; "
                                    f"pass --base with the model it was compressed from")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and config.calib_len > positions:
        raise LoraCompressError(f"--calib-len {config.calib_len} exceeds the model's {positions} positions; "
                                f"pass --calib-len {positions} or less")


def _sequences(tokenizer, text: str, config: HealConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping ``calib_len``-token sequences of ``text`` (at most ``calib_samples``): (train, held-out),
    the held-out last."""
    ids = tokenizer(text, return_tensors="pt", truncation=False)["input_ids"][0]  # (N,)
    count = min(len(ids) // config.calib_len, config.calib_samples or len(ids))
    if count < 2:
        raise LoraCompressError(f"--calib holds {len(ids):,} tokens; healing needs at least 2 × --calib-len "
                                f"{config.calib_len} (one to train on, one held out); pass a longer text")
    sequences = ids[: count * config.calib_len].view(count, config.calib_len).to(device)  # (count, T)
    held = min(config.held_out, count - 1)
    return sequences[:-held], sequences[-held:]


def features(model: nn.Module, ids: torch.Tensor, blocks: bool = False) -> torch.Tensor:
    """Last hidden states (the LM head's input for causal LMs): (B, T) → (B, T, C); with ``blocks``,
    the matched block outputs stacked before them: (B, K + 1, T, C)."""
    if not blocks:
        return forward(model.base_model, ids).last_hidden_state
    output = forward(model.base_model, ids, output_hidden_states=True)
    inner = output.hidden_states[1:-1]  # outputs of every decoder block but the last
    return torch.stack([*(inner[i] for i in block_indices(len(inner))), output.last_hidden_state], dim=1)


def block_indices(count: int) -> list[int]:
    """Up to BLOCK_TARGETS evenly spaced indices into ``count`` block outputs, the last one included."""
    picked = min(BLOCK_TARGETS, count)
    return [math.ceil((i + 1) * count / picked) - 1 for i in range(picked)]


def _prepare_data(teacher, tokenizer, text, config, loss) -> _Data:
    train_ids, held_ids = _sequences(tokenizer, text, config, next(teacher.parameters()).device)
    teacher.eval()
    data = _Data(teacher, train_ids, held_ids, teacher.get_output_embeddings() if "kl" in loss else None,
                 blocks="blocks" in loss)
    data.held_targets = torch.cat([data.teacher_features(ids) for ids in held_ids.split(config.batch_size)])
    return data


def distill_loss(model: nn.Module, head: nn.Module | None, ids: torch.Tensor, target: torch.Tensor,
                 loss: str, block_weight: float = 1.0) -> torch.Tensor:
    """The distillation loss of ``model`` on ``ids`` against the teacher's cached features ``target``."""
    hidden = features(model, ids, "blocks" in loss).float()  # (B, T, C) or (B, K + 1, T, C)
    total = hidden.new_zeros(())
    if "blocks" in loss:
        if hidden.shape[1] > 1:  # a one-block model has no block output before the last
            total = total + block_weight * _token_relative_error(hidden[:, :-1], target[:, :-1])
        hidden, target = hidden[:, -1], target[:, -1]
    if "hidden" in loss:
        total = total + (hidden - target).pow(2).sum() / target.pow(2).sum()
    if "kl" in loss:
        # logits stay float32 (bf16 rounding shifts the KL); the gradient's product runs at autocast's precision
        device = hidden.device.type
        low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
        total = total + linear_kl(hidden.flatten(0, 1), target.flatten(0, 1), model.get_output_embeddings(), head, low)
    return total


def _token_relative_error(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over tokens (and blocks) of ‖h_s − h_t‖² / ‖h_t‖²: per token, so the few tokens with
    massive activations (the first of a sequence) do not outweigh the rest."""
    return ((student - teacher).pow(2).sum(-1) / teacher.pow(2).sum(-1).clamp_min(1e-12)).mean()


@torch.no_grad()
def _held_out_loss(model: nn.Module, data: _Data, loss: str, config: HealConfig) -> float:
    """Mean distillation loss over the held-out sequences."""
    batches = zip(data.held_ids.split(config.batch_size), data.held_targets.split(config.batch_size))
    losses = [distill_loss(model, data.head, ids, target, loss, config.block_weight).item() * len(ids)
              for ids, target in batches]
    return sum(losses) / len(data.held_ids)


class _ExtraLora:
    """A rank-k LoRA added to each factored layer's output through forward hooks (scale 1)."""

    def __init__(self, modules: dict[str, LowRankLinear], rank: int):
        device = next(iter(modules.values())).lora_A.device
        self.a = {n: nn.Parameter((torch.randn(rank, m.in_features) / m.in_features ** 0.5).to(device))  # (k, in)
                  for n, m in modules.items()}
        self.b = {n: nn.Parameter(torch.zeros(m.out_features, rank, device=device))  # (out, k)
                  for n, m in modules.items()}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def add_lora(module, args, output):
            return output + F.linear(F.linear(args[0], self.a[name]), self.b[name])
        return add_lora

    def parameters(self) -> list[nn.Parameter]:
        return list(self.a.values()) + list(self.b.values())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    @torch.no_grad()
    def merge_(self, model: nn.Module) -> None:
        """Remove the hooks; each layer becomes [B, b]·[A; a] (rank r + k), the old factors unchanged."""
        self.remove()
        for name, module in factored_modules(model).items():
            B = torch.cat([module.lora_B, self.b[name].to(module.lora_B)], dim=1)  # (out, r + k)
            A = torch.cat([module.lora_A, self.a[name].to(module.lora_A)], dim=0)  # (r + k, in)
            replace_module(model, name, LowRankLinear.from_factors(B, A, module.bias))


def _trainable(model: nn.Module, config: HealConfig) -> tuple[list[nn.Parameter], _ExtraLora | None]:
    """Freeze everything, then unfreeze the trained set; returns it (and the extra LoRA, if any)."""
    model.requires_grad_(False)
    modules = factored_modules(model)
    _distillation_mode(model, config.checkpointing)
    if config.train == "lora":
        extra = _ExtraLora(modules, config.lora_rank)
        return extra.parameters(), extra
    params = [m.lora_B for m in modules.values()]
    if config.train == "AB":
        _balance_(modules.values())
        params += [m.lora_A for m in modules.values()]
    for param in params:
        param.requires_grad_(True)
    return params, None


@torch.no_grad()
def _balance_(modules) -> None:
    """Give each rank component equal norms in B and A (product unchanged, up to rounding).

    SVD factors carry Σ in B: B's entries are ~10⁴ times A's, and Adam's per-entry steps of ~lr
    would then wreck A and barely move B.
    """
    for module in modules:
        scale = (module.lora_A.norm(dim=1) / module.lora_B.norm(dim=0).clamp_min(1e-30)).sqrt()  # (r,)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        module.lora_B.mul_(scale)
        module.lora_A.div_(scale.unsqueeze(1))


def _distillation_mode(model: nn.Module, checkpointing: bool) -> None:
    """Eval mode (no dropout: the teacher ran without it); checkpointed blocks alone flagged as
    training, because transformers checkpoints a block only then."""
    model.eval()
    if not checkpointing:
        return
    try:
        model.activation_checkpointing_enable()
    except ValueError:
        raise LoraCompressError(f"{type(model).__name__} does not support gradient checkpointing; "
                                f"drop --checkpointing") from None
    for module in model.modules():
        module.training = module.training or getattr(module, "gradient_checkpointing", False) is True


def resolve_precision(device: torch.device, precision: str) -> str:
    """``auto`` → ``bfloat16`` where the device has fast bf16 kernels, else ``float32``."""
    if precision != "auto":
        return precision
    return "bfloat16" if bf16_is_fast(device) else "float32"


def autocast(device: torch.device, precision: str):
    """The autocast context for training steps at a resolved ``precision``: bfloat16 matmuls, or a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")


def _lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from 1 to 0.1 as progress goes 0 → 1."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _batches(count: int, size: int, generator: torch.Generator):
    """Endless seeded shuffles of range(count), ``size`` indices at a time."""
    while True:
        order = torch.randperm(count, generator=generator)
        for i in range(0, count - size + 1 if count >= size else 1, size):
            yield order[i: i + size]


def _train(model, params, data: _Data, config: HealConfig, report: HealReport, progress, callback) -> None:
    """The optimisation loop; fills report.history / stopped / note / minutes."""
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    good = [p.detach().clone() for p in params]  # the last weights whose loss was finite
    batches = _batches(len(data.train_ids), config.batch_size, torch.Generator().manual_seed(config.seed))
    bar = tqdm(total=config.steps, desc="healing", unit="step", disable=not progress)
    start, last, step = time.perf_counter(), 0.0, 0
    while not _stopped(report, config, step, elapsed := time.perf_counter() - start, last):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(step, _progress(config, step, elapsed), config.warmup)
        index = next(batches)
        targets = data.train_targets(index)
        with autocast(params[0].device, report.precision):
            loss = distill_loss(model, data.head, data.train_ids[index], targets, report.loss, config.block_weight)
        if not torch.isfinite(loss):  # these weights are bad: back to those of the previous step
            _stop_on_nan(params, good, report, step, kept=max(step - 1, 0))
            break
        _copy(good, params)
        loss.backward()
        if not torch.isfinite(torch.nn.utils.clip_grad_norm_(params, config.clip)):  # keep these weights
            _stop_on_nan(params, good, report, step, kept=step)
            break
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step, last = step + 1, time.perf_counter() - start - elapsed
        report.history.append({"step": step, "minutes": (elapsed + last) / 60, "loss": loss.item()})
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", minutes=f"{(elapsed + last) / 60:.1f}")
        if callback:
            callback(HealStep(step, (elapsed + last) / 60, loss.item(), model))
    bar.close()
    report.minutes = (time.perf_counter() - start) / 60


def _stopped(report: HealReport, config: HealConfig, step: int, elapsed: float, last: float) -> bool:
    """True (and report.stopped set) once the steps are done or the next step would overrun the budget."""
    if config.steps and step >= config.steps:
        report.stopped = "steps"
    elif config.minutes and elapsed + last > config.minutes * 60:  # last: the previous step's seconds
        report.stopped = "time"
    return bool(report.stopped)


def _progress(config: HealConfig, step: int, elapsed: float) -> float:
    """How far through the schedule: by steps when given, else by the time budget."""
    return step / config.steps if config.steps else elapsed / (config.minutes * 60)


@torch.no_grad()
def _copy(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    for target, source in zip(targets, sources):
        target.copy_(source)


def _stop_on_nan(params, good, report: HealReport, step: int, kept: int) -> None:
    _copy(params, good)
    report.stopped = "nan"
    report.note = (f"the loss (or its gradient) became NaN at step {step + 1}; kept the weights after "
                   f"step {kept}, the last with a finite loss; lower --lr")
