"""lora-compress: compress Hugging Face checkpoints into LoRA-style low-rank factors.

    >>> import lora_compress as lc
    >>> lc.compress("models/minilm", "out/minilm-50", lc.CompressConfig(ratio=0.5))
    >>> model = lc.load("out/minilm-50")
"""
__version__ = "0.1.0"

from .allocate import allocate
from .calibrate import calibration_tokens
from .checkpoint import apply_adapters, load
from .compress import CompressConfig, CompressionReport, compress_
from .drift import block_drift
from .errors import LoraCompressError
from .evaluate import EvalConfig, evaluate
from .heal import HealConfig, HealReport, heal, heal_
from .layers import LowRankLinear
from .peft_export import ExtractConfig, ExtractionReport, export_dense, extract, merge_adapter_
from .pipeline import compress, evaluate_folder
from .report import compare_runs, write_report
from .svd import factorize

__all__ = ["allocate", "calibration_tokens", "CompressConfig", "CompressionReport", "EvalConfig", "ExtractConfig", "ExtractionReport", "HealConfig",
           "HealReport", "LoraCompressError", "LowRankLinear", "apply_adapters", "compress", "compress_", "evaluate",
           "evaluate_folder", "export_dense", "extract", "factorize", "heal", "heal_", "load", "merge_adapter_",
           "block_drift", "compare_runs", "write_report"]
