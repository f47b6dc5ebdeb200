"""Fixtures: tiny random Llama, BERT, GPT-2, mixture-of-experts (Mixtral, Qwen2-MoE, Qwen3-MoE) and
encoder-decoder (T5, BART) checkpoints saved with safetensors, the same compressed (``compressed``), and the
real models. Helpers shared by the test files (the CLI's ``run``, ...) are in helpers.py."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from fault_catalogue import CATALOGUE_PROPERTY, table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

TEXT = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of having "
        "nothing to do: once or twice she had peeped into the book her sister was reading, but it had "
        "no pictures or conversations in it, and what is the use of a book, thought Alice, without "
        "pictures or conversations?\n\n") * 8


def _tiny_tokenizer(folder: Path):
    """A word-level tokenizer built offline with the tokenizers library."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(TEXT.replace(",", " , ").replace(":", " : ").replace("?", " ? ").split()))
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    fast.save_pretrained(folder)
    return len(vocab)


def _save(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def build_llama(folder: Path, vocab: int = 64, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def build_bert(folder: Path, vocab: int = 64):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=256)
    return BertModel(config).eval()


def build_gpt2(folder: Path, vocab: int = 64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256)
    return GPT2LMHeadModel(config).eval()


def build_gemma2(folder: Path, vocab: int = 64):
    """Sliding-window and full-attention layers alternate, so the blocks' masks differ."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                          max_position_embeddings=256, layer_types=["sliding_attention", "full_attention"] * 2)
    return Gemma2ForCausalLM(config).eval()


def build_mixtral(folder: Path, vocab: int = 64):
    """4 experts, 2 per token: the experts hold 86% of the targeted weights (36,864 of 43,008)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=256, tie_word_embeddings=True)
    return MixtralForCausalLM(config).eval()


def build_qwen2_moe(folder: Path, vocab: int = 64):
    """4 routed experts beside a shared expert with its own sigmoid gate (a router, left dense)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen2MoeConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                            shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                            tie_word_embeddings=True)
    return Qwen2MoeForCausalLM(config).eval()


def build_qwen3_moe(folder: Path, vocab: int = 64):
    """8 experts, 2 per token."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=8, num_experts_per_tok=2, max_position_embeddings=256, tie_word_embeddings=True)
    return Qwen3MoeForCausalLM(config).eval()


def build_t5(folder: Path, vocab: int = 64):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(config).eval()


def build_bart(folder: Path, vocab: int = 64):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
                        pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=1,
                        forced_eos_token_id=None)
    return BartForConditionalGeneration(config).eval()


def build_bert_classifier(folder: Path, vocab: int = 64):
    """A BERT encoder with a sequence-classification head (a task head, left dense)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=256, num_labels=3)
    return BertForSequenceClassification(config).eval()


BUILDERS = {"llama": build_llama, "bert": build_bert, "gpt2": build_gpt2}  # every tiny_model test runs on each
MORE_BUILDERS = {"gemma2": build_gemma2, "mixtral": build_mixtral, "qwen2_moe": build_qwen2_moe,  # in tiny_models
                 "qwen3_moe": build_qwen3_moe, "t5": build_t5, "bart": build_bart,  # only, for the tests that
                 "bert_classifier": build_bert_classifier}  # need them
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
SEQ2SEQ = ("t5", "bart")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Folders with config.json, model.safetensors and a tokenizer for each tiny architecture."""
    root = tmp_path_factory.mktemp("tiny")
    folders = {}
    for name, build in {**BUILDERS, **MORE_BUILDERS}.items():
        folder = root / name
        vocab = _tiny_tokenizer(folder)
        folders[name] = _save(build(folder, vocab=vocab), folder)
    return folders


class _Compressed(dict):
    """Tiny model name → its folder compressed to 30% of its targeted parameters (plain SVD), each made on first use."""

    def __init__(self, models: dict[str, Path], root: Path):
        super().__init__()
        self.models, self.root = models, root

    def __missing__(self, arch: str) -> Path:
        import lora_compress as lc

        self[arch] = self.root / arch
        lc.compress(str(self.models[arch]), self[arch], lc.CompressConfig(ratio=0.3), progress=False)
        return self[arch]


@pytest.fixture(scope="session")
def compressed(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """``compressed["llama"]``: each tiny model compressed at ratio 0.3, shared by the whole session; read them,
    never change them (copy one first: ``shutil.copytree``)."""
    return _Compressed(tiny_models, tmp_path_factory.mktemp("compressed"))


@pytest.fixture(params=sorted(BUILDERS))
def tiny_model(request, tiny_models) -> Path:
    """Each tiny architecture in turn."""
    return tiny_models[request.param]


@pytest.fixture(params=MOE)
def moe_model(request, tiny_models) -> Path:
    """Each tiny mixture-of-experts architecture in turn."""
    return tiny_models[request.param]


@pytest.fixture(params=SEQ2SEQ)
def seq2seq_model(request, tiny_models) -> Path:
    """Each tiny encoder-decoder architecture in turn."""
    return tiny_models[request.param]


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return path


def _real(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} missing: run python scripts/prepare_examples.py")
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from prepare_examples import MINILM
    return _real(MINILM)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from prepare_examples import SMOLLM2
    return _real(SMOLLM2)


@pytest.fixture(scope="session")
def gemma_dir() -> Path:
    from prepare_examples import GEMMA
    return _real(GEMMA)


@pytest.fixture(scope="session")
def real_text_dir() -> Path:
    from prepare_examples import TEXT
    return _real(TEXT)


_faults: list[tuple[str, str, bool]] = []  # (command, class, clean) of the fault catalogue's cases run


def pytest_runtest_logreport(report):
    """Gather the outcome of each fault catalogue case (tests/test_faults.py)."""
    if report.when == "call":
        _faults.extend((*where, report.passed) for key, where in report.user_properties if key == CATALOGUE_PROPERTY)


def pytest_terminal_summary(terminalreporter):
    """The fault catalogue's table: cases per command and class, and how many ended clean."""
    if _faults:
        terminalreporter.write_sep("-", "fault catalogue")
        terminalreporter.write_line(table(_faults))
