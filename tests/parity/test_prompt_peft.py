"""leantune's prompt tuning against PEFT 0.21's, live on the tiny Llama: PEFT computes every reference.

From one seed (or one init text) both sides build the same prompt; with the same prompt they compute
the same logits, loss and gradient, generate the same tokens, and load each other's saved adapters.
"""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import PeftModel, PromptTuningConfig, get_peft_model  # noqa: E402

from leantune.adapters.base import adapter_modules, format_trainable, mark_only_adapters_trainable, prepare_inputs  # noqa: E402
from leantune.adapters.prompt import inject_prompt  # noqa: E402
from leantune.checkpoint.adapter_io import load_adapter, save_adapter  # noqa: E402
from tests.parity.conftest import greedy_by_full_forward, ours_forward, padded_batch  # noqa: E402

N = 6
TEXT = "answer the question"



def build_both(base, tokenizer=None, model_dir=None):
    ours = copy.deepcopy(base)
    torch.manual_seed(0)
    inject_prompt(ours, N, tokenizer(TEXT)["input_ids"] if tokenizer else None)
    mark_only_adapters_trainable(ours)
    text = dict(prompt_tuning_init="TEXT", prompt_tuning_init_text=TEXT, tokenizer_name_or_path=str(model_dir)) \
        if tokenizer else {}
    torch.manual_seed(0)
    theirs = get_peft_model(copy.deepcopy(base), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, **text))
    return ours, theirs


def prompt_of(model) -> torch.nn.Parameter:
    (adapter,) = adapter_modules(model).values()
    return adapter.prompt_embeddings


@pytest.fixture
def batch():
    return padded_batch(3)  # a left-padded row: the mask must line up behind the virtual tokens


def test_same_seed_builds_the_same_random_prompt_and_count_line(tiny_llama):
    ours, theirs = build_both(tiny_llama)
    torch.testing.assert_close(prompt_of(ours), theirs.prompt_encoder["default"].embedding.weight, rtol=0, atol=0)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        theirs.print_trainable_parameters()
    assert format_trainable(ours) == out.getvalue().strip()


def test_text_init_takes_the_same_token_embeddings(tiny_llama, tiny_tokenizer, tiny_llama_dir):
    ours, theirs = build_both(tiny_llama, tiny_tokenizer, tiny_llama_dir)
    torch.testing.assert_close(prompt_of(ours), theirs.prompt_encoder["default"].embedding.weight, rtol=0, atol=0)


def test_forward_loss_and_gradient_match_peft(tiny_llama, batch):
    ids, mask = batch
    ours, theirs = build_both(tiny_llama)
    labels = ids.masked_fill(mask == 0, -100)
    a, b = ours_forward(ours, ids, mask, labels), theirs(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=1e-6)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(prompt_of(ours).grad, theirs.prompt_encoder["default"].embedding.weight.grad,
                               rtol=0, atol=1e-6)


def test_saved_adapters_load_both_ways_with_identical_logits(tiny_llama, batch, tmp_path):
    ids, mask = batch
    ours, theirs = build_both(tiny_llama)
    with torch.no_grad():
        prompt_of(ours).add_(0.5)
    save_adapter(ours, tmp_path / "ours")
    in_peft = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path / "ours").eval()
    torch.testing.assert_close(in_peft(input_ids=ids, attention_mask=mask).logits,
                               ours_forward(ours, ids, mask).logits, rtol=0, atol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    in_ours = copy.deepcopy(tiny_llama)
    load_adapter(in_ours, tmp_path / "theirs")
    torch.testing.assert_close(ours_forward(in_ours, ids, mask).logits,
                               theirs.eval()(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)


def test_generate_keeps_the_prompt_attached_like_peft(tiny_llama):
    """Our generate with the prompt attached = greedy decoding by full forwards through PEFT's model."""
    ours, theirs = build_both(tiny_llama)
    ids = torch.tensor([[7, 8, 9, 10, 11]])
    mask = torch.ones_like(ids)
    opts = dict(max_new_tokens=6, do_sample=False, pad_token_id=3)
    with torch.no_grad():
        new_ours = ours.eval().generate(**prepare_inputs(ours, {"input_ids": ids, "attention_mask": mask}), **opts)
        plain = tiny_llama.generate(input_ids=ids, attention_mask=mask, **opts)
    theirs.eval()
    reference = greedy_by_full_forward(lambda x: theirs(input_ids=x, use_cache=False).logits, ids, 6)
    assert new_ours.tolist()[0] == reference
    assert new_ours.tolist()[0] != plain.tolist()[0][ids.shape[1]:]  # the prompt really steers generation
