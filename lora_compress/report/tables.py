"""Plain-text tables for the terminal (no math: figures come from the library)."""
from __future__ import annotations

from ..evaluation.drift import describe
from ..methods.results import CompressionReport


def render(rows: list[list], header: list[str]) -> str:
    """Left-aligned columns separated by two spaces."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def compression_table(report: CompressionReport) -> str:
    """Per-layer ranks and the targeted-parameter total."""
    rows = [[layer.name, f"{layer.shape[0]}×{layer.shape[1]}", layer.rank if layer.rank else "dense",
             f"{layer.energy_kept:.4f}" if layer.energy_kept is not None else "-", f"{layer.params:,}"]
            for layer in report.layers]
    table = render(rows, ["layer", "out×in", "rank", "energy kept", "params"])
    dense = sum(1 for layer in report.layers if layer.rank is None)
    return (f"{table}\n\ntargeted weights: {report.dense_params:,} → {report.params:,} "
            f"({report.params / report.dense_params:.1%}); {dense} of {len(report.layers)} layers left dense"
            + "".join(f"\n{line}" for line in loss_target_lines((report.calibration or {}).get("loss_target"))))


def loss_target_lines(found: dict | None) -> list[str]:
    """The quality target's figures (pipelines/target.py): predicted against measured rise, each try."""
    if not found:
        return []
    lines = [f"loss rise on {found['held_out_sequences']} held-out calibration sequences "
             f"({found['held_out_tokens']:,} tokens): predicted {found['predicted']:.4f}, measured "
             f"{found['measured']:.4f} nats (target {found['max_loss_rise']:g}, dense loss {found['dense_loss']:.4f})"]
    if len(found["tries"]) > 1:
        lines.append("tries: " + "; ".join(f"limit {t['limit']:.4g} → predicted {t['predicted']:.4f}, measured "
                                          f"{t['measured']:.4f}, {t['params']:,} params" for t in found["tries"]))
    if not found["met"]:
        lines.append(f"target missed: the measured rise is over {found['max_loss_rise']:g} after "
                     f"{len(found['tries'])} tries")
    return lines


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def evaluation_table(figures: dict) -> str:
    """Dense vs compressed figures side by side: sizes, then what --text and --tasks measured."""
    params, disk = figures["params"], figures["disk"]
    rows = [["parameters (whole model)", _fmt(params["dense_total"]), _fmt(params["compressed_total"]),
             f"{params['ratio_total']:.3f}"],
            ["parameters (targeted layers)", _fmt(params["dense_targeted"]), _fmt(params["compressed_targeted"]),
             f"{params['ratio_targeted']:.3f}"],
            ["weight bytes on disk", _fmt(disk["dense_bytes"]), _fmt(disk["compressed_bytes"]), f"{disk['ratio']:.3f}"]]
    if "seconds" in figures:
        seconds = figures["seconds"]
        rows.append(["forward seconds", _fmt(seconds["dense"]), _fmt(seconds["compressed"]),
                     f"{seconds['compressed'] / max(seconds['dense'], 1e-9):.3f}"])
    if "perplexity" in figures:
        ppl = figures["perplexity"]
        rows.append(["perplexity", _fmt(ppl["dense"]), _fmt(ppl["compressed"]), f"{ppl['compressed'] / ppl['dense']:.3f}"])
    lines = [render(rows, ["", "dense", "compressed", "compressed/dense"])]
    if figures.get("tasks"):
        lines += ["", task_table(figures["tasks"])]
    lines.append("")
    if "drift" in figures:
        lines.append("drift: " + "  ".join(f"{k}={_fmt(v)}" for k, v in figures["drift"].items()))
        if figures.get("blocks"):
            lines.append(f"drift per block: {describe(figures['blocks'])}")
    lines.append(f"counted: {params['counted']}")
    if figures.get("ranks"):
        lines.append(rank_lines(figures["ranks"]))
    return "\n".join(lines)


def task_rows(tasks: dict) -> list[list[str]]:
    """One row per lm-eval task and metric: task, metric, dense ± stderr, compressed ± stderr, difference, documents."""
    rows = []
    for task, scores in tasks.items():
        for metric, pair in scores["metrics"].items():
            rows.append([task, metric, _score(pair["dense"], pair["dense_stderr"]),
                         _score(pair["compressed"], pair["compressed_stderr"]),
                         f"{pair['compressed'] - pair['dense']:+.4f}", _fmt(scores["samples"] or "-")])
    return rows


TASK_HEADER = ["lm-eval task", "metric", "dense", "compressed", "compressed − dense", "documents"]


def task_table(tasks: dict) -> str:
    """The lm-eval scores of both models as a terminal table."""
    return render(task_rows(tasks), TASK_HEADER)


def _score(value: float, stderr: float | None) -> str:
    return f"{value:.4f}" if stderr is None else f"{value:.4f} ± {stderr:.4f}"


def rank_lines(ranks: dict) -> str:
    """Per-layer ranks, one line per kind of layer (last name part) in model order; d = dense."""
    kinds = {}
    for name, rank in ranks.items():
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append("d" if rank is None else str(rank))
    width = max(len(kind) for kind in kinds)
    return "ranks per layer (d = dense):\n" + "\n".join(f"  {k.ljust(width)}  {' '.join(v)}" for k, v in kinds.items())


def extraction_table(report) -> str:
    """Per-layer ranks of an extracted adapter, its size, notes and output errors (an ExtractionReport)."""
    rows = [[layer.name, f"{layer.shape[0]}×{layer.shape[1]}", layer.rank, f"{layer.energy_kept:.4f}",
             f"{layer.params:,}"] for layer in report.layers]
    lines = [render(rows, ["layer", "out×in", "rank", "energy kept", "params"]), "",
             f"adapter weights: {report.params:,} for {len(report.layers)} layers "
             f"({report.params / report.dense_params:.1%} of their dense deltas); method: {report.method}"]
    lines += [f"note: {note}" for note in report.notes]
    for variant, errors in report.output_error.items():
        label = "base alone" if variant == "base" else f"base + adapter ({variant})"
        lines.append(f"{label}: " + "  ".join(f"{k}={_fmt(v)}" for k, v in errors.items()))
    lines.append(f"output errors vs tuned, measured on {report.check_inputs}")
    return "\n".join(lines)


def healing_table(report) -> str:
    """Held-out distillation loss before/after healing, and how the run went (a HealReport)."""
    rows = [["held-out loss", _fmt(report.held_out_before), _fmt(report.held_out_after),
             f"{report.held_out_after / max(report.held_out_before, 1e-12):.3f}"]]
    lines = [render(rows, ["", "before", "after", "after/before"]), "",
             f"{report.steps} steps in {report.minutes:.1f} min (teacher pass {report.teacher_minutes:.1f} min"
             f"{f', writing text {report.generation_minutes:.1f} min before' if report.generation_minutes else ''}), "
             f"stopped by {report.stopped}; trained {report.trained_params:,} parameters "
             f"({report.config.train}, loss {report.loss})"]
    return "\n".join(lines + ([f"note: {report.note}"] if report.note else []))
