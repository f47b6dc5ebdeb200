"""The fault catalogue: bad inputs and faults for every command, each ending in one line, exit 2, and the
place exactly as it was (nothing written, nothing lost, nothing half-written); the same through the Python
API where it has a call for it. ``python -m pytest tests/test_faults.py`` ends with the table of cases per
command and class; ``python scripts/fault_catalogue.py`` prints it without running them.

Each case copies a tiny Llama checkpoint and a compressed, evaluated folder of it into its own place,
damages what it names, runs the command and compares every file and folder of the place before and after.
Full and read-only disks are small tmpfs mounts where this process may mount them (root); elsewhere a full
disk is a monkeypatched free-space figure and a read-only place a folder without write permission.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_compress as lc
from fault_catalogue import CATALOGUE_PROPERTY
from helpers import hold_outputs, run
from lora_compress.jobs import compress as jobs_compress
from lora_compress.pipelines.plan import compress_
from lora_compress.report.compare import comparison_plot
from lora_compress.report.inspect import inspect_model, inspect_spectra
from lora_compress.storage import checkpoint as checkpoint_module
from lora_compress.storage import space
from lora_compress.storage.manifest import read_manifest

DAMAGED_CHECKPOINT = "damaged checkpoint"
DAMAGED_FOLDER = "damaged folder"
BAD_OPTION = "bad option or input"
OUTPUT = "output place"
FULL_DISK = "full disk"
UNWRITABLE = "unwritable place"
CONCURRENT = "concurrent writer"
SIGNAL = "signal"
TINY_DISK_KB = 64  # the small tmpfs: room for a compressed tiny Llama's weights, not for its report


# ---------------------------------------------------------------------------------------------- the place


@dataclass
class Place:
    """One case's own copies of the inputs, and where it may write."""

    root: Path
    model: Path  # the tiny Llama checkpoint
    folder: Path  # a compressed, evaluated folder of it (rank 2)
    text: Path
    models: dict  # the session's tiny checkpoints, read only
    monkeypatch: pytest.MonkeyPatch
    request: pytest.FixtureRequest
    mounts: list = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.root / "out"

    def names(self) -> dict[str, str]:
        """What ``{model}``, ``{folder}``, ... stand for in a case's arguments."""
        names = {"model": self.model, "folder": self.folder, "text": self.text, "out": self.out, "root": self.root,
                 **{name: self.models[name] for name in ("llama", "gpt2", "bert")}}
        return {key: str(value) for key, value in names.items()}

    def small_disk(self, kb: int = TINY_DISK_KB) -> Path:
        """An empty folder on a device with ``kb`` KiB: a tmpfs, else one whose free space is reported so."""
        folder = self.root / "small"
        if not self._mount(folder, f"size={kb}k"):
            real = shutil.disk_usage
            self.monkeypatch.setattr(space.shutil, "disk_usage", lambda path: real(path)._replace(free=kb << 10))
        return folder

    def read_only(self, name: str = "ro", copy: Path | None = None) -> Path:
        """A folder that cannot be written (holding a copy of ``copy`` when given): a read-only tmpfs, else a
        folder without write permission (which root would ignore)."""
        folder = self.root / name
        if self._mount(folder, "size=4m"):
            if copy is not None:
                shutil.copytree(copy, folder / copy.name)
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        else:
            if copy is not None:
                shutil.copytree(copy, folder / copy.name)
            for path in (folder, *folder.rglob("*")):
                if path.is_dir():
                    path.chmod(0o555)
        return folder / copy.name if copy is not None else folder

    def _mount(self, folder: Path, options: str) -> bool:
        folder.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            return False
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True).returncode != 0:
            return False
        self.mounts.append(folder)
        return True

    def busy(self, command: str) -> Path:
        """An output folder that another process is writing right now."""
        return self.request.getfixturevalue("busy_outputs")[command]


@pytest.fixture(scope="session")
def compressed_llama(tiny_models, compressed, tmp_path_factory, text_file) -> Path:
    """A copy of the session's compressed tiny Llama, evaluated on the test text (its report holds figures)."""
    folder = Path(shutil.copytree(compressed["llama"], tmp_path_factory.mktemp("faults") / "llama"))
    result = run("evaluate", tiny_models["llama"], folder, "--text", text_file, "--quiet")
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture
def place(tmp_path, tiny_models, compressed_llama, text_file, monkeypatch, request):
    """Copies of the tiny Llama, its compressed folder and the text, in a place of their own."""
    root = tmp_path / "place"
    root.mkdir()
    made = Place(root, Path(shutil.copytree(tiny_models["llama"], root / "model")),
                 Path(shutil.copytree(compressed_llama, root / "folder")),
                 Path(shutil.copy(text_file, root / "text.txt")), tiny_models, monkeypatch, request)
    yield made
    for folder in reversed(made.mounts):
        subprocess.run(["umount", "-l", str(folder)], check=False)
    for path in root.rglob("*"):
        if path.is_dir():
            path.chmod(0o755)  # the permission fallback of read_only()


@pytest.fixture(scope="module")
def busy_outputs(tmp_path_factory):
    """An output folder per writing command that another process writes until this module ends; then the
    first run's folder must appear whole."""
    root = tmp_path_factory.mktemp("busy")
    outs = {command: root / command for command in ("compress", "export", "extract", "heal")}
    process, _ = hold_outputs(list(outs.values()), root)
    yield outs
    process.stdin.close()
    assert process.wait(timeout=60) == 0
    for out in outs.values():
        assert (out / "first-run.bin").is_file(), "the first run's output must survive the refused one"


