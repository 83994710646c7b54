"""A method asked of a model it cannot attach to, or configured wrongly, fails before training starts:
one line that names what would work, exit code 2, no traceback, and no run folder written."""

from __future__ import annotations

import pytest
from torch import nn
from transformers import PretrainedConfig

from leantune.cli.main import main
from tests.conftest import assert_one_line_error

from .test_bad_input import _train


# Each case: builder(tmp_path, model_dir) -> argv, words the message must contain
def case_dora_on_a_non_linear_module(t, m):
    return _train(t, m, "--method", "dora", "--lora.targets", "mlp"), ["dora", "LlamaMLP", "not an nn.Linear", "down_proj"]


def case_dora_targets_match_nothing(t, m):
    return _train(t, m, "--method", "dora", "--lora.targets", "[qq_proj]"), ["qq_proj", "q_proj"]


def case_ia3_targets_match_nothing(t, m):
    return _train(t, m, "--method", "ia3", "--ia3.targets", "[key_proj]"), ["ia3.targets", "key_proj", "k_proj"]


def case_ia3_feedforward_outside_targets(t, m):
    return (_train(t, m, "--method", "ia3", "--ia3.targets", "[k_proj,v_proj]", "--ia3.feedforward", "[down_proj]"),
            ["ia3.feedforward", "down_proj", "ia3.targets"])


def case_ia3_on_a_non_linear_module(t, m):
    return (_train(t, m, "--method", "ia3", "--ia3.targets", "[self_attn]", "--ia3.feedforward", "[]"),
            ["ia3", "LlamaAttention", "k_proj"])


def case_bottleneck_sublayer_names_match_nothing(t, m):
    return (_train(t, m, "--method", "bottleneck", "--bottleneck.ffn", "[feed_forward]"),
            ["bottleneck.ffn", "feed_forward", "mlp", "self_attn"])


def case_bottleneck_size_zero(t, m):
    return _train(t, m, "--method", "bottleneck", "--bottleneck.size", "0"), ["bottleneck.size", "> 0"]


def case_bottleneck_unknown_style(t, m):
    return _train(t, m, "--method", "bottleneck", "--bottleneck.style", "houlsbi"), ["houlsby", "pfeiffer"]


def case_prompt_without_virtual_tokens(t, m):
    return _train(t, m, "--method", "prompt", "--prompt.virtual_tokens", "0"), ["prompt.virtual_tokens", "20-100"]


def case_prompt_text_init_without_text(t, m):
    return _train(t, m, "--method", "prompt", "--prompt.init", "text"), ["prompt.init_text", "random"]


def case_prefix_without_virtual_tokens(t, m):
    return _train(t, m, "--method", "prefix", "--prefix.virtual_tokens", "0"), ["prefix.virtual_tokens", "10-200"]


def case_loraplus_ratio_on_ia3(t, m):
    return _train(t, m, "--method", "ia3", "--lora.lr_ratio", "16"), ["lr_ratio", "ia3", "lora/dora"]


def case_unknown_method_suggests(t, m):
    return _train(t, m, "--method", "dorra"), ["method", "dora"]


def case_peft_use_dora_key(t, m):
    config = t / "c.yaml"
    config.write_text(f"model: {m}\noutput_dir: {t / 'run'}\nuse_dora: true\n")
    return ["train", str(config)], ["use_dora", "method: dora"]


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_method_misuse_is_one_line_before_training(case, tmp_path, tiny_llama_dir, capsys):
    argv, words = case(tmp_path, tiny_llama_dir)
    rc = main(argv)
    out = capsys.readouterr()
    assert rc == 2, out
    assert_one_line_error(out, words)
    assert not (tmp_path / "run").exists()  # refused before the run folder (and any training) exists


class _LM(nn.Module):
    """A tiny causal LM whose attention is a stand-in: it ignores past_key_values (or has no such input)."""

    def __init__(self, takes_cache: bool) -> None:
        super().__init__()
        self.config = PretrainedConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=8)
        self.embed = nn.Embedding(10, 8)
        self.takes_cache = takes_cache

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, **kwargs):
        if not self.takes_cache and "past_key_values" in kwargs:
            raise TypeError("forward() got an unexpected keyword argument 'past_key_values'")
        return self.embed(input_ids)  # the cache, if given, is never read


@pytest.mark.parametrize("takes_cache", [True, False], ids=["ignores-cache", "no-cache-argument"])
def test_prefix_on_attention_that_reads_no_cache_is_refused(takes_cache):
    from leantune.adapters.base import adapter_modules
    from leantune.adapters.prefix import inject_prefix
    from leantune.errors import ModelError

    model = _LM(takes_cache)
    with pytest.raises(ModelError, match="prefix tuning needs .*use method prompt or lora"):
        inject_prefix(model, 4)
    assert not adapter_modules(model)  # refused before the model was touched
