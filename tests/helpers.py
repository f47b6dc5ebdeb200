"""Small shared test helpers: running the CLI, loading tiny models and comparing their outputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from lora_compress.cli import main
from lora_compress.methods.config import RunConfig
from lora_compress.storage.checkpoint import load_dense, resolve_source
from lora_compress.storage.shards import output_files


def run(*args):
    """The click CLI run in this process (CliRunner): ``run("compress", folder, "--rank", 2, ...)``; each argument
    is turned into a string. Returns click's Result (exit_code, output, exception)."""
    return CliRunner().invoke(main, [str(arg) for arg in args])


def small_calibration(text_file, **extra) -> RunConfig:
    """A calibrated run on ``text_file`` in two batches (4 + 2 sequences of 16 tokens)."""
    return RunConfig(calib=str(text_file), calib_samples=6, calib_len=16, **extra)


def dense(folder):
    """The dense model of a checkpoint folder, in eval mode."""
    return load_dense(resolve_source(str(folder)))


def inputs_for(model, batch: int = 2, length: int = 12) -> dict:
    """Fixed random token ids valid for the model's vocabulary."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
    return {"input_ids": ids}


@torch.no_grad()
def outputs(model, inputs) -> torch.Tensor:
    """Logits for LMs, last hidden states for encoders."""
    result = model(**inputs)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor a compressed folder holds, across its shards."""
    return {key: load_file(path)[key] for key, path in output_files(folder).items()}


# Runs in a fresh interpreter where lora_compress cannot be imported; writes what it saw as JSON + safetensors.
PLAIN_TRANSFORMERS = textwrap.dedent("""
    import json, sys
    sys.modules["lora_compress"] = None  # any import of lora_compress now fails
    import torch, transformers
    from safetensors.torch import save_file
    folder, auto, ids_file, out = sys.argv[1:5]
    ids = torch.load(ids_file)
    try:
        import lora_compress
        raise SystemExit("lora_compress must not be importable here")
    except ImportError:
        pass
    cls = getattr(transformers, auto)
    try:
        cls.from_pretrained(folder)
        refusal = None
    except (ValueError, OSError) as error:  # OSError: no model.safetensors (format 3 names its weights a variant)
        refusal = str(error)
    model = cls.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        result = model(input_ids=ids)
    tensor = result.logits if hasattr(result, "logits") else result.last_hidden_state
    facts = {"refusal": refusal, "class": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
             "modules": sorted({type(m).__module__ for m in model.modules()} - {"torch.nn.modules.container"})}
    if auto == "AutoModelForCausalLM":
        facts["generated"] = model.generate(ids[:1], max_new_tokens=4, do_sample=False).shape[1]
    save_file({"outputs": tensor.contiguous()}, out + ".safetensors")
    open(out + ".json", "w").write(json.dumps(facts))
""")


def load_with_plain_transformers(folder, auto, inputs, tmp_path) -> tuple[dict, torch.Tensor]:
    """(facts, outputs) of ``auto.from_pretrained(folder, trust_remote_code=True)`` in a clean subprocess."""
    script, ids, out = tmp_path / "plain.py", tmp_path / "ids.pt", tmp_path / "seen"
    script.write_text(PLAIN_TRANSFORMERS)
    torch.save(inputs["input_ids"], ids)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(script), str(folder), auto, str(ids), str(out)], cwd=tmp_path,
                            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp_path / "seen.json").read_text()), load_file(tmp_path / "seen.safetensors")["outputs"]


# Holds each output folder named on its command line open in atomic_folder (a file written in each) until its
# stdin closes: another run writing one of them, mid-run.
HOLD = textwrap.dedent("""
    import sys
    from contextlib import ExitStack
    from pathlib import Path
    from lora_compress.storage.output import atomic_folder
    with ExitStack() as stack:
        for out in sys.argv[1:]:
            tmp = stack.enter_context(atomic_folder(Path(out)))
            (tmp / "first-run.bin").write_bytes(b"x" * 1000)
            print(tmp, flush=True)
        sys.stdin.read()
""")


def hold_outputs(outs, tmp_path) -> tuple[subprocess.Popen, list[Path]]:
    """A process writing ``outs`` (each held in its temporary folder until its stdin closes); returns
    (process, their temporary folders)."""
    script = tmp_path / "hold.py"
    script.write_text(HOLD)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    process = subprocess.Popen([sys.executable, str(script), *map(str, outs)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=env)
    folders = [Path(process.stdout.readline().strip()) for _ in outs]
    assert all(folder.name for folder in folders), "the writer never started"
    return process, folders
