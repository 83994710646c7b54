"""Shared fixtures: tiny random models built from configs in temp dirs. No test touches a model hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each xdist worker gets one of the machine's cores; two threads per worker would oversubscribe.
    import torch

    torch.set_num_threads(1)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a journey of a thousand miles begins with a single step",
    "what is the capital of france? the capital of france is paris.",
    "write a haiku about the sea. waves fold into foam, salt wind hums.",
    "instruction input output response user assistant system",
    "one two three four five six seven eight nine ten",
] * 20


def build_tokenizer(chat_template: str | None = CHATML, bos: bool = False):
    """A byte-level BPE (vocab ~400) with ChatML specials; bos=True makes it prepend <s> like Llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                   unk_token="<unk>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


def build_llama(tmp_dir, vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 64, tie: bool = False):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=tie,
                      bos_token_id=1, eos_token_id=5, pad_token_id=3)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_dir)
    return model


def save_tiny_llama(folder, chat_template: str | None = CHATML, **llama):
    """A complete HF folder: the BPE tokenizer above and a random Llama sized to its vocabulary;
    `llama` takes build_llama's keywords (seed, layers, hidden, tie)."""
    tok = build_tokenizer(chat_template)
    tok.save_pretrained(folder)
    build_llama(folder, vocab_size=len(tok), **llama)
    return folder


def assert_one_line_error(out, words) -> None:
    """The CLI's error contract on captured output: one line on stderr, `error: ...`, no traceback, naming `words`."""
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    assert "Traceback" not in out.err + out.out
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved 2-layer random Llama (hidden 64) with a ChatML BPE tokenizer: a complete HF folder."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def wide_llama_dir(tmp_path_factory):
    """The same 2-layer Llama at hidden 256: rows a multiple of 256, so GGUF k-quants apply, and a micro-batch's
    activations large enough to dwarf the noise of a process's RSS."""
    return save_tiny_llama(tmp_path_factory.mktemp("wide-llama"), hidden=256, layers=2)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture
def tiny_llama(tiny_llama_dir):
    """A fresh fp32 copy of the tiny Llama for each test (tests may mutate it)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