def snapshot(root: Path) -> dict[str, str]:
    """Every folder and file under ``root``: path → content hash ("dir" for folders)."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


# ------------------------------------------------------------------------------------------ damage


def edit_json(path: Path, change: Callable) -> None:
    """Rewrite a JSON file after ``change(content)`` edited its content in place."""
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


def edit_tensors(path: Path, change: Callable[[dict], None]) -> None:
    """Rewrite a safetensors file after ``change(tensors)`` edited its dict of tensors."""
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata=metadata)


def write(relative: str, content: str | bytes) -> Callable[[Place], None]:
    """Damage: replace the file at ``relative`` (``model/config.json``) with ``content``."""
    def damage(place: Place) -> None:
        path = place.root / relative
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return damage


def json_change(relative: str, change: Callable) -> Callable[[Place], None]:
    return lambda place: edit_json(place.root / relative, change)


def tensor_change(relative: str, change: Callable[[dict], None]) -> Callable[[Place], None]:
    return lambda place: edit_tensors(place.root / relative, change)


def first_factor(tensors: dict) -> str:
    return sorted(key for key in tensors if key.endswith(".lora_A"))[0]


def poison(value: float) -> Callable[[dict], None]:
    def change(tensors: dict) -> None:
        tensors[first_factor(tensors)][0, 0] = value
    return change


def truncate(relative: str, keep: int) -> Callable[[Place], None]:
    def damage(place: Place) -> None:
        path = place.root / relative
        path.write_bytes(path.read_bytes()[:keep])
    return damage


def remove(relative: str) -> Callable[[Place], None]:
    def damage(place: Place) -> None:
        path = place.root / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return damage


def tuned_copy(place: Place) -> None:
    """``root/tuned``: the tiny Llama with one layer changed, as a fine-tune would."""
    tuned = Path(shutil.copytree(place.model, place.root / "tuned"))
    edit_tensors(tuned / "model.safetensors",
                 lambda t: t["model.layers.0.self_attn.q_proj.weight"].add_(0.1 * torch.ones(32, 32)))


def both(*damages: Callable[[Place], None]) -> Callable[[Place], None]:
    def damage(place: Place) -> None:
        for each in damages:
            each(place)
    return damage


def other_base(place: Place) -> None:
    """``root/other``: a compressed folder of another base model."""
    other = Path(shutil.copytree(place.folder, place.root / "other"))
    for name in ("lora_compress.json", "report/report.json"):
        edit_json(other / name, lambda content: content.update(base_model="another/model", base_model_folder=None))


def mmap_refused(place: Place) -> None:
    """As on a huge checkpoint under an address-space limit: safetensors' mmap fails with ENOMEM."""
    real = checkpoint_module.safe_open

    def refuse(path, *args, **kwargs):
        if Path(path).parent == place.model:
            raise MemoryError("Cannot allocate memory (os error 12)")
        return real(path, *args, **kwargs)
    place.monkeypatch.setattr(checkpoint_module, "safe_open", refuse)


# ----------------------------------------------------------------------------------------- the catalogue


@dataclass(frozen=True)
class Fault:
    """One bad input or fault: the command line, what the one line says, and the Python API call if any."""

    command: str
    kind: str  # the class of fault
    name: str
    args: tuple[str, ...]  # after the command; {model}, {folder}, {out}, ... as in Place.names()
    message: str  # a regex the error line matches (after "error: ")
    damage: Callable[[Place], None] | None = None
    api: Callable[[Place], object] | None = None
    check: Callable[[Place], None] | None = None  # more to assert on what is left

    @property
    def id(self) -> str:
        return f"{self.command}-{self.name}"


def api_compress(place):
    return lc.compress(str(place.model), place.out, lc.CompressConfig(rank=2), progress=False)


def api_inspect(place):
    return inspect_model(str(place.model))


def api_evaluate(place):
    return lc.evaluate_folder(str(place.models["llama"]), place.folder, place.text, progress=False)


def api_export(place):
    return lc.export_dense(place.folder, place.out)


def api_load(place):
    return lc.load(place.folder)


def api_heal(place):
    return lc.heal(place.folder, place.text, place.out, lc.HealConfig(steps=1, calib_len=16), progress=False)


def api_compare(place):
    return lc.compare_runs([place.folder])


COMPRESS = ("{model}", "--rank", "2", "--out", "{out}", "--quiet")
EVALUATE = ("{llama}", "{folder}", "--text", "{text}", "--no-report", "--quiet")
EXPORT = ("{folder}", "--dense", "--out", "{out}")
HEAL = ("{folder}", "--calib", "{text}", "--calib-len", "16", "--steps", "1", "--quiet", "--out", "{out}")
EXTRACT = ("--base", "{model}", "--tuned", "{root}/tuned", "--rank", "2", "--out", "{out}", "--quiet")
NOT_JSON = r"config.json is not valid JSON \(.*\); restore the file"
NOT_OBJECT = r"config.json is not a JSON object; restore it from the checkpoint's source"
NO_TYPE = r"config.json names no (base_)?model_type; restore it"
UNKNOWN_TYPE = r"config.json has (base_)?model_type 'blah', which transformers [\d.]+ does not know; upgrade"
NAN_FACTOR = r"\.lora_A in .*folder holds NaN or inf; the folder is damaged: compress the model again"
FOLDER_CONFIG = "folder/config.json"
DAMAGED_CONFIGS = [  # (name, damage of a config.json at RELATIVE, message)
    ("config-empty", lambda relative: write(relative, ""), NOT_JSON),
    ("config-corrupt", lambda relative: write(relative, '{"model_type": "llama",'), NOT_JSON),
    ("config-a-list", lambda relative: write(relative, "[1, 2]"), NOT_OBJECT),
    ("config-no-model-type", lambda relative: json_change(relative, lambda c: c.pop(
        "base_model_type" if c.get("model_type") == "lora_compressed" else "model_type")), NO_TYPE),
    ("config-unknown-model-type", lambda relative: json_change(relative, lambda c: c.update(
        {"base_model_type" if c.get("model_type") == "lora_compressed" else "model_type": "blah"})), UNKNOWN_TYPE),
]
BUSY = r"is being written by another run \(pid \d+ on .*\); wait for it to finish or choose another --out"
FULL = (r"no space left on \S+( \(\S+\))?: (more than )?[\d.]+ k?B needed, [\d.]+ k?B free; free space or "
        r"choose another --out")


