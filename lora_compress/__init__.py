"""lora-compress: compress Hugging Face checkpoints into LoRA-style low-rank factors.

    >>> import lora_compress as lc
    >>> lc.compress("models/minilm", "out/minilm-50", lc.CompressConfig(ratio=0.5))
    >>> model = lc.load("out/minilm-50")

The package follows the data flow, each room importing only the rooms below it:
core ← storage ← calibrate ← methods ← stream ← pipelines ← evaluation | healing | export ← report ← jobs ← cli.
"""
from .calibrate.collectors import Collector, GradientCovariance, InputDiagonal, InputGram, LayerStatistics, \
    OutputGram
from .calibrate.tokens import calibration_tokens
from .core.layers import LowRankLinear
from .core.svd import Factors, factorize
from .core.whitening import Whitening
from .errors import LoraCompressError, LoraCompressWarning
from .evaluation.drift import block_drift
from .evaluation.lm_eval_tasks import TaskConfig
from .evaluation.metrics import EvalConfig, evaluate
from .export.dense import export_dense, merge_adapter_
from .export.extract import ExtractConfig, ExtractionReport, extract
from .healing.config import HealConfig, HealReport
from .healing.folder import heal
from .healing.loop import heal_
from .jobs.compress import compress
from .jobs.evaluate import evaluate_folder
from .methods.allocate import LayerCost, allocate
from .methods.config import CompressConfig, RunConfig
from .methods.registry import Method, MethodConfig, get_method, method_names, register_method, unregister_method
from .methods.results import CompressionReport, LayerResult
from .methods.sequential import SequentialConfig
from .methods.sequential_refit import SequentialRefitConfig
from .methods.shared_basis import SharedBasisConfig
from .methods.svd import SvdConfig
from .methods.whiten import WhitenConfig
from .pipelines.plan import compress_
from .report.compare import compare_runs
from .report.folder import write_report
from .storage.compressed import apply_adapters, load
from .version import __version__

__all__ = ["Collector", "CompressConfig", "CompressionReport", "EvalConfig", "ExtractConfig", "ExtractionReport",
           "Factors", "GradientCovariance", "HealConfig", "HealReport", "InputDiagonal", "InputGram", "LayerCost",
           "LayerResult", "LayerStatistics", "LoraCompressError", "LoraCompressWarning", "LowRankLinear", "Method",
           "MethodConfig", "OutputGram", "RunConfig", "SequentialConfig", "SequentialRefitConfig",
           "SharedBasisConfig", "SvdConfig", "TaskConfig", "WhitenConfig", "Whitening", "__version__", "allocate",
           "apply_adapters", "block_drift", "calibration_tokens", "compare_runs", "compress", "compress_",
           "evaluate", "evaluate_folder", "export_dense", "extract", "factorize", "get_method", "heal", "heal_",
           "load", "merge_adapter_", "method_names", "register_method", "unregister_method", "write_report"]
