"""Checkpoints larger than memory: one tensor (plain SVD) or one block (calibrated methods) at a time.

    lazy.py          the model skeleton on the meta device; tensors read from their shard on demand
    tensorwise.py    plain SVD one tensor at a time (distributed.py: the layers split over torchrun)
    block_loader.py  one transformer block in memory at a time
    blockwise.py     calibrated compression block by block (two passes with a budget)
"""