def busy_left_alone(command: str) -> Callable[[Place], None]:
    def check(place: Place) -> None:
        out = place.busy(command)
        assert not out.exists(), "the refused run wrote the busy output"
        assert len(list(out.parent.glob(f".{out.name}.tmp-*"))) == 1, "the first run's temporary folder is gone"
    return check


CATALOGUE: list[Fault] = [
    # compress: a damaged checkpoint
    *(Fault("compress", DAMAGED_CHECKPOINT, name, COMPRESS, message, damage("model/config.json"), api_compress)
      for name, damage, message in DAMAGED_CONFIGS),
    Fault("compress", DAMAGED_CHECKPOINT, "no-config", COMPRESS, r"has no config.json; pass a Hugging Face "
          r"checkpoint folder", remove("model/config.json"), api_compress),
    Fault("compress", DAMAGED_CHECKPOINT, "no-weights", COMPRESS, r"has no model.safetensors or "
          r"model.safetensors.index.json; only safetensors checkpoints are read", remove("model/model.safetensors")),
    Fault("compress", DAMAGED_CHECKPOINT, "weights-truncated", COMPRESS, r"model.safetensors is not a readable "
          r"safetensors file \(.*\); download or copy it again", truncate("model/model.safetensors", 4000),
          api_compress),
    Fault("compress", DAMAGED_CHECKPOINT, "weights-garbage", COMPRESS, r"not a readable safetensors file",
          write("model/model.safetensors", b"\xff" * 64)),
    Fault("compress", DAMAGED_CHECKPOINT, "weights-empty", COMPRESS, r"not a readable safetensors file",
          write("model/model.safetensors", b"")),
    Fault("compress", DAMAGED_CHECKPOINT, "weight-nan", COMPRESS, r"model.layers.0.self_attn.q_proj.weight contains "
          r"NaN or inf; repair or re-download the checkpoint", tensor_change(
              "model/model.safetensors", lambda t: t["model.layers.0.self_attn.q_proj.weight"].fill_(float("nan")))),
    Fault("compress", DAMAGED_CHECKPOINT, "weight-renamed", COMPRESS, r"^(?!.*--stream)model.layers.0.mlp.up_proj."
          r"weight is not in the checkpoint .*incomplete or renamed: copy it again", tensor_change(
              "model/model.safetensors", lambda t: t.update({"renamed": t.pop("model.layers.0.mlp.up_proj.weight")})),
          api_compress),
    Fault("compress", DAMAGED_CHECKPOINT, "weight-renamed-stream", (*COMPRESS, "--stream"), r"up_proj.weight is not in"
          r" the checkpoint .*incomplete or renamed", tensor_change(
              "model/model.safetensors", lambda t: t.update({"renamed": t.pop("model.layers.0.mlp.up_proj.weight")}))),
    Fault("compress", DAMAGED_CHECKPOINT, "weight-quantised", COMPRESS, r"is stored as I8 \(quantised\); dequantise",
          tensor_change("model/model.safetensors", lambda t: t.update(
              {"model.layers.0.mlp.up_proj.weight": t["model.layers.0.mlp.up_proj.weight"].to(torch.int8)}))),
    Fault("compress", DAMAGED_CHECKPOINT, "index-names-missing-shard", COMPRESS, r"names shard gone.safetensors, "
          r"which is missing; copy the complete checkpoint", write(
              "model/model.safetensors.index.json", json.dumps({"weight_map": {"a": "gone.safetensors"}}))),
    Fault("compress", DAMAGED_CHECKPOINT, "mmap-refused", COMPRESS, r"^(?!.*download).*model.safetensors cannot be "
          r"mapped into memory \(.*\); raise the address-space limit", mmap_refused, api_compress),
    Fault("compress", DAMAGED_CHECKPOINT, "tokenizer-corrupt", ("{model}", "--rank", "2", "--method", "whiten",
          "--calib", "{text}", "--calib-len", "16", "--calib-samples", "4", "--out", "{out}", "--quiet"),
          r"^(?!.*has no tokenizer)the tokenizer files of .*model \(tokenizer.json.*\) cannot be read",
          write("model/tokenizer.json", '{"version": ')),
    Fault("compress", DAMAGED_CHECKPOINT, "gguf-bad-magic", ("{model}", "--gguf-file", "model.gguf", "--rank", "2",
          "--out", "{out}"), r"model.gguf is not a GGUF file \(it does not start with the bytes GGUF\)",
          write("model/model.gguf", b"NOT A GGUF" * 10)),
    Fault("compress", DAMAGED_CHECKPOINT, "gguf-truncated", ("{model}", "--gguf-file", "model.gguf", "--rank", "2",
          "--out", "{out}"), r"transformers could not read .*model.gguf \(.*\); check it is a complete GGUF file",
          write("model/model.gguf", b"GGUF\x03\x00\x00\x00\x05")),
    Fault("compress", DAMAGED_CHECKPOINT, "gguf-missing", ("{model}", "--gguf-file", "nope.gguf", "--rank", "2",
          "--out", "{out}"), r"nope.gguf is not in .*; pass --gguf-file with a file there"),
    Fault("compress", DAMAGED_CHECKPOINT, "a-compressed-folder", ("{folder}", "--rank", "2", "--out", "{out}"),
          r"is a compressed folder, not a dense checkpoint; pass the dense model"),
    Fault("compress", DAMAGED_CHECKPOINT, "bos-outside-vocabulary", ("{gpt2}", "--calib-generated", "1", "--budget",
          "0.5", "--calib-len", "8", "--calib-samples", "2", "--out", "{out}", "--quiet"), r"--calib-generated: "
          r"GPT2LMHeadModel's start token 50256 .* lies outside its vocabulary of \d+ tokens; pass "
          r"--calib FILE with --calib-generated 0"),
    # compress: bad options and inputs
    Fault("compress", BAD_OPTION, "model-missing", ("{root}/nope", "--rank", "2", "--out", "{out}"),
          r"model folder .*nope does not exist; pass a checkpoint folder or a Hub id"),
    Fault("compress", BAD_OPTION, "model-a-file", ("{text}", "--rank", "2", "--out", "{out}"),
          r"is a file, not a checkpoint folder"),
    Fault("compress", BAD_OPTION, "rank-0", ("{model}", "--rank", "0", "--out", "{out}"), r"--rank 0 must be a "
          r"positive integer"),
    Fault("compress", BAD_OPTION, "ratio-above-1", ("{model}", "--ratio", "1.5", "--out", "{out}"),
          r"--ratio 1.5 is outside \(0, 1\]"),
    Fault("compress", BAD_OPTION, "two-sizes", ("{model}", "--rank", "2", "--energy", "0.9", "--out", "{out}"),
          r"give exactly one of"),
    Fault("compress", BAD_OPTION, "no-size", ("{model}", "--out", "{out}"), r"give exactly one of"),
    Fault("compress", BAD_OPTION, "loss-target-and-size", ("{model}", "--max-loss-rise", "0.2", "--budget", "0.5",
          "--calib", "{text}", "--out", "{out}"), r"--max-loss-rise chooses the size itself; drop --budget"),
    Fault("compress", BAD_OPTION, "loss-target-negative", ("{model}", "--max-loss-rise", "-0.1", "--calib", "{text}",
          "--out", "{out}"), r"--max-loss-rise -0.1 must be a positive loss rise in nats"),
    Fault("compress", BAD_OPTION, "loss-target-uncalibrated", ("{model}", "--max-loss-rise", "0.2", "--out", "{out}"),
          r"--max-loss-rise measures the loss on held-out calibration text; pass --calib FILE"),
    Fault("compress", BAD_OPTION, "loss-target-streamed", ("{model}", "--max-loss-rise", "0.2", "--calib", "{text}",
          "--stream", "--out", "{out}"), r"--max-loss-rise .* needs it in memory; drop --stream"),
    Fault("compress", BAD_OPTION, "rank-above-shape", ("{model}", "--rank", "999", "--out", "{out}", "--quiet"),
          r"--rank 999 is larger than"),
    Fault("compress", BAD_OPTION, "include-nothing", ("{model}", "--rank", "2", "--include", "nope", "--out", "{out}"),
          r"--include 'nope' matches no linear module"),
    Fault("compress", BAD_OPTION, "calib-a-folder", ("{model}", "--ratio", "0.5", "--method", "whiten", "--calib",
          "{root}", "--out", "{out}"), r"--calib .*place is a folder; pass a UTF-8 text file"),
    Fault("compress", BAD_OPTION, "calib-missing", ("{model}", "--ratio", "0.5", "--method", "whiten", "--calib",
          "{root}/nope.txt", "--out", "{out}"), r"--calib file .*nope.txt does not exist"),
    Fault("compress", BAD_OPTION, "calib-empty", ("{model}", "--ratio", "0.5", "--method", "whiten", "--calib",
          "{text}", "--out", "{out}"), r"--calib file .*text.txt is empty", write("text.txt", "  \n")),
    Fault("compress", BAD_OPTION, "calib-not-utf8", ("{model}", "--ratio", "0.5", "--method", "whiten", "--calib",
          "{text}", "--out", "{out}"), r"--calib file .*text.txt is not UTF-8 \(byte 0\)",
          write("text.txt", b"\xff\xfe")),
    Fault("compress", BAD_OPTION, "calib-too-short", ("{model}", "--ratio", "0.5", "--method", "whiten", "--calib",
          "{text}", "--out", "{out}", "--quiet"), r"calibration text has [\d,]+ tokens but --calib-samples 32 × "
          r"--calib-len 256 needs"),
    Fault("compress", BAD_OPTION, "budget-without-calibration", ("{model}", "--budget", "0.5", "--calib-generated",
          "0", "--out", "{out}"), r"--budget"),
    Fault("compress", BAD_OPTION, "memory-limit-too-small", ("{model}", "--rank", "2", "--memory-limit", "1K",
          "--out", "{out}", "--quiet"), r"^(?!.*--stream)compressing needs about .* but --memory-limit .*; pass "
          r"fewer --calib-samples"),
    Fault("compress", BAD_OPTION, "memory-limit-unreadable", ("{model}", "--rank", "2", "--memory-limit", "lots",
          "--out", "{out}"), r"--memory-limit 'lots'"),
    Fault("compress", BAD_OPTION, "stream-a-gguf", ("{model}", "--gguf-file", "model.gguf", "--stream", "--rank", "2",
          "--out", "{out}"), r"streaming reads safetensors checkpoints only; drop --stream for a GGUF file"),
    # compress: where the output goes
    Fault("compress", OUTPUT, "out-exists", COMPRESS, r"output folder .*out already exists; choose another --out or "
          r"pass --force", write("out", "")),
    Fault("compress", OUTPUT, "out-is-the-input", ("{model}", "--rank", "2", "--out", "{model}", "--force"),
          r"--out .*model is the input .* or inside it"),
    Fault("compress", OUTPUT, "out-inside-the-input", ("{model}", "--rank", "2", "--out", "{model}/out"),
          r"--out .*model/out is the input .* or inside it"),
    Fault("compress", OUTPUT, "out-holds-the-input", ("{model}", "--rank", "2", "--out", "{root}", "--force"),
          r"--out .*place holds the input"),
    Fault("compress", OUTPUT, "out-under-a-file", ("{model}", "--rank", "2", "--out", "{text}/out"),
          r"cannot write to .*text.txt/out: .*text.txt is a file; choose a writable --out"),
    Fault("compress", UNWRITABLE, "out-read-only", ("{model}", "--rank", "2", "--out", "{root}/ro/out"),
          r"cannot write to .*ro \((Read-only file system|Permission denied)\); choose a writable --out",
          lambda place: place.read_only()),
    Fault("compress", FULL_DISK, "no-room-for-the-weights", ("{model}", "--rank", "2", "--out", "{root}/small/out",
          "--quiet"), FULL, lambda place: place.small_disk(8)),
    Fault("compress", FULL_DISK, "no-room-for-the-report", ("{model}", "--rank", "2", "--out", "{root}/small/out",
          "--quiet"), FULL, lambda place: place.small_disk()),
    Fault("compress", FULL_DISK, "no-room-streaming", ("{model}", "--rank", "2", "--stream", "--out",
          "{root}/small/out", "--quiet"), FULL, lambda place: place.small_disk(8)),
    Fault("compress", CONCURRENT, "out-being-written", ("{model}", "--rank", "2", "--out", "{busy}"), BUSY,
          check=busy_left_alone("compress")),
    Fault("compress", CONCURRENT, "out-being-written-force", ("{model}", "--rank", "2", "--out", "{busy}", "--force"),
          BUSY, check=busy_left_alone("compress")),
    # inspect
    *(Fault("inspect", DAMAGED_CHECKPOINT, name, ("{model}",), message, damage("model/config.json"), api_inspect)
      for name, damage, message in DAMAGED_CONFIGS),
    Fault("inspect", DAMAGED_CHECKPOINT, "weights-truncated", ("{model}",), r"not a readable safetensors file",
          truncate("model/model.safetensors", 4000), api_inspect),
    Fault("inspect", DAMAGED_CHECKPOINT, "weight-renamed", ("{model}",), r"model lacks model.layers.0.mlp.up_proj"
          r".weight; the checkpoint is incomplete or renamed", tensor_change(
              "model/model.safetensors", lambda t: t.update({"renamed": t.pop("model.layers.0.mlp.up_proj.weight")})),
          api_inspect),
    Fault("inspect", DAMAGED_CHECKPOINT, "gguf-bad-magic", ("{model}", "--gguf-file", "model.gguf"),
          r"model.gguf is not a GGUF file", write("model/model.gguf", b"NOT A GGUF" * 10)),
    Fault("inspect", BAD_OPTION, "model-missing", ("{root}/nope",), r"model folder .*nope does not exist"),
    Fault("inspect", BAD_OPTION, "include-nothing", ("{model}", "--include", "nope"), r"--include 'nope' matches no"),
    Fault("inspect", BAD_OPTION, "calib-a-folder", ("{model}", "--spectrum", "--calib", "{root}"),
          r"--calib .*place is a folder; pass a UTF-8 text file"),
    Fault("inspect", OUTPUT, "plot-onto-a-file", ("{model}", "--spectrum", "--plot", "{text}"),
          r"--plot .*text.txt: .*text.txt is a file, and --plot names a folder", None,
          lambda place: inspect_spectra(str(place.model), plot=place.text, progress=False)),
    Fault("inspect", OUTPUT, "plot-under-a-file", ("{model}", "--spectrum", "--plot", "{text}/plots"),
          r"--plot .*plots: .*text.txt is a file"),
    # evaluate
    Fault("evaluate", OUTPUT, "json-a-folder", (*EVALUATE, "--json", "{root}"), r"--json .*place is a folder; name "
          r"a file"),
    Fault("evaluate", OUTPUT, "json-in-a-missing-folder", (*EVALUATE, "--json", "{root}/nope/figures.json"),
          r"--json .*figures.json: the folder .*nope does not exist; create it"),
    Fault("evaluate", OUTPUT, "json-under-a-file", (*EVALUATE, "--json", "{text}/figures.json"),
          r"--json .*figures.json: the folder .*text.txt does not exist"),
    Fault("evaluate", UNWRITABLE, "report-read-only", ("{llama}", "{root}/ro/folder", "--text", "{text}", "--quiet"),
          r"^(?!.*--out)cannot write to .*ro/folder \((Read-only file system|Permission denied)\); make .*ro/folder "
          r"writable or pass --no-report", lambda place: place.read_only(copy=place.folder)),
    Fault("evaluate", DAMAGED_FOLDER, "factor-nan", EVALUATE, NAN_FACTOR,
          tensor_change("folder/model.lora_compressed.safetensors", poison(float("nan"))), api_evaluate),
    Fault("evaluate", DAMAGED_FOLDER, "factor-inf", EVALUATE, NAN_FACTOR,
          tensor_change("folder/model.lora_compressed.safetensors", poison(float("inf"))), api_load),
    Fault("evaluate", DAMAGED_FOLDER, "factor-missing", EVALUATE, r"folder does not match its manifest \(missing "
          r".*lora_A\); compress the model again", tensor_change(
              "folder/model.lora_compressed.safetensors", lambda t: t.pop(first_factor(t))), api_load),
    Fault("evaluate", DAMAGED_FOLDER, "factor-of-another-rank", EVALUATE, r"does not match its manifest",
          tensor_change("folder/model.lora_compressed.safetensors",
                        lambda t: t.update({first_factor(t): t[first_factor(t)][:1]}))),
    Fault("evaluate", DAMAGED_FOLDER, "config-ranks-disagree", EVALUATE, r"config.json in .*folder lists other "
          r"lora_layers than lora_compress.json \(at model.layers.0.self_attn.q_proj\); the folder is damaged",
          json_change(FOLDER_CONFIG, lambda c: c["lora_layers"]["model.layers.0.self_attn.q_proj"].__setitem__(2, 3)),
          api_load),
    Fault("evaluate", DAMAGED_FOLDER, "config-layer-dropped", EVALUATE, r"lists other lora_layers than",
          json_change(FOLDER_CONFIG, lambda c: c["lora_layers"].pop("model.layers.1.mlp.up_proj"))),
    *(Fault("evaluate", DAMAGED_FOLDER, name, EVALUATE, message, damage(FOLDER_CONFIG), api_load)
      for name, damage, message in DAMAGED_CONFIGS),
    Fault("evaluate", DAMAGED_FOLDER, "manifest-empty", EVALUATE, r"format_version None .* is not an integer",
          write("folder/lora_compress.json", "{}"), api_load),
    Fault("evaluate", DAMAGED_FOLDER, "manifest-not-json", EVALUATE, r"lora_compress.json is not valid JSON",
          write("folder/lora_compress.json", "{"), api_load),
    Fault("evaluate", DAMAGED_FOLDER, "manifest-a-list", EVALUATE, r"lora_compress.json is not a JSON object",
          write("folder/lora_compress.json", "[]")),
    Fault("evaluate", DAMAGED_FOLDER, "manifest-newer", EVALUATE, r"written by a newer lora-compress \(format 9",
          json_change("folder/lora_compress.json", lambda m: m.update(format_version=9))),
    Fault("evaluate", DAMAGED_FOLDER, "manifest-rank-a-string", EVALUATE, r"lora_compress.json has layer "
          r"'model.layers.0.self_attn.q_proj' of rank 'two'.*; the manifest is damaged", json_change(
              "folder/lora_compress.json",
              lambda m: m["layers"]["model.layers.0.self_attn.q_proj"].update(rank="two")), api_load),
    Fault("evaluate", DAMAGED_FOLDER, "manifest-layers-a-list", EVALUATE, r"has layers \[\], of the wrong type",
          json_change("folder/lora_compress.json", lambda m: m.update(layers=[]))),
    Fault("evaluate", DAMAGED_FOLDER, "manifest-model-class-unknown", EVALUATE, r"lora_compress.json names "
          r"model_class 'float16', which is no model class of transformers", json_change(
              "folder/lora_compress.json", lambda m: m.update(model_class="float16")), api_load),
    Fault("evaluate", DAMAGED_FOLDER, "manifest-no-dtype", EVALUATE, r"lora_compress.json lacks dtype; the manifest "
          r"is damaged", json_change("folder/lora_compress.json", lambda m: m.pop("dtype"))),
    Fault("evaluate", DAMAGED_FOLDER, "manifest-missing", EVALUATE, r"has no lora_compress.json; pass a folder "
          r"written by `lora-compress compress`", remove("folder/lora_compress.json")),
    Fault("evaluate", DAMAGED_FOLDER, "weights-truncated", EVALUATE, r"not a readable safetensors file",
          truncate("folder/model.lora_compressed.safetensors", 3000), api_load),
    Fault("evaluate", BAD_OPTION, "base-of-another-architecture", ("{bert}", "{folder}", "--text", "{text}",
          "--no-report", "--quiet"), r"BASE .* is not the model this folder was compressed from"),
    Fault("evaluate", BAD_OPTION, "base-damaged", ("{model}", *EVALUATE[1:]), NOT_JSON, write("model/config.json", "")),
    Fault("evaluate", BAD_OPTION, "text-missing", ("{llama}", "{folder}", "--text", "{root}/nope.txt"),
          r"--text file .*nope.txt does not exist"),
    Fault("evaluate", BAD_OPTION, "text-a-folder", ("{llama}", "{folder}", "--text", "{root}"),
          r"--text .*place is a folder; pass a UTF-8 text file"),
    Fault("evaluate", BAD_OPTION, "nothing-to-measure", ("{model}", "{folder}"), r"nothing to measure"),
    Fault("evaluate", BAD_OPTION, "limit-without-tasks", ("{model}", "{folder}", "--limit", "3"),
          r"--limit and --include-path go with --tasks"),
    # export
    Fault("export", DAMAGED_FOLDER, "factor-nan", EXPORT, NAN_FACTOR,
          tensor_change("folder/model.lora_compressed.safetensors", poison(float("nan"))), api_export),
    Fault("export", DAMAGED_FOLDER, "factor-missing", EXPORT, r"does not match its manifest \(missing",
          tensor_change("folder/model.lora_compressed.safetensors", lambda t: t.pop(first_factor(t))), api_export),
    Fault("export", DAMAGED_FOLDER, "config-ranks-disagree", EXPORT, r"lists other lora_layers than",
          json_change(FOLDER_CONFIG, lambda c: c["lora_layers"]["model.layers.0.self_attn.q_proj"].__setitem__(2, 3)),
          api_export),
    Fault("export", DAMAGED_FOLDER, "manifest-empty", EXPORT, r"format_version None",
          write("folder/lora_compress.json", "{}"), api_export),
    Fault("export", DAMAGED_FOLDER, "upgrade-factor-nan", ("{folder}", "--upgrade", "--out", "{out}"), NAN_FACTOR,
          tensor_change("folder/model.lora_compressed.safetensors", poison(float("nan")))),
    Fault("export", BAD_OPTION, "neither-kind-of-folder", ("{model}", "--dense", "--out", "{out}"),
          r"holds neither lora_compress.json nor adapter_config.json"),
    Fault("export", BAD_OPTION, "dense-and-upgrade", ("{folder}", "--dense", "--upgrade", "--out", "{out}"),
          r"give exactly one of --dense or --upgrade"),
    Fault("export", OUTPUT, "out-exists", EXPORT, r"output folder .*out already exists", write("out", "")),
    Fault("export", OUTPUT, "out-is-the-input", ("{folder}", "--dense", "--out", "{folder}", "--force"),
          r"is the input"),
    Fault("export", FULL_DISK, "no-room-for-the-weights", ("{folder}", "--dense", "--out", "{root}/small/out"), FULL,
          lambda place: place.small_disk()),
    Fault("export", CONCURRENT, "out-being-written", ("{folder}", "--dense", "--out", "{busy}"), BUSY,
          check=busy_left_alone("export")),
    # extract
    Fault("extract", DAMAGED_CHECKPOINT, "tuned-config-corrupt", EXTRACT, NOT_JSON,
          both(tuned_copy, write("tuned/config.json", "{"))),
    Fault("extract", DAMAGED_CHECKPOINT, "base-weights-truncated", EXTRACT, r"not a readable safetensors file",
          both(tuned_copy, truncate("model/model.safetensors", 4000))),
    Fault("extract", BAD_OPTION, "tuned-missing", EXTRACT, r"model folder .*tuned does not exist"),
    Fault("extract", BAD_OPTION, "tuned-is-base", ("--base", "{model}", "--tuned", "{model}", "--rank", "2", "--out",
          "{out}", "--quiet"), r"tuned is identical to base"),
    Fault("extract", BAD_OPTION, "another-architecture", ("--base", "{model}", "--tuned", "{bert}", "--rank", "2",
          "--out", "{out}", "--quiet"), r"base is a LlamaForCausalLM but tuned is a BertModel"),
    Fault("extract", BAD_OPTION, "rank-0", (*EXTRACT[:4], "--rank", "0", "--out", "{out}"), r"--rank 0 must be a "
          r"positive integer", tuned_copy),
    Fault("extract", OUTPUT, "out-exists", EXTRACT, r"output folder .*out already exists",
          both(tuned_copy, write("out", ""))),
    Fault("extract", CONCURRENT, "out-being-written", (*EXTRACT[:6], "--out", "{busy}"), BUSY, tuned_copy,
          check=busy_left_alone("extract")),
    # heal
    Fault("heal", DAMAGED_FOLDER, "factor-nan", HEAL, NAN_FACTOR,
          tensor_change("folder/model.lora_compressed.safetensors", poison(float("nan"))), api_heal),
    Fault("heal", DAMAGED_FOLDER, "factor-missing", HEAL, r"does not match its manifest \(missing",
          tensor_change("folder/model.lora_compressed.safetensors", lambda t: t.pop(first_factor(t)))),
    Fault("heal", DAMAGED_FOLDER, "config-ranks-disagree", HEAL, r"lists other lora_layers than",
          json_change(FOLDER_CONFIG, lambda c: c["lora_layers"]["model.layers.0.self_attn.q_proj"].__setitem__(2, 3)),
          api_heal),
    Fault("heal", DAMAGED_FOLDER, "manifest-newer", HEAL, r"written by a newer lora-compress",
          json_change("folder/lora_compress.json", lambda m: m.update(format_version=9)), api_heal),
    Fault("heal", DAMAGED_FOLDER, "not-compressed", ("{model}", *HEAL[1:]), r"has no lora_compress.json"),
    Fault("heal", DAMAGED_FOLDER, "tokenizer-corrupt", HEAL, r"the tokenizer files of .*folder .* cannot be read",
          write("folder/tokenizer.json", "{")),
    Fault("heal", BAD_OPTION, "calib-a-folder", ("{folder}", "--calib", "{root}", "--steps", "1", "--out", "{out}"),
          r"--calib .*place is a folder"),
    Fault("heal", BAD_OPTION, "base-damaged", (*HEAL, "--base", "{model}"), NOT_JSON, write("model/config.json", "")),
    Fault("heal", OUTPUT, "out-exists", HEAL, r"output folder .*out already exists", write("out", "")),
    Fault("heal", OUTPUT, "out-inside-the-input", (*HEAL[:-2], "--out", "{folder}/healed"), r"is the input .* or "
          r"inside it"),
    Fault("heal", FULL_DISK, "no-room-for-the-weights", (*HEAL[:-2], "--out", "{root}/small/out"), FULL,
          lambda place: place.small_disk(8)),
    Fault("heal", CONCURRENT, "out-being-written", (*HEAL[:-2], "--out", "{busy}"), BUSY,
          check=busy_left_alone("heal")),
    # compare
    Fault("compare", DAMAGED_FOLDER, "manifest-empty", ("{folder}",), r"format_version None",
          write("folder/lora_compress.json", "{}"), api_compare),
    Fault("compare", DAMAGED_FOLDER, "manifest-newer", ("{folder}",), r"written by a newer lora-compress",
          json_change("folder/lora_compress.json", lambda m: m.update(format_version=9)), api_compare),
    Fault("compare", DAMAGED_FOLDER, "manifest-missing", ("{folder}",), r"has no lora_compress.json",
          remove("folder/lora_compress.json"), api_compare),
    Fault("compare", DAMAGED_FOLDER, "report-damaged", ("{folder}",), r"folder is not a lora-compress report \(no "
          r"cut or targeted parameter counts\); remove .*report and run `lora-compress evaluate`",
          json_change("folder/report/report.json", lambda r: r.pop("targeted_params")), api_compare),
    Fault("compare", DAMAGED_FOLDER, "report-json-not-a-report", ("{text}",), r"text.txt is not a lora-compress "
          r"report \(no base_model\); pass a compressed folder"),
    Fault("compare", OUTPUT, "plot-without-png", ("{folder}", "--plot", "{root}/plot"), r"--plot .*plot does not end "
          r"in .png; name a .png file, e.g. plot.png", None,
          lambda place: comparison_plot(lc.compare_runs([place.folder]), place.root / "plot")),
    Fault("compare", OUTPUT, "plot-in-a-missing-folder", ("{folder}", "--plot", "{root}/nope/plot.png"),
          r"--plot .*plot.png: the folder .*nope does not exist"),
    Fault("compare", OUTPUT, "plot-a-folder", ("{folder}", "--plot", "{root}/model.png"), r"is a folder",
          lambda place: (place.root / "model.png").mkdir()),
    Fault("compare", BAD_OPTION, "different-base-models", ("{folder}", "{root}/other"), r"runs come from different "
          r"base models", other_base),
]


