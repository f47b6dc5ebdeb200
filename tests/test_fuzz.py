"""Property-based fuzzing (hypothesis) of the readers of untrusted files: the safetensors header reader and
the manifest reader. Whatever the bytes, they answer with the weights or with LoraCompressError, never
another exception, and what they accept loads."""
from __future__ import annotations

import copy
import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_compress as lc
from lora_compress.report.compare import comparison_table
from lora_compress.storage.checkpoint import WEIGHTS, check_weight_files, load_dense, resolve_source
from lora_compress.storage.manifest import MANIFEST, read_manifest

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = ("F32", "F16", "BF16", "F64", "I8", "U8", "I64", "BOOL", "F8_E4M3", "X9", "")
JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 1 << 40)
                    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)


@st.composite
def safetensors_files(draw, real: bytes) -> bytes:
    """A safetensors file as a careless or hostile writer makes one: a random header (declared length
    right or wrong, entries with odd dtypes, shapes and offsets), a real file damaged, or noise."""
    kind = draw(st.sampled_from(("header", "damaged", "noise")))
    if kind == "noise":
        return draw(st.binary(max_size=256))
    if kind == "damaged":
        data = bytearray(real)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, min(len(data) - 1, 8 + 600)))] = draw(st.integers(0, 255))
        return bytes(data[:draw(st.integers(0, len(data)))]) if draw(st.booleans()) else bytes(data)
    entry = st.fixed_dictionaries({"dtype": st.sampled_from(DTYPES), "shape": st.lists(st.integers(-1, 64), max_size=3),
                                   "data_offsets": st.lists(st.integers(-2, 5000), max_size=3)})
    header = draw(st.dictionaries(st.sampled_from(("model.embed_tokens.weight", "lm_head.weight", "x", "__metadata__")),
                                  entry | JSON, max_size=3))
    blob = json.dumps(header).encode()
    length = draw(st.sampled_from((len(blob), len(blob) + 1, max(len(blob) - 1, 0), 1 << 40)))
    return struct.pack("<Q", length) + blob + draw(st.binary(max_size=5000))


@pytest.fixture(scope="module")
def real_weights(tiny_models) -> bytes:
    return (tiny_models["llama"] / WEIGHTS).read_bytes()


@FUZZ
@given(data=st.data())
def test_any_weights_file_is_read_or_refused_in_one_line(data, tiny_models, real_weights):
    content = data.draw(safetensors_files(real_weights))
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(shutil.copytree(tiny_models["llama"], Path(scratch) / "model"))
        (folder / WEIGHTS).write_bytes(content)
        try:
            check_weight_files([folder / WEIGHTS])
            load_dense(resolve_source(str(folder)))
        except lc.LoraCompressError as error:
            assert "\n" not in str(error)


def _mutated(manifest: dict, data) -> dict | list:
    """The manifest with a few values replaced by any JSON, keys dropped, or all of it replaced."""
    manifest = copy.deepcopy(manifest)
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(("field", "drop", "layer", "counts", "whole")))
        if where == "whole":
            return data.draw(JSON)
        if where == "drop":
            manifest.pop(data.draw(st.sampled_from(sorted(manifest))), None)
            continue
        target = manifest
        if where == "layer" and isinstance(manifest.get("layers"), dict) and manifest["layers"]:
            target = manifest["layers"][data.draw(st.sampled_from(sorted(manifest["layers"])))]
        elif where == "counts" and isinstance(manifest.get("targeted_params"), dict):
            target = manifest["targeted_params"]
        if isinstance(target, dict) and target:
            key = data.draw(st.sampled_from(sorted(target)))
            target[key] = data.draw(JSON | st.sampled_from((None, 0, -1, 3, [32, 33], "float16", "two")))
    return manifest


@FUZZ
@given(data=st.data())
def test_any_manifest_is_read_or_refused_in_one_line_and_what_is_read_loads(data, compressed):
    manifest = json.loads((compressed["llama"] / MANIFEST).read_text())
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(shutil.copytree(compressed["llama"], Path(scratch) / "folder"))
        shutil.rmtree(folder / "report")  # compare reads the manifest then
        (folder / MANIFEST).write_text(json.dumps(_mutated(manifest, data)))
        try:
            read_manifest(folder)
            lc.load(folder)
            comparison_table(lc.compare_runs([folder]))
        except lc.LoraCompressError as error:
            assert "\n" not in str(error)
