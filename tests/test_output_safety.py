"""Nothing lost, nothing left behind: outputs never replace inputs, fail before compute, and clean up."""
import errno
import json
import signal

import pytest
from click.testing import CliRunner
from safetensors import SafetensorError

import lora_compress as lc
from helpers import hold_outputs
from lora_compress.cli import main
from lora_compress.pipelines import plan as pipeline_plan
from lora_compress.storage.compressed import MANIFEST, read_manifest
from lora_compress.storage.output import MARKER, atomic_folder, check_output_folder, clean_stale, holds_outputs


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def model_copy(tiny_models, tmp_path):
    """A copy of the tiny Llama that a test may see replaced (it must not be)."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], folder)
    return folder


@pytest.mark.parametrize("where, message", [
    (lambda model: model, "is the input"),
    (lambda model: model / "out", "is the input .* or inside it"),
    (lambda model: model.parent, "holds the input"),
])
def test_out_equal_to_inside_or_around_the_input_is_refused_even_with_force(model_copy, where, message):
    before = sorted(p.name for p in model_copy.iterdir())
    result = run("compress", model_copy, "--rank", "2", "--out", where(model_copy), "--force", "--quiet")
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith("error: --out") and __import__("re").search(message, result.output)
    assert sorted(p.name for p in model_copy.iterdir()) == before


def test_export_and_heal_refuse_to_write_over_their_input(tiny_models, tmp_path, text_file):
    out = tmp_path / "out"
    assert run("compress", tiny_models["llama"], "--rank", "2", "--out", out, "--quiet").exit_code == 0
    result = run("export", out, "--dense", "--out", out, "--force")
    assert result.exit_code == 2 and "is the input" in result.output
    result = run("heal", out, "--calib", text_file, "--steps", "1", "--out", out / "healed", "--quiet")
    assert result.exit_code == 2 and "inside it" in result.output
    assert read_manifest(out).format_version == 2


def test_an_unwritable_output_place_fails_before_any_compute(tiny_models, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(pipeline_plan, "compress_datafree_", lambda *a, **k: pytest.fail("computed before checking"))
    result = run("compress", tiny_models["llama"], "--rank", "2", "--out", blocker / "out", "--quiet")
    assert result.exit_code == 2 and "cannot write to" in result.output and "choose a writable --out" in result.output


def test_the_writability_check_leaves_no_folder_behind(tmp_path):
    check_output_folder(tmp_path / "new" / "deeper" / "out")
    assert list(tmp_path.iterdir()) == []


def _writer_process(tmp_path, out):
    """A process holding ``out``'s temporary folder open; returns (process, temporary folder)."""
    process, (tmp,) = hold_outputs([out], tmp_path)
    return process, tmp


@pytest.mark.slow
def test_sigterm_removes_the_temporary_folder(tmp_path):
    out = tmp_path / "out"
    process, tmp = _writer_process(tmp_path, out)
    assert (tmp / "first-run.bin").exists() and (tmp / MARKER).exists()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert not tmp.exists() and not out.exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "hold.py"]


@pytest.mark.slow
def test_a_killed_runs_leftover_is_removed_by_the_next_run_into_the_same_place(tiny_models, tmp_path):
    out = tmp_path / "out"
    process, tmp = _writer_process(tmp_path, out)
    with pytest.warns(lc.LoraCompressWarning, match="being written by another run"):
        assert clean_stale(out) == [], "a live run's folder is reported, not removed"
    process.kill()
    process.wait(timeout=60)
    assert tmp.exists(), "SIGKILL leaves the temporary folder behind"
    result = run("compress", tiny_models["llama"], "--rank", "2", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert f"warning: removed {tmp}, a temporary folder left by a killed run" in result.output
    assert not tmp.exists() and (out / MANIFEST).exists()


def test_a_failed_block_leaves_neither_output_nor_temporary_folder(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "out") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("version, message", [
    ("abc", "format_version 'abc' .* is not an integer ≥ 1"),
    (0, "format_version 0 .* is not an integer ≥ 1"),
    (True, "format_version True .* is not an integer ≥ 1"),
    (None, "format_version None .* is not an integer ≥ 1"),
    (3, "written by a newer lora-compress \\(format 3, this one reads up to 2\\)"),
])
def test_format_version_must_be_a_known_positive_integer(tiny_models, tmp_path, version, message):
    out = tmp_path / "out"
    lc.compress(str(tiny_models["llama"]), out, lc.CompressConfig(rank=2), progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**manifest, "format_version": version}))
    with pytest.raises(lc.LoraCompressError, match=message):
        lc.load(out)
    result = run("export", out, "--dense", "--out", tmp_path / "plain")
    assert result.exit_code == 2 and result.output.count("\n") == 1


def test_a_job_holds_its_output_lock_until_it_ends_and_only_torchrun_rank_0_takes_it(tmp_path, monkeypatch):
    with holds_outputs():
        check_output_folder(tmp_path / "out")
        assert [p.name for p in tmp_path.iterdir()] == [".out.lock"]
        with atomic_folder(tmp_path / "out") as tmp:  # the same run: the lock is already its own
            (tmp / "weights").write_text("x")
        assert (tmp_path / ".out.lock").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with holds_outputs():
        check_output_folder(tmp_path / "other")
        assert [p.name for p in tmp_path.iterdir()] == ["out"], "only rank 0 writes, so only it locks"


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   SafetensorError("Error while serializing: I/O error: No space left on device "
                                                   "(os error 28)")], ids=["python", "safetensors"])
def test_a_disk_full_while_writing_is_one_line_and_leaves_nothing(tmp_path, error):
    with pytest.raises(lc.LoraCompressError, match=r"^no space left on /\S*( \(\S+\))?: more than \S+ [kMG]?B needed, "
                                                   r"\S+ [kMG]?B free; free space or choose another --out$"):
        with atomic_folder(tmp_path / "out") as tmp:
            (tmp / "half").write_bytes(b"x" * 1000)
            raise error
    assert list(tmp_path.iterdir()) == []