def test_catalogue_ids_are_unique():
    ids = [fault.id for fault in CATALOGUE]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]


@pytest.mark.parametrize("fault", CATALOGUE, ids=lambda fault: fault.id)
def test_fault_ends_in_one_line_and_leaves_the_place_as_it_was(fault, place, request):
    request.node.user_properties.append((CATALOGUE_PROPERTY, (fault.command, fault.kind)))
    if fault.damage:
        fault.damage(place)
    names = place.names()
    if any("{busy}" in arg for arg in fault.args):
        names["busy"] = str(place.busy(fault.command))
    before = snapshot(place.root)
    result = run(fault.command, *(arg.format(**names) for arg in fault.args))
    assert result.exit_code == 2, shown(result)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert re.search(fault.message, lines[0].removeprefix("error: ")), lines[0]
    assert snapshot(place.root) == before, "the refused run changed the place"
    if fault.check:
        fault.check(place)
    if fault.api:
        with pytest.raises(lc.LoraCompressError, match=fault.message):
            fault.api(place)
        assert snapshot(place.root) == before, "the refused API call changed the place"


def shown(result) -> str:
    """What a CliRunner run printed, and the traceback of an exception it raised."""
    if result.exception is None or isinstance(result.exception, SystemExit):
        return result.output
    return result.output + "".join(traceback.format_exception(result.exception))


