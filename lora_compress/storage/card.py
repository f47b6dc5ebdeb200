"""README.md model cards: what an output folder holds, how it was made, and how to load it.

Every folder lora-compress writes gets one (compressed model, PEFT adapter, dense export), so a
folder found later on a disk or the Hub still says where it came from::

    ---                      YAML front matter the Hub reads (base_model, library_name, tags)
    # <title>
    what it is · base model · method · settings · the exact command · figures · how to load it
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .manifest import Manifest
from .remote_code import auto_class

CARD = "README.md"
KINDS = ("compressed", "adapter", "dense")


@dataclass(frozen=True)
class Card:
    """The facts a model card states."""

    kind: str  # compressed | adapter | dense
    base_model: str  # the checkpoint the folder derives from, as the user named it
    method: str  # one line: what was done
    command: str  # the exact command line (or library call)
    settings: dict = field(default_factory=dict)  # options that shaped the result
    figures: dict = field(default_factory=dict)  # measured figures; empty = not measured
    notes: tuple[str, ...] = ()  # anything a user must know (skipped layers, warnings)
    auto_class: str = "AutoModel"  # the transformers Auto class of the model's task (remote_code.auto_class)
    images: tuple[tuple[str, str], ...] = ()  # (what it shows, path relative to the folder) of each plot

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"card kind {self.kind!r} is unknown; choose one of {', '.join(KINDS)}")


def write_card(folder: str | Path, card: Card, load_path: str | None = None) -> Path:
    """Write ``README.md`` into ``folder``; ``load_path`` is the folder name shown in the snippets.

    Example:
        >>> write_card(tmp, Card("adapter", "HuggingFaceTB/SmolLM2-135M", "delta SVD", "lora-compress extract ..."),
        ...            load_path="out/adapter")
    """
    path = Path(folder) / CARD
    path.write_text(render_card(card, load_path or str(folder)))
    return path


def render_card(card: Card, load_path: str) -> str:
    """The card as markdown text."""
    parts = [_front_matter(card), f"# {Path(load_path).name}\n", _INTRO[card.kind] + "\n",
             "## How it was made\n", f"- Base model: `{card.base_model}`", f"- Method: {card.method}"]
    parts += [f"- {key}: `{_plain(value)}`" for key, value in card.settings.items() if value not in (None, (), [], {})]
    parts += ["", "Command:", "", "```", card.command, "```", "", "## Figures\n", _figures(card), ""]
    parts += [f"![{alt}]({image})\n" for alt, image in card.images]
    if card.notes:
        parts += ["## Notes\n", *[f"- {note}" for note in card.notes], ""]
    parts += ["## How to load it\n", _loading(card, load_path)]
    return "\n".join(parts)


def _front_matter(card: Card) -> str:
    library = {"compressed": "lora-compress", "adapter": "peft", "dense": "transformers"}[card.kind]
    return (f"---\nbase_model: {json.dumps(card.base_model)}\nlibrary_name: {library}\n"
            f"tags:\n- lora-compress\n- {card.kind}\n---\n")


def _plain(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _figures(card: Card) -> str:
    """Nested figures as a two-column markdown table (keys joined with dots)."""
    if not card.figures:
        return _NOT_MEASURED[card.kind]
    rows = ["| figure | value |", "|---|---|"]
    rows += [f"| {key} | {_format(value)} |" for key, value in _flatten(card.figures)]
    return "\n".join(rows)


def _flatten(figures: dict, prefix: str = ""):
    for key, value in figures.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


_NOT_MEASURED = {
    "compressed": "Not measured here; run `lora-compress evaluate BASE DIR --text FILE --tasks T` for drift, "
                  "perplexity and task accuracy.",
    "adapter": "Not measured here.",
    "dense": "Not measured here; evaluate it with lm-eval (below), or run `lora-compress evaluate` on the "
             "compressed folder it came from.",
}

_INTRO = {
    "compressed": "A compressed checkpoint written by lora-compress: chosen linear layers are replaced by "
                  "low-rank factors `lora_B · lora_A`; everything else is the base model's.",
    "adapter": "A PEFT LoRA adapter extracted by lora-compress from the difference between a fine-tuned "
               "checkpoint and its base model (tuned − base ≈ lora_B · lora_A per layer). Any scale is "
               "folded into `lora_B`; `lora_alpha` equals the rank, so PEFT's scale alpha/r is 1.",
    "dense": "A plain transformers checkpoint of the original architecture, exported by lora-compress "
             "(low-rank factors multiplied back into dense weights). It loads without lora-compress.",
}

def _loading(card: Card, path: str) -> str:
    """The card's code snippets, with the Auto class of the model's task."""
    text = _LOADING[card.kind].format(path=path, base=card.base_model, auto=card.auto_class)
    if card.kind != "adapter" and card.auto_class == "AutoModelForCausalLM":
        remote = ",trust_remote_code=True" if card.kind == "compressed" else ""
        text += f"\nlm-eval: `lm_eval --model hf --model_args pretrained={path}{remote} --tasks hellaswag`.\n"
        text += "" if remote else f"vLLM: `LLM(model=\"{path}\")`.\n"
    return text


_LOADING = {
    "compressed": """```python
from transformers import {auto}

model = {auto}.from_pretrained("{path}", trust_remote_code=True)   # transformers alone

import lora_compress as lc

model = lc.load("{path}")                     # the same model, through lora-compress
model = lc.apply_adapters({auto}.from_pretrained("{base}"), "{path}")   # or the factors onto the base
```

