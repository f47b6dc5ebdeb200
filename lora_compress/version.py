"""The package version, and the versions of the libraries that shape an output (for manifests and cards)."""
from __future__ import annotations

__version__ = "0.1.0"


def versions() -> dict:
    """Versions of the libraries that shape the output."""
    import safetensors
    import torch
    import transformers

    return {"lora_compress": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__}
