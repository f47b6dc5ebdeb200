"""Compression methods: the registry, one config + one handler per method, rank choice and the passes.

    registry.py            register_method / get_method: what each method needs
    svd.py whiten.py sequential.py sequential_refit.py shared_basis.py     one method each
    config.py              CompressConfig: rank option, targets, method, solver
    allocate.py ranks.py   a rank per layer: the budget allocation or the per-layer rule
    plain.py calibrated.py the in-memory passes; compress.py picks one from the method's record
"""
# registers the methods, plain SVD first
from . import svd, whiten, sequential, sequential_refit, shared_basis  # noqa: F401