# ------------------------------------------------------------------------- concurrent runs, signals


def test_a_second_compress_into_the_same_out_stops_before_any_compute(place, request, monkeypatch):
    """Two runs a few seconds apart: the second (another process, even with --force) is refused while the
    first computes; the first finishes and its folder is the output."""
    request.node.user_properties.append((CATALOGUE_PROPERTY, ("compress", CONCURRENT)))
    seen = {}

    def first_run_computing(*args, **kwargs):
        seen["second"] = subprocess.run([LORA_COMPRESS, "compress", str(place.model),
                                         "--rank", "3", "--out", str(place.out), "--force", "--quiet"],
                                        capture_output=True, text=True, timeout=300, env=subprocess_env())
        seen["place"] = snapshot(place.root)
        return compress_(*args, **kwargs)

    monkeypatch.setattr(jobs_compress, "compress_", first_run_computing)
    lc.compress(str(place.model), place.out, lc.CompressConfig(rank=2), progress=False)
    second = seen["second"]
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip().splitlines() == [f"error: {place.out} is being written by another run (pid "
                                                  f"{os.getpid()} on {os.uname().nodename}); wait for it to finish "
                                                  f"or choose another --out"]
    assert "out" not in seen["place"], "the second run wrote something"
    assert read_manifest(place.out).settings["rank"] == 2, "the first run's folder, not the second's (rank 3)"
    ranks = {m.lora_A.shape[0] for m in lc.load(place.out).modules() if isinstance(m, lc.LowRankLinear)}
    assert ranks == {2}, ranks
    assert sorted(p.name for p in place.root.iterdir()) == ["folder", "model", "out", "text.txt"]


