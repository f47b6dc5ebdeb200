"""The report folder of a compressed model: report.md, report.json and PNG plots.

    DIR/report/
      report.json           manifest facts (settings, command, per-layer ranks) + the figures
                            ``lora-compress evaluate`` printed (key ``evaluation``), + healing
      report.md             the same, for people: savings, quality, per-layer table, the plots
      ranks.png             block × layer type: rank chosen and parameters kept
      energy.png            energy kept per factored layer
      drift_per_block.png   after evaluate: where the output error enters
      healing_loss.png      after heal: the loss curve

``compress`` writes it inside its output folder; ``evaluate`` rewrites it with its figures.
The whole folder is regenerated from the manifest and the evaluation figures each time, and
replaced atomically. matplotlib is a dependency; should it fail to import, the plots are skipped
and report.md says so. The model card (README.md) embeds the plots: :func:`report_images`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..evaluation.drift import describe
from ..storage.compressed import read_manifest
from ..storage.manifest import Manifest
from ..storage.output import atomic_folder, check_output_folder
from . import plots
from .tables import TASK_HEADER, task_rows

REPORT_DIR = "report"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
RANK_OPTIONS = ("rank", "ratio", "energy", "budget", "max_loss_rise")
IMAGES = {"ranks.png": "rank and parameters kept per layer", "energy.png": "energy kept per factored layer",
          "drift_per_block.png": "output drift per block", "healing_loss.png": "healing loss"}


def cut_label(settings: dict) -> str:
    """``energy 0.99, svd``: the rank option that set the cut, and the method."""
    option = next((f"{name} {settings[name]}" for name in RANK_OPTIONS if settings.get(name) is not None), "?")
    return f"{option}, {settings.get('method', 'svd')}"


def build_report(manifest: Manifest, evaluation: dict | None = None, evaluate_command: str | None = None) -> dict:
    """The report.json content: what the manifest says, plus evaluation figures when given."""
    healed = manifest.healing is not None
    return {
        "base_model": manifest.base_model,
        "base_model_folder": manifest.base_model_folder,
        "model_class": manifest.model_class,
        "cut": cut_label(manifest.settings) + (", healed" if healed else ""),
        "method": manifest.method,
        "settings": manifest.settings,
        "command": manifest.command,
        "versions": manifest.versions,
        "targeted_params": manifest.targeted_params,
        "layers": manifest.layer_table(),
        "calibration": manifest.calibration,
        "healing": manifest.healing,
        "evaluation": evaluation,
        "evaluate_command": evaluate_command,
    }


def title(report: dict) -> str:
    """``SmolLM2-135M-Instruct, energy 0.99, svd``: model name and cut, for plot titles."""
    return f"{Path(os.path.normpath(report['base_model'])).name}, {report['cut']}"


def write_report(folder: str | Path, manifest: Manifest | None = None, evaluation: dict | None = None,
                 evaluate_command: str | None = None, fix: str | None = None) -> Path:
    """(Re)write ``folder/report/`` from the manifest and, when given, evaluation figures.

    An earlier evaluation in the folder's report is kept when ``evaluation`` is None. Two runs
    writing one report take turns (the last one's stays). ``fix``: what to do when the folder
    cannot be written (the end of that message; see :func:`report_fix`).

    Example:
        >>> write_report("out/smol-99", evaluation=evaluate_folder("smol", "out/smol-99", "alice.txt"))

    Raises:
        LoraCompressError: not a compressed folder, or the folder is not writable.
    """
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    if evaluation is None:
        previous = read_existing(folder / REPORT_DIR / REPORT_JSON)
        evaluation, evaluate_command = previous.get("evaluation"), previous.get("evaluate_command")
    report = build_report(manifest, evaluation, evaluate_command)
    with atomic_folder(folder / REPORT_DIR, force=True, fix=fix, wait=True) as tmp:
        (tmp / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
        images, note = draw_plots(report, tmp)
        (tmp / REPORT_MD).write_text(render_markdown(report, images, note))
    return folder / REPORT_DIR


def report_fix(folder: str | Path) -> str:
    """What to do when a compressed folder's report cannot be rewritten in place (``evaluate``)."""
    return f"make {folder} writable or pass --no-report"


def check_report_place(folder: str | Path) -> None:
    """Before any compute: ``folder``'s report can be rewritten (``evaluate`` without --no-report).

    Raises:
        LoraCompressError: the folder is not writable.
    """
    check_output_folder(Path(folder) / REPORT_DIR, force=True, fix=report_fix(folder), wait=True)


def report_images(folder: str | Path) -> tuple[tuple[str, str], ...]:
    """The plots in ``folder/report/``, as (what it shows, path relative to ``folder``), for the model card."""
    folder = Path(folder) / REPORT_DIR
    return tuple((alt, f"{REPORT_DIR}/{name}") for name, alt in IMAGES.items() if (folder / name).is_file())


def read_existing(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def draw_plots(report: dict, folder: Path) -> tuple[dict[str, str], str]:
    """The report's PNGs into ``folder``: ``({key: file name}, note)``; note says why none were drawn."""
    if not plots.available():
        return {}, "Plots skipped: matplotlib cannot be imported (reinstall lora-compress, which depends on it)."
    name, images = title(report), {}
    images["ranks"] = plots.rank_heatmap(report["layers"], name, folder / "ranks.png").name
    if any(layer.get("energy_kept") for layer in report["layers"].values()):
        images["energy"] = plots.energy_per_layer(report["layers"], name, folder / "energy.png").name
    blocks = (report["evaluation"] or {}).get("blocks")
    if blocks:
        images["drift"] = plots.drift_per_block(blocks, name, folder / "drift_per_block.png").name
    if (report["healing"] or {}).get("history"):
        images["healing"] = plots.healing_loss(report["healing"], name, folder / "healing_loss.png").name
    return images, ""


def _table(rows: list[list], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def number(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_markdown(report: dict, images: dict[str, str], note: str = "") -> str:
    """report.md: settings and command, savings, quality, healing, per-layer table, plots."""
    sections = [_header(report), _savings(report), _quality(report, images), _healing(report, images),
                _layers(report, images)]
    return "\n\n".join(s for s in sections + ([note] if note else []) if s) + "\n"


def _header(report: dict) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in report["settings"].items() if v not in (None, [], {}, False)
                         and not (k.startswith("calib_") and not report["settings"].get("calib")))
    lines = [f"# Compression report: {title(report)}", "",
             f"- base model: `{report['base_model']}` ({report['model_class']})",
             f"- method: {report['method']}; settings: {settings}",
             f"- command: `{report['command']}`"]
    calibration = report.get("calibration")
    if calibration:
        lines.append(f"- calibration: {calibration.get('samples')} × {calibration.get('length')} tokens of "
                     f"`{calibration.get('text')}`, {calibration.get('seconds')} s, peak memory "
                     f"{calibration.get('peak_memory_mb')} MiB")
        target = calibration.get("loss_target")
        if target:
            lines.append(f"- loss target: mean next-token loss rise on {target['held_out_sequences']} held-out "
                         f"calibration sequences ({target['held_out_tokens']} tokens), predicted "
                         f"{target['predicted']:.4f}, measured {target['measured']:.4f} nats, target "
                         f"{target['max_loss_rise']:g} ({'met' if target['met'] else 'missed'}"
                         f"{', after tightening' if len(target['tries']) > 1 else ''}; dense loss "
                         f"{target['dense_loss']:.4f})")
        sparse = calibration.get("sparse_experts")
        if sparse:
            lines.append(f"- experts routed fewer than {sparse['min_tokens']} calibration tokens, factored from their "
                         f"weight spectrum (plain SVD): {len(sparse['tokens'])} "
                         f"({', '.join(f'`{n}` {t}' for n, t in sparse['tokens'].items())})")
    if report["evaluate_command"]:
        lines.append(f"- evaluated with: `{report['evaluate_command']}`")
    versions = report.get("versions") or {}
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return "\n".join(lines)


def _savings(report: dict) -> str:
    targeted, layers = report["targeted_params"], report["layers"].values()
    dense_layers = sum(1 for layer in layers if layer["rank"] is None)
    lines = ["## Savings", "",
             f"Targeted weights: {targeted['dense']:,} → {targeted['compressed']:,} "
             f"({targeted['compressed'] / targeted['dense']:.1%}); {len(layers) - dense_layers} of "
             f"{len(layers)} targeted layers factored, {dense_layers} left dense."]
    evaluation = report["evaluation"]
    if evaluation:
        params, disk = evaluation["params"], evaluation["disk"]
        lines += ["", _table([
            ["parameters, whole model", number(params["dense_total"]), number(params["compressed_total"]),
             f"{params['ratio_total']:.3f}"],
            ["parameters, targeted layers", number(params["dense_targeted"]), number(params["compressed_targeted"]),
             f"{params['ratio_targeted']:.3f}"],
            ["weight bytes on disk", number(disk["dense_bytes"]), number(disk["compressed_bytes"]),
             f"{disk['ratio']:.3f}"]], ["", "dense", "compressed", "compressed / dense"]),
            "", f"Counted: {params['counted']}."]
    return "\n".join(lines)


def _quality(report: dict, images: dict[str, str]) -> str:
    evaluation = report["evaluation"]
    if not evaluation:
        return "## Quality\n\nNot measured yet: run `lora-compress evaluate MODEL DIR --text FILE --tasks T`."
    lines = ["## Quality"]
    if "drift" in evaluation:
        lines += ["", *_text_quality(evaluation, images)]
    if evaluation.get("tasks"):
        lines += ["", "lm-evaluation-harness, the same documents for both models:", "",
                  _table(task_rows(evaluation["tasks"]), TASK_HEADER)]
    return "\n".join(lines)


def _text_quality(evaluation: dict, images: dict[str, str]) -> list[str]:
    """What --text measured: perplexity, drift, forward seconds, drift per block."""
    rows = [[key.replace("_", " "), number(value)] for key, value in evaluation["drift"].items()]
    if "perplexity" in evaluation:
        ppl = evaluation["perplexity"]
        rows.insert(0, ["perplexity", f"{ppl['dense']:.4g} → {ppl['compressed']:.4g} "
                                      f"(×{ppl['compressed'] / ppl['dense']:.3f})"])
    seconds = evaluation["seconds"]
    rows.append(["forward seconds", f"{seconds['dense']:.3g} → {seconds['compressed']:.3g}"])
    lines = [f"On `{evaluation['text']}` ({evaluation['kind']}).", "", _table(rows, ["figure", "value"])]
    blocks = evaluation.get("blocks")
    if blocks:
        lines += ["", f"Output drift per block: {describe(blocks)}."]
    if "drift" in images:
        lines += ["", f"![output drift per block]({images['drift']})"]
    return lines


def _healing(report: dict, images: dict[str, str]) -> str:
    healing = report["healing"]
    if not healing:
        return ""
    lines = ["## Healing", "", f"{healing.get('steps')} steps in {healing.get('minutes', 0):.3g} min "
             f"(stopped: {healing.get('stopped') or '?'}); held-out loss {number(healing.get('held_out_before'))} → "
             f"{number(healing.get('held_out_after'))}."]
    if healing.get("tokens_seen"):
        tokens = healing.get("tokens") or {}
        lines[-1] += (f" It saw {healing['tokens_seen']:,} training tokens (a training set of {tokens.get('train', 0):,}"
                      f" tokens, {tokens.get('held_out', 0):,} held out).")
    if healing.get("kept") == "unhealed":
        lines += ["", f"**Kept the unhealed factors**: healing {healing.get('why_unhealed')}."]
    if "healing" in images:
        lines += ["", f"![healing loss]({images['healing']})"]
    return "\n".join(lines)


def _layers(report: dict, images: dict[str, str]) -> str:
    lines = ["## Per layer", ""]
    for key in ("ranks", "energy"):
        lines += [f"![{key}]({images[key]})", ""] if key in images else []
    rows = []
    for name, layer in report["layers"].items():
        (out_features, in_features), rank = layer["shape"], layer["rank"]
        own = (in_features if layer["shared"]["factor"] == "lora_B" else out_features) if layer.get("shared") else \
            out_features + in_features  # a shared factor counts once, in the layer that owns it
        kept = 1.0 if rank is None else rank * own / (out_features * in_features)
        energy = layer.get("energy_kept")
        rows.append([f"`{name}`", f"{out_features}×{in_features}", "dense" if rank is None else rank,
                     f"{kept:.1%}", "-" if energy is None else f"{energy:.4f}", layer.get("note") or ""])
    return "\n".join(lines + [_table(rows, ["layer", "out×in", "rank", "params kept", "energy kept", "note"])])


