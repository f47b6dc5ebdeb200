"""Several layers factored at once: order, bounded look-ahead, errors, and the same factors."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from helpers import saved_tensors
from lora_compress import CompressConfig, LoraCompressError
from lora_compress.methods.config import RunConfig
from lora_compress.jobs.compress import compress
from lora_compress.core.workers import SMALL_LAYER, layer_workers, ordered_map


def test_ordered_map_yields_in_input_order_when_later_items_finish_first():
    def slow_first(i):
        time.sleep(0.02 * (5 - i))
        return i * i

    assert list(ordered_map(slow_first, range(6), workers=3)) == [i * i for i in range(6)]


def test_ordered_map_starts_at_most_workers_plus_one_items_ahead_of_the_consumer():
    started, lock = [], threading.Lock()

    def record(i):
        with lock:
            started.append(i)
        return i

    results = ordered_map(record, range(20), workers=2)
    assert next(results) == 0
    time.sleep(0.05)
    assert len(started) <= 3
    assert list(results) == list(range(1, 20))


def test_ordered_map_raises_a_workers_error_and_gives_the_threads_back():
    threads = torch.get_num_threads()

    def fail_on_three(i):
        if i == 3:
            raise LoraCompressError("layer 3 is bad")
        return i

    with pytest.raises(LoraCompressError, match="layer 3 is bad"):
        list(ordered_map(fail_on_three, range(10), workers=2))
    assert torch.get_num_threads() == threads


def test_auto_runs_one_small_layer_per_thread_on_a_cpu_and_one_large_layer_or_gpu_layer_at_a_time():
    small, large = [(576, 1536)], [(576, 1536), (SMALL_LAYER // 1024 + 1, 1024)]
    assert layer_workers(0, small, "cpu") == torch.get_num_threads()
    assert layer_workers(0, large, "cpu") == 1
    assert layer_workers(0, small, "cuda") == 1
    assert layer_workers(3, large, "cpu") == 3


def test_negative_workers_is_one_clear_error():
    with pytest.raises(LoraCompressError, match="^workers -1 is negative"):
        RunConfig(workers=-1)


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_two_workers_write_the_factors_one_thread_writes(tiny_model, tmp_path, stream):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # two workers of one thread each
        compress(str(tiny_model), tmp_path / "two", CompressConfig(ratio=0.5), RunConfig(workers=2, stream=stream),
                 progress=False)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        compress(str(tiny_model), tmp_path / "one", CompressConfig(ratio=0.5), RunConfig(workers=1, stream=stream),
                 progress=False)
    finally:
        torch.set_num_threads(threads)
    one, two = saved_tensors(tmp_path / "one"), saved_tensors(tmp_path / "two")
    assert any(key.endswith("lora_A") for key in one) and one.keys() == two.keys()
    assert all(torch.equal(one[key], two[key]) for key in one)  # bitwise: same threads per layer


def test_workers_factor_a_calibrated_group_at_once_with_the_factors_of_one(tiny_model, text_file, tmp_path):
    run = dict(calib=str(text_file), calib_samples=2, calib_len=16)
    compress(str(tiny_model), tmp_path / "one", CompressConfig(ratio=0.5), RunConfig(workers=1, **run), progress=False)
    compress(str(tiny_model), tmp_path / "two", CompressConfig(ratio=0.5), RunConfig(workers=2, **run), progress=False)
    one, two = saved_tensors(tmp_path / "one"), saved_tensors(tmp_path / "two")
    assert any(key.endswith("lora_A") for key in one) and one.keys() == two.keys()
    for key in one:  # float64 factoring on one or two threads: equal up to rounding
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)
