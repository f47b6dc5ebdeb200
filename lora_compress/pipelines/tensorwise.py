"""Plain-SVD compression one tensor at a time: peak memory ≈ one weight + one output shard.

    shards ──read_tensor (one)──▶ factor_weight ──▶ ShardWriter ──▶ OUT/model-0000k-of-0000N.safetensors
                                                                      model.safetensors.index.json

Untouched tensors are copied through, cast to the checkpoint's dtype; factors are computed by the
same code as the in-memory path, so the output holds the same tensors bit for bit and the same
manifest (one output file below ``max_shard_bytes``, else shards and an index). Under torchrun the
layers are split across processes (see distributed.py).
"""
from __future__ import annotations

from contextlib import closing
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.experts import experts_by_matrix
from ..core.layers import is_conv1d
from ..core.workers import ordered_map
from ..errors import LoraCompressError
from ..methods.config import CompressConfig, RunConfig
from .datafree import factor_experts, factor_weight, factoring_workers
from ..methods.results import CompressionReport, new_layer_result
from ..storage.shards import ShardWriter
from .distributed import Group, check_split
from ..stream.lazy import LazyCheckpoint, read_tensor


def factored_layers(checkpoint: LazyCheckpoint, config: CompressConfig, run: RunConfig, group: Group = Group(),
                    progress: bool = True):
    """Yield ``(LayerResult, Factors | None)`` for every target, in model order, on every process.

    Process p computes targets p, p+K, …; each round's results are shared with all processes.
    """
    names = list(checkpoint.targets)
    check_split(group, len(names))
    bar = tqdm(total=len(names), desc="factoring", unit="layer", disable=not (progress and group.is_writer))
    for outcome in _outcomes(checkpoint, config, run, group, names):
        if isinstance(outcome, str):
            raise LoraCompressError(outcome)
        bar.update()
        yield outcome
    bar.close()


def _outcomes(checkpoint: LazyCheckpoint, config: CompressConfig, run: RunConfig, group: Group, names: list[str]):
    """Each target's :func:`_factor_one` outcome, in order: one process factors several layers at
    once on its threads (workers.py); K processes factor one layer each per round. A method with an
    experts handler gets the experts of each fused tensor together (one process only)."""
    groups = experts_by_matrix(checkpoint.model, names) if config.record.experts else {}
    if group.world == 1:
        workers = factoring_workers(run, checkpoint.targets)
        for outcomes in ordered_map(lambda item: _factor_item(checkpoint, config, run, *item), _items(names, groups),
                                    workers):
            yield from outcomes
        return
    if groups:
        yield (f"method {config.method} factors the experts of a layer together; run it in one process "
               f"(drop torchrun)")
        return
    for start in range(0, len(names), group.world):
        index = start + group.rank
        mine = _factor_one(checkpoint, config, run, names[index]) if index < len(names) else None
        yield from group.share(mine)[:len(names) - start]


def _items(names: list[str], groups: dict[str, list[str]]) -> list[tuple[list[str], bool]]:
    """The work in target order: ``([name], False)`` per layer, ``(experts, True)`` per fused tensor whose
    experts are factored together."""
    first = {members[0]: members for members in groups.values()}
    grouped = {name for members in groups.values() for name in members}
    return [(first[name], True) if name in first else ([name], False) for name in names
            if name in first or name not in grouped]


def _factor_item(checkpoint: LazyCheckpoint, config: CompressConfig, run: RunConfig, names: list[str],
                 together: bool) -> list:
    """The outcomes of one work item (see :func:`_items`)."""
    if not together:
        return [_factor_one(checkpoint, config, run, names[0])]
    modules = [checkpoint.model.get_submodule(name) for name in names]
    try:
        weights = torch.stack([read_tensor(checkpoint, f"{name}.weight").to(checkpoint.dtype) for name in names])
        return [(result, _on_cpu(factors)) for result, factors in factor_experts(names, modules, weights, config, run)]
    except LoraCompressError as error:
        return [str(error)]


def _on_cpu(factors):
    """``factors`` with its tensors on the CPU (None stays None)."""
    if factors is None:
        return None
    return type(factors)(factors.B.cpu(), factors.A.cpu(), factors.singular_values.cpu(), factors.energy_kept)


def _factor_one(checkpoint: LazyCheckpoint, config: CompressConfig, run: RunConfig, name: str):
    """(result, CPU factors) for one layer, or the error message to share with the other processes."""
    module = checkpoint.model.get_submodule(name)
    result = new_layer_result(name, module)
    try:
        weight = read_tensor(checkpoint, f"{name}.weight").to(checkpoint.dtype)
        factors = factor_weight(result, weight.T if is_conv1d(module) else weight, config, run)
    except LoraCompressError as error:
        return str(error)
    return result, _on_cpu(factors)


def compress_tensorwise(checkpoint: LazyCheckpoint, config: CompressConfig, run: RunConfig, folder: Path | None,
                        group: Group = Group(), progress: bool = True,
                        max_shard_bytes: int | None = None) -> CompressionReport:
    """Factor every target and write the weights into ``folder`` (rank 0; others pass None).

    Returns:
        The CompressionReport, identical on every process.
    """
    report = CompressionReport(config)
    writer = ShardWriter(folder, max_shard_bytes) if folder is not None else None
    with closing(factored_layers(checkpoint, config, run, group, progress)) as layers:  # closing gives the threads back
        for key, stored in checkpoint.keys.items():
            module_name, factors = key.rpartition(".")[0], None
            if module_name in checkpoint.targets and key.endswith(".weight"):
                result, factors = next(layers)
                report.layers.append(result)
            if writer is None:
                continue
            if factors is not None:
                shared = result.shared[0] if result.shared else None  # written once, by the layer owning it
                if shared != "lora_A":
                    writer.add(f"{module_name}.lora_A", factors.A.contiguous())
                if shared != "lora_B":
                    writer.add(f"{module_name}.lora_B", factors.B.contiguous())
            else:
                writer.add(key, read_tensor(checkpoint, stored).to(checkpoint.dtype))
    if writer is not None:
        writer.close()
    return report


