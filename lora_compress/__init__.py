"""lora-compress: compress Hugging Face checkpoints into LoRA-style low-rank factors.

    >>> import lora_compress as lc
    >>> lc.compress("models/minilm", "out/minilm-50", lc.CompressConfig(ratio=0.5))
    >>> model = lc.load("out/minilm-50")
"""
__version__ = "0.1.0"

from .checkpoint import apply_adapters, load
from .compress import CompressConfig, CompressionReport, compress_
from .errors import LoraCompressError
from .evaluate import EvalConfig, evaluate
from .layers import LowRankLinear
from .pipeline import compress, evaluate_folder
from .svd import factorize

__all__ = ["CompressConfig", "CompressionReport", "EvalConfig", "LoraCompressError", "LowRankLinear",
           "apply_adapters", "compress", "compress_", "evaluate", "evaluate_folder", "factorize", "load"]