`trust_remote_code=True` runs `modeling_lora_compressed.py` from this folder (torch and transformers only):
it builds the base architecture with the factored layers in place. For tools that read only plain
checkpoints: `lora-compress export {path} --dense --out PLAIN`.
""",
    "adapter": """```python
from peft import PeftModel
from transformers import {auto}

base = {auto}.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{path}")
model = model.merge_and_unload()                 # optional: a plain model again
```

vLLM: `LLM(model="{base}", enable_lora=True)` and pass `LoRARequest("adapter", 1, "{path}")` to `generate`.
""",
    "dense": """```python
from transformers import {auto}

model = {auto}.from_pretrained("{path}")
```
""",
}


def compressed_card(manifest: Manifest, method: str | None = None, evaluation: dict | None = None,
                    images: tuple[tuple[str, str], ...] = ()) -> Card:
    """The card of a compressed folder, from its manifest (``lora_compress.json``).

    Args:
        method: the one-line description of the method (the registry's summary), else the manifest's name.
        evaluation: the figures of ``lora-compress evaluate`` (jobs.evaluate), when measured.
        images: the report's plots, as (what it shows, path relative to the folder).
    """
    layers = manifest.layers.values()
    factored = sum(1 for layer in layers if layer.factored)
    params = manifest.targeted_params
    figures = {"layers factored": f"{factored} of {len(layers)} targeted",
               "targeted weight parameters, dense": params["dense"],
               "targeted weight parameters, compressed": params["compressed"],
               "kept fraction": round(params["compressed"] / max(params["dense"], 1), 4)}
    figures.update(loss_target_figures((manifest.calibration or {}).get("loss_target")))
    figures.update(evaluation_figures(evaluation or {}))
    figures.update(healing_figures(manifest.healing))
    notes = () if evaluation else ("Output drift, perplexity and task accuracy were not measured at compress time; "
                                   "run `lora-compress evaluate BASE DIR --text FILE --tasks T`.",)
    return Card("compressed", manifest.base_model, method or manifest.method, manifest.command,
                {**manifest_settings(manifest), "versions": manifest.versions}, figures, notes,
                auto_class(manifest.model_class), tuple(images))


def healing_figures(healing: dict | None) -> dict:
    """The healing entry's figures worth a line on the card: held-out distillation loss before → after."""
    if not healing:
        return {}
    loss = f"{_format(healing.get('held_out_before'))} → {_format(healing.get('held_out_after'))}"
    kept = healing.get("kept")
    figures = {"healing, held-out calibration loss": loss, "healing, minutes": round(healing.get("minutes", 0), 2)}
    if kept:
        figures["healing, factors kept"] = kept if kept == "healed" else f"unhealed: {healing.get('why_unhealed')}"
    return figures


def loss_target_figures(found: dict | None) -> dict:
    """The quality target's line on the card (``compress --max-loss-rise``): predicted and measured rise."""
    if not found:
        return {}
    tightened = f", after {len(found['tries']) - 1} tightening(s)" if len(found["tries"]) > 1 else ""
    return {f"mean next-token loss rise on {found['held_out_sequences']} held-out calibration sequences, "
            f"predicted / measured (nats)": f"{found['predicted']:.4f} / {found['measured']:.4f} "
            f"(target {found['max_loss_rise']:g}, {'met' if found['met'] else 'missed'}{tightened})"}


def evaluation_figures(evaluation: dict) -> dict:
    """The figures of an evaluation worth a line on the card: dense → compressed."""
    figures, text = {}, Path(evaluation.get("text", "")).name
    if "perplexity" in evaluation:
        ppl = evaluation["perplexity"]
        figures[f"perplexity on {text}, dense → compressed"] = f"{ppl['dense']:.4g} → {ppl['compressed']:.4g}"
    for key, value in evaluation.get("drift", {}).items():
        figures[f"{key.replace('_', ' ')} on {text}"] = value
    for task, metrics in evaluation.get("tasks", {}).items():
        for metric, pair in metrics.get("metrics", {}).items():
            figures[f"lm-eval {task} {metric}, dense → compressed"] = f"{pair['dense']:.4g} → {pair['compressed']:.4g}"
    if "disk" in evaluation:
        figures["weight bytes on disk, compressed / dense"] = round(evaluation["disk"]["ratio"], 4)
    return figures


def manifest_settings(manifest: Manifest) -> dict:
    """The compress settings worth stating (calibration sizes only when there was calibration, given or written)."""
    settings = {**manifest.settings, **manifest.run}
    return {key: value for key, value in settings.items() if settings.get("calib") or settings.get("calib_generated")
            or not key.startswith("calib_")}
