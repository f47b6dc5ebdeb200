"""``lora-compress compare``: runs of one base model side by side (a table, and quality vs parameters)."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import LoraCompressError
from ..storage.compressed import read_manifest
from ..storage.output import atomic_file, check_file_output
from . import plots
from .folder import REPORT_DIR, REPORT_JSON, build_report, number, read_existing
from .tables import render

PLOT_SUFFIX = ".png"  # --plot names the file written, which is a PNG


def load_run(path: str | Path) -> dict:
    """One run for ``compare``: a compressed folder (its manifest, checked, and its report when it has
    one) or a report.json.

    Raises:
        LoraCompressError: the path is neither, or its manifest or report is damaged.
    """
    path = Path(path)
    if path.is_file():
        report = read_existing(path)
        fix = f"pass a compressed folder or its {REPORT_DIR}/{REPORT_JSON}"
        label = path.parent.parent.name if path.parent.name == REPORT_DIR else path.stem
    else:
        manifest = read_manifest(path)
        report = read_existing(path / REPORT_DIR / REPORT_JSON) or build_report(manifest)
        fix = f"remove {path / REPORT_DIR} and run `lora-compress evaluate` on {path} again"
        label = path.name
    problem = _report_problem(report)
    if problem:
        raise LoraCompressError(f"{path} is not a lora-compress report ({problem}); {fix}")
    return {**report, "run": label}


def _report_problem(report) -> str | None:
    """What a report lacks that the table and plot read (None when nothing)."""
    if not isinstance(report, dict) or not isinstance(report.get("base_model"), str):
        return "no base_model"
    counts = report.get("targeted_params")
    if not isinstance(report.get("cut"), str) or not isinstance(counts, dict) \
            or not all(isinstance(counts.get(key), int) for key in ("dense", "compressed")) or not counts["dense"]:
        return "no cut or targeted parameter counts"
    evaluation = report.get("evaluation")
    if evaluation is None:
        return None
    try:
        float(evaluation["disk"]["ratio"]), int(evaluation["params"]["compressed_total"])
    except (TypeError, KeyError, ValueError):
        return "evaluation figures without params and disk"
    return None


def compare_runs(paths: list[str | Path]) -> list[dict]:
    """Load runs of one base model.

    Raises:
        LoraCompressError: the runs come from different base models.
    """
    runs = [load_run(path) for path in paths]
    first = runs[0]
    for run in runs[1:]:
        if not same_base_model(run, first):
            raise LoraCompressError(f"runs come from different base models: {first['run']} from "
                                    f"{first['base_model']}, {run['run']} from {run['base_model']}; "
                                    f"compare runs of one base model")
    return runs


def same_base_model(run: dict, other: dict) -> bool:
    """True when two runs were compressed from one checkpoint: the same name (a Hub id, say, read
    from two machines' caches), or the same folder on disk (named once relatively, once absolutely)."""
    if os.path.normpath(run["base_model"]) == os.path.normpath(other["base_model"]):
        return True
    folder = run.get("base_model_folder")
    return folder is not None and folder == other.get("base_model_folder")


def comparison_table(runs: list[dict]) -> str:
    """One row per run: cut, parameters kept, disk, and the quality figures evaluate measured."""
    evaluated = next((run["evaluation"] for run in runs if run["evaluation"]), None)
    columns = list(_quality_figures(evaluated)) if evaluated else []
    rows = []
    for run in runs:
        targeted, evaluation = run["targeted_params"], run["evaluation"] or {}
        row = [run["run"], run["cut"], f"{targeted['compressed'] / targeted['dense']:.3f}"]
        if evaluation:
            row += [f"{evaluation['params']['compressed_total']:,}", f"{evaluation['disk']['ratio']:.3f}"]
            quality = _quality_figures(evaluation)
            row += [number(quality[column]) if column in quality else "-" for column in columns]
        rows.append(row)
    header = ["run", "cut", "targeted kept", "params (whole)", "disk ratio", *columns]
    note = "" if all(run["evaluation"] for run in runs) else \
        "\nruns without figures: not evaluated yet (lora-compress evaluate MODEL DIR --text FILE)"
    return render([row + ["-"] * (len(header) - len(row)) for row in rows], header) + note


def _quality_figures(evaluation: dict) -> dict:
    figures = {}
    if "perplexity" in evaluation:
        figures["ppl dense"] = evaluation["perplexity"]["dense"]
        figures["ppl compressed"] = evaluation["perplexity"]["compressed"]
    figures.update(evaluation.get("drift", {}))
    for task, scores in (evaluation.get("tasks") or {}).items():
        figures.update({f"{task} {metric}": pair["compressed"] for metric, pair in scores["metrics"].items()})
    return figures


def comparison_plot(runs: list[dict], path: str | Path) -> Path:
    """Perplexity (causal LMs) or embedding cosine (encoders) against whole-model parameters, into the
    PNG file ``path`` (which ends in .png), written whole or not at all.

    Raises:
        LoraCompressError: ``path`` is no .png file in an existing folder, or no run has evaluation figures.
    """
    check_file_output(path, "--plot", PLOT_SUFFIX)
    evaluated = [run for run in runs if "drift" in (run["evaluation"] or {})]
    if not evaluated:
        raise LoraCompressError("no run has figures measured on text to plot; run `lora-compress evaluate ... --text "
                                "FILE` on them first")
    causal = "perplexity" in evaluated[0]["evaluation"]
    metric = "perplexity" if causal else "cosine_mean"
    points = [{"label": f"{run['run']} ({run['cut']})", "params": run["evaluation"]["params"]["compressed_total"],
               "value": run["evaluation"]["perplexity"]["compressed"] if causal else run["evaluation"]["drift"][metric],
               "dense": run["evaluation"]["perplexity"]["dense"] if causal else 1.0} for run in evaluated]
    model = Path(os.path.normpath(runs[0]["base_model"])).name
    text = Path(evaluated[0]["evaluation"]["text"]).name
    what = f"perplexity on {text}" if causal else f"embedding cosine to dense on {text}"
    with atomic_file(path, "--plot") as tmp:
        plots.quality_vs_params(points, metric, f"{model}: {what} vs parameters ({len(points)} runs)", tmp)
    return Path(path)
