"""What is left dense by default, and why: lm_head, tied weights, routers and the task heads of non-LM models."""
from __future__ import annotations

import torch

from helpers import dense, run
from lora_compress import CompressConfig, LowRankLinear, compress_
from lora_compress.core.targets import find_targets, left_out_reasons


def _tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=16, patch_size=8, num_labels=5)
    return ViTForImageClassification(config).eval()


def test_a_vit_classifier_head_is_left_dense_and_its_encoder_targeted():
    model = _tiny_vit()
    targets = find_targets(model)
    assert "classifier" not in targets
    assert targets and all(name.startswith("vit.") for name in targets)
    assert "task head" in left_out_reasons(model)["classifier"]


def test_a_bert_classifier_keeps_its_head_dense_when_compressed(tiny_models):
    model = dense(tiny_models["bert_classifier"])
    report = compress_(model, CompressConfig(ratio=0.5), progress=False)
    assert isinstance(model.classifier, torch.nn.Linear) and not isinstance(model.classifier, LowRankLinear)
    assert "classifier" not in [layer.name for layer in report.layers]
    assert "bert.pooler.dense" in [layer.name for layer in report.layers]  # part of the base model


def test_a_task_head_is_opted_in_by_a_pattern_naming_it_whole(tiny_models):
    model = dense(tiny_models["bert_classifier"])
    assert list(find_targets(model, include=("classifier",))) == ["classifier"]
    assert list(find_targets(model, include=("pooler|class",))) == ["bert.pooler.dense"]  # 'class' is not all of it


def test_inspect_says_what_is_left_dense_and_why(tiny_models):
    result = run("inspect", str(tiny_models["bert_classifier"]), "--exclude", "pooler")
    assert result.exit_code == 0, result.output
    left = result.output.split("left dense:")[1].splitlines()
    assert any(line.startswith("classifier ") and "task head, outside the base model `bert`" in line for line in left)
    assert any(line.startswith("bert.pooler.dense ") and line.endswith("matches --exclude") for line in left)


def test_only_a_head_left_is_one_line_that_names_it(tiny_models):
    result = run("compress", str(tiny_models["bert_classifier"]), "--out", "unused",
                 "--ratio", "0.5", "--include", "class")
    assert result.exit_code == 2
    assert "error: --include 'class' matches no linear module" in result.output
