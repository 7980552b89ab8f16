"""Prompts in a base model's chat template: the post-training rows, stored once in the project's
format, re-rendered for a tokenizer that has one (and left as they are for one that has not), one
bos token, a template's refusal named, and a tokenizer without a pad token."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llm_assets.hf_models import load_tokenizer
from llm_assets.posttrain.rows import in_template
from llm_assets.prompts import PromptError, parse_prompt, render_chat, render_prompt
from llm_assets_tests.base_model.test_end_to_end import save_chatml_tokenizer

CONVERSATION = [{"role": "system", "content": "Be brief.\n"}, {"role": "user", "content": "Hi.\n\nWhat is 2+2?"},
                {"role": "assistant", "content": ""}, {"role": "user", "content": "And 3+3?"}]


@pytest.fixture(scope="module")
def chatml(tmp_path_factory) -> PreTrainedTokenizerFast:
    model_dir = tmp_path_factory.mktemp("chatml")
    save_chatml_tokenizer(model_dir)
    return load_tokenizer(model_dir)


def test_a_prompt_of_the_projects_format_reads_back_as_its_messages():
    for messages in ([], CONVERSATION[1:2], CONVERSATION):
        assert parse_prompt(render_prompt(messages)) == messages
    for text in ("def parse(text):", "### User:\nno blank line### Assistant:\n", "User: hi\n\n### Assistant:\n"):
        with pytest.raises(PromptError, match="not a prompt of the project's format"):
            parse_prompt(text)


def test_rows_are_rendered_in_the_chat_template_with_one_bos(chatml):
    rows = [{"prompt": render_prompt(CONVERSATION), "completion": "6"}]
    [row] = in_template(rows, chatml, "SFT train")
    assert row == {"prompt": "<|im_start|>system\nBe brief.\n<|im_end|>\n<|im_start|>user\nHi.\n\nWhat is 2+2?"
                             "<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n"
                             "<|im_start|>assistant\n", "completion": "6"}
    # The template writes bos and the tokenizer adds it: the rendered prompt leaves it to the tokenizer.
    ids = chatml(row["prompt"]).input_ids
    assert ids.count(chatml.bos_token_id) == 1 and ids[0] == chatml.bos_token_id
    assert render_chat(chatml, CONVERSATION) == row["prompt"]


def test_rows_for_a_tokenizer_without_a_template_are_left_as_they_are(tmp_path):
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>")
    rows = [{"prompt": render_prompt(CONVERSATION[1:2]), "chosen": "4", "rejected": "5"}]
    assert in_template(rows, plain, "reward train") is rows  # the pretrained path's data, and fingerprints, unchanged
    assert render_chat(plain, CONVERSATION[1:2]) == rows[0]["prompt"]


def test_a_template_that_refuses_the_messages_is_named_with_the_row(chatml):
    strict = chatml.__class__.from_pretrained(chatml.name_or_path)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}"
                            "{% endfor %}")
    rows = [{"prompt": render_prompt(CONVERSATION[1:2]), "completion": "4"},
            {"prompt": render_prompt(CONVERSATION[:2]), "completion": "4"}]
    with pytest.raises(ValueError, match=r"SFT val row 1.prompt: the tokenizer's chat template refused the messages "
                                         r"\(roles system, user\): .*System role not supported"):
        in_template(rows, strict, "SFT val")
    with pytest.raises(ValueError, match=r"SFT val row 0.prompt: not a prompt of the project's format"):
        in_template([{"prompt": "plain text", "completion": "x"}], strict, "SFT val")


def test_a_tokenizer_without_a_pad_token_pads_with_eos_and_one_without_eos_is_refused(tmp_path):
    save_chatml_tokenizer(tmp_path / "chatml")
    tokenizer = load_tokenizer(tmp_path / "chatml")
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    bpe = Tokenizer(models.BPE())
    PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>").save_pretrained(tmp_path / "no-eos")
    with pytest.raises(ValueError, match=r"no-eos has no eos_token: .*tokenizer_config.json"):
        load_tokenizer(tmp_path / "no-eos")