FROM_PRETRAINED = """
import sys, transformers
try:
    transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
except ValueError as error:
    sys.exit(str(error))
"""


def test_transformers_alone_refuses_a_folder_that_lacks_a_factor(place, request, tmp_path):
    """The modeling file written into the folder refuses it (transformers alone would fill the factor with
    uninitialised memory and only warn)."""
    request.node.user_properties.append((CATALOGUE_PROPERTY, ("from_pretrained", DAMAGED_FOLDER)))
    edit_tensors(place.folder / "model.lora_compressed.safetensors", lambda tensors: tensors.pop(first_factor(tensors)))
    before = snapshot(place.root)
    env = {**subprocess_env(), "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", FROM_PRETRAINED, str(place.folder)], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 1, result.stderr
    assert re.fullmatch(r".*folder lacks model\.layers\.0\.\S+\.lora_A in its weights; the folder is damaged: copy "
                        r"it again, or compress the model again", result.stderr.strip().splitlines()[-1])
    assert snapshot(place.root) == before


SIGNALS = [("SIGTERM", signal.SIGTERM, (143,)), ("SIGINT", signal.SIGINT, (1, 130)), ("SIGKILL", signal.SIGKILL, (-9,))]


@pytest.mark.slow
@pytest.mark.parametrize("name, number, codes", SIGNALS, ids=[name for name, *_ in SIGNALS])
def test_a_signal_mid_heal_leaves_nothing_behind_that_the_next_run_trips_on(place, request, name, number, codes):
    request.node.user_properties.append((CATALOGUE_PROPERTY, ("heal", SIGNAL)))
    args = [LORA_COMPRESS, "heal", str(place.folder), "--calib", str(place.text),
            "--calib-len", "16", "--minutes", "2", "--out", str(place.out), "--quiet"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    lock = place.root / ".out.lock"
    deadline = time.monotonic() + 120
    while not lock.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2)  # loading the models or training
    process.send_signal(number)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode in codes, stderr
    assert "Traceback" not in stderr, stderr
    assert not place.out.exists()
    left = sorted(p.name for p in place.root.iterdir())
    if number != signal.SIGKILL:
        assert left == ["folder", "model", "text.txt"], left
    # the next run into the same place: nothing the signalled one left stops it
    result = run("heal", *(arg.format(**place.names()) for arg in HEAL))
    assert result.exit_code == 0, shown(result)
    assert sorted(p.name for p in place.root.iterdir()) == ["folder", "model", "out", "text.txt"]


LORA_COMPRESS = str(Path(sys.executable).with_name("lora-compress"))


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


def catalogue() -> list[tuple[str, str, str]]:
    """Every case of the catalogue: (command, class, name), the tests above included."""
    return [(fault.command, fault.kind, fault.name) for fault in CATALOGUE] + [
        ("compress", CONCURRENT, "second-run-while-the-first-computes"),
        ("from_pretrained", DAMAGED_FOLDER, "factor-missing")] + [
        ("heal", SIGNAL, f"{name}-mid-run") for name, *_ in SIGNALS]
