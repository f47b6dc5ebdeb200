"""Calibration: text → token batches → per-layer statistics, and the blocks the model is run through.

    tokens.py       calibration text → (samples, length) token ids, in forward-sized batches
    forward.py      the model on token ids, without a KV cache
    statistics.py   per-layer sums: input Grams XᵀX, output-gradient moments F
    blocks.py       the model's repeated blocks and how each is called
    closed_loop.py  block by block, each group of layers fed the compressed model's own inputs
"""
