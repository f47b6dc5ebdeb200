"""Calibrated compression (whiten, sequential, --budget) streamed one block at a time from the shards.

The calibrated pass itself is methods/calibrated.compress_blocks, the same code that runs in
memory; here each block is read from the shards when it is needed (stream/block_loader.py), and
written to the output shards and freed as soon as it is compressed:

    pass 1 (gradients): each block read twice (forward, then backward with its forward recomputed)
    pass 2: each block read, compressed, written, freed; then the tensors outside the blocks

Memory: the tensors outside the blocks + one block (compute dtype) + the tensor being written + the
calibration hidden states; pass 1's hidden states at every block boundary and its gradient
covariances go to disk (a folder inside the output's temporary folder) when large.

Same numbers as the in-memory path: same code, same batches in the same order, the same float64
sums; see tests/test_streaming.py for the tolerance measured.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..methods.calibrated import compress_blocks
from ..methods.config import CompressConfig
from ..methods.results import CompressionReport
from ..storage.shards import ShardWriter
from .block_loader import BlockLoader


def compress_blockwise(blocks: BlockLoader, config: CompressConfig, tokens: torch.Tensor, folder: Path,
                       progress: bool = True, max_shard_bytes: int | None = None) -> CompressionReport:
    """Factor every target of ``blocks.checkpoint`` by a calibrated method; write the weights into ``folder``.

    Args:
        blocks: the checkpoint's model, one block in memory at a time.
        config: a calibrated method and its rank option.
        tokens: calibration token ids, (samples, length).

    Returns:
        The CompressionReport, as :func:`lora_compress.methods.calibrated.compress_calibrated_` gives it.
    """
    writer = ShardWriter(folder, max_shard_bytes)

    def write_block(index: int) -> None:
        for key, tensor in blocks.tensors(index):
            writer.add(key, tensor)

    report = compress_blocks(blocks, config, tokens, blocks.checkpoint.targets, progress, on_block=write_block,
                             spill_folder=folder)
    for key, tensor in blocks.tensors():
        writer.add(key, tensor)
    writer.close()
    return report
