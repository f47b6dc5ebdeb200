"""What healing is asked (HealConfig) and what it did (HealReport, HealStep per optimizer step)."""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

from torch import nn

from ..errors import LoraCompressWarning, OptionError

TRAIN_SETS = ("AB", "B", "lora")
LOSSES = ("auto", "kl", "hidden", "kl+hidden", "kl+blocks")
PRECISIONS = ("auto", "float32", "bfloat16")


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
    generate_minutes: float | None = None  # stop writing them after this long (those written are kept)
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
            raise OptionError("give {steps} or {minutes} (or both) to bound healing")
        for name in ("steps", "minutes", "lr", "lora_rank", "calib_len", "calib_samples", "batch_size", "clip",
                     "block_weight", "generate_minutes"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise OptionError(f"{{{name}}} {value} must be positive")
        for name, value, choices in (("train", self.train, TRAIN_SETS), ("loss", self.loss, LOSSES),
                                     ("precision", self.precision, PRECISIONS)):
            if value not in choices:
                raise OptionError(f"{{{name}}} {value!r} is unknown; choose one of {', '.join(choices)}")
        if self.held_out < 1:
            raise OptionError(f"{{held_out}} {self.held_out} must be at least 1 sequence")
        if self.warmup < 0 or self.weight_decay < 0 or self.generate < 0:
            raise OptionError("{warmup}, {weight_decay} and {generate} must not be negative")

    def settings(self) -> dict:
        """The config as plain JSON-able data."""
        return asdict(self)


@dataclass
class HealStep:
    """What the optional callback of :func:`lora_compress.healing.loop.heal_` sees after each optimizer step."""

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
    stopped: str = ""  # steps | time | nan | callback (the callback asked)
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


def resolve_loss(loss: str, model: nn.Module) -> str:
    """``auto`` → ``kl`` for a model with an LM head, ``hidden`` otherwise; a KL loss needs a head.

    Raises:
        LoraCompressError: a KL loss asked of a model without an LM head.
    """
    has_head = getattr(model, "get_output_embeddings", lambda: None)() is not None
    if loss == "auto":
        return "kl" if has_head else "hidden"
    if "kl" in loss and not has_head:
        raise OptionError(f"{{loss}} {loss} needs an LM head, which this model lacks; use {{loss}} hidden")
    return loss
