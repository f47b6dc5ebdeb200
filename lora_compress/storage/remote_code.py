"""The compressed folder as transformers sees it: the base's config, its factored layers, and the code that builds them.

    config.json                   the base model's config, plus
                                    model_type       the base's own (format 3 on), e.g. "llama": so AutoConfig and
                                                     AutoTokenizer read the folder with no flag and no prompt
                                    base_model_type  the base's model_type again (format 2 had "lora_compressed"
                                                     as model_type: AutoTokenizer then asked to run the code)
                                    lora_layers      {module: [out, in, rank, bias]}, one entry per factored layer
                                    lora_experts     {experts module: layout}: fused MoE experts split into one
                                                     linear map per expert (core/experts.py) before the above
                                    lora_shared      {module: [factor, owner]}: a factor that is another layer's
                                    auto_map         AutoConfig and the task's Auto class → the modeling file
    model.lora_compressed.safetensors  the weights under transformers' *variant* name (storage/checkpoint.py):
                                  a dense class (AutoModel… without trust_remote_code) finds no model.safetensors
                                  and refuses the folder, never builds random factored layers; the modeling
                                  file's class asks for the variant
    modeling_lora_compressed.py   torch + transformers only: the base class with each listed layer
                                  swapped for a low-rank pair while it is built (from the template beside
                                  this module), so ``from_pretrained(DIR, trust_remote_code=True)`` loads the
                                  stored factors

lora-compress itself reads config.json back as the base's config (:func:`base_config`).
"""
from __future__ import annotations

import json
from pathlib import Path
from string import Template

from ..errors import LoraCompressError
from ..version import __version__

MODEL_TYPE = "lora_compressed"  # config.json's model_type in format 2; the modeling file's name and weights variant
VARIANT = MODEL_TYPE  # transformers' variant of the weights files: model.lora_compressed.safetensors
MODELING = "modeling_lora_compressed.py"
TEMPLATE = Path(__file__).with_name(MODELING + ".tmpl")
OWN_KEYS = ("auto_map", "base_model_type", "lora_layers", "lora_experts", "lora_shared")  # not the base's keys
TASK_CLASSES = (  # the Auto class of a transformers model class, most specific first
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("AutoModelForPreTraining", "MODEL_FOR_PRETRAINING_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
)


def auto_class(class_name: str) -> str:
    """The transformers Auto class whose task ``class_name`` serves (``AutoModel`` when none names it).

    Example:
        >>> auto_class("LlamaForCausalLM")
        'AutoModelForCausalLM'
    """
    from transformers.models.auto import modeling_auto

    for auto, mapping in TASK_CLASSES:
        for names in getattr(modeling_auto, mapping, {}).values():
            if class_name in ((names,) if isinstance(names, str) else names):
                return auto
    return "AutoModel"


def write_remote_code(folder: Path, base: dict, model_class: str, layers: dict, experts: dict | None = None) -> None:
    """config.json and the modeling file of a compressed folder.

    Args:
        base: the base model's config as a dict (``config.to_dict()``).
        model_class: the transformers class of the base model, e.g. ``LlamaForCausalLM``.
        layers: the manifest's layer table; entries with a rank are factored.
        experts: the manifest's split experts modules (name → layout), if any.
    """
    import transformers

    config_class = _config_class_name(base["model_type"])
    if not hasattr(transformers, model_class) or not hasattr(transformers, config_class):
        raise LoraCompressError(f"{model_class} is not a transformers class; lora-compress writes folders for "
                                f"architectures that transformers ships")
    task, class_name = auto_class(model_class), f"LoraCompressed{model_class}"
    module = MODELING.removesuffix(".py")
    config = {**base, "base_model_type": base["model_type"], "architectures": [class_name],
              "auto_map": {"AutoConfig": f"{module}.LoraCompressedConfig", task: f"{module}.{class_name}"},
              **remote_entries(layers, experts)}
    (folder / "config.json").write_text(_dump(config))
    (folder / MODELING).write_text(Template(TEMPLATE.read_text()).substitute(
        version=__version__, base_model=model_class, base_config=config_class, auto_class=task,
        base_model_type=base["model_type"], class_name=class_name, variant=VARIANT))


def _dump(config: dict) -> str:
    """Indented JSON, with one line per factored layer."""
    placeholder = '"<lora_layers>"'
    text = json.dumps({**config, "lora_layers": placeholder[1:-1]}, indent=2, sort_keys=True)
    rows = ",\n".join(f"    {json.dumps(name)}: {json.dumps(row)}" for name, row in config["lora_layers"].items())
    return text.replace(placeholder, "{\n" + rows + "\n  }" if rows else "{}") + "\n"


def remote_entries(layers: dict, experts: dict | None = None) -> dict:
    """config.json's ``lora_layers``, ``lora_experts`` and ``lora_shared`` from the manifest's layers and experts."""
    return {"lora_layers": factored_layers(layers), "lora_experts": experts or {},
            "lora_shared": {name: [layer["shared"]["factor"], layer["shared"]["with"]]
                            for name, layer in layers.items() if layer.get("shared") and layer.get("rank")}}


def factored_layers(layers: dict) -> dict:
    """``{module: [out, in, rank, bias]}`` of the manifest's factored layers."""
    return {name: [*layer["shape"], layer["rank"], bool(layer["bias"])]
            for name, layer in layers.items() if layer.get("rank") is not None}


def _config_class_name(model_type: str) -> str:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        raise LoraCompressError(f"model type {model_type!r} is not one transformers ships; lora-compress writes "
                                f"folders for architectures that transformers ships")
    return CONFIG_MAPPING_NAMES[model_type]


def is_remote_config(config: dict) -> bool:
    """True for the config.json of a compressed folder (format 2 on; format 1 had the base's config alone)."""
    return isinstance(config.get("base_model_type"), str) and "lora_layers" in config


def base_config(config: dict, model_class: str):
    """The base model's transformers config from a compressed folder's config.json dict."""
    from transformers import CONFIG_MAPPING

    base = {key: value for key, value in config.items() if key not in OWN_KEYS}
    base.update(model_type=config["base_model_type"], architectures=[model_class])
    return CONFIG_MAPPING[base["model_type"]].from_dict(base)
