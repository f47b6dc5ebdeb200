"""The core: pure SVD math and the factored layer, knowing nothing of checkpoints or calibration.

    svd.py         truncated SVD (full / randomized / Gram-eigh) and the rank rules
    whitening.py   activation-aware factoring: W·L and Rᵀ·W·L whitening, the refit target
    layers.py      LowRankLinear: y = B(Ax) + b, never builds B·A
    patch.py       the only code that swaps modules
    targets.py     which modules get factored
    counting.py    parameter counts, saying what is counted
    workers.py     several small layers factored at once
    precision.py   where bf16 is fast
"""
