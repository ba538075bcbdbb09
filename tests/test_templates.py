"""Chat templates of the paper's model families, on SmolLM2's real tokenizer: one rendering rule for training
and inference (steps.render_turn), an exact action mask, the same prompt tokens at inference as in
training, and the template's own end-of-turn token ending generation.

The templates below are written for these tests to reproduce each family's rendering behaviour: Qwen3
(an empty think block before the final assistant message only; its generation prompt stops before it),
Qwen2.5 (ChatML with a default system prompt), Llama-3.1 (a system header dated from the clock, <|eot_id|>
ending turns while eos_token is another token), Mistral ([INST] ... [/INST], the reply ended by </s>).
"""
import os

import pytest
import torch

import decode
import lm
import steps

QWEN3 = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
QWEN25 = (
    "{%- if messages[0].role != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA31 = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
    "{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}{%- endif %}"
    "{%- if messages[0].role == 'system' %}{%- set system_message = messages[0].content | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\nToday Date: ' + date_string"
    " + '\\n\\n' + system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
MISTRAL = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}{{- '[SYSTEM_PROMPT]' + message.content + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message.role == 'user' %}{{- '[INST]' + message.content + '[/INST]' }}"
    "{%- else %}{{- message.content + eos_token }}{%- endif %}"
    "{%- endfor %}")
FAMILIES = {"qwen3": (QWEN3, [], None), "qwen2.5": (QWEN25, [], None),
            "llama3.1": (LLAMA31, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], None),
            "mistral": (MISTRAL, ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"], "</s>")}
END_OF_TURN = {"qwen3": "<|im_end|>", "qwen2.5": "<|im_end|>", "llama3.1": "<|eot_id|>", "mistral": "</s>"}


def family_tokenizer(name):
    template, special, eos = FAMILIES[name]
    tok = lm.load_tokenizer(lm.resolve_model(lm.EMBEDDED))
    tok.add_special_tokens({"additional_special_tokens": special + ([eos] if eos else [])})
    if eos:
        tok.eos_token = eos
    tok.chat_template = template
    return tok


def records(small_data):
    return [r for name in ("alfworld_train.jsonl", "bfcl_train.jsonl")
            for r in steps.read_steps(os.path.join(small_data[0], name))[:6]]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_training_and_inference_see_the_same_prompt(family, small_data):
    tok = family_tokenizer(family)
    eot = lm.end_of_turn_id(tok)
    assert tok.convert_ids_to_tokens(eot) == END_OF_TURN[family]
    if family == "llama3.1":
        assert eot != tok.convert_tokens_to_ids(tok.eos_token)  # the turn ends with a token that is not eos
    for rec in records(small_data):
        ids, labels, kinds = lm.encode_step(tok, rec, mask_action=True)
        n_prompt = kinds.index(lm.THOUGHT) if lm.THOUGHT in kinds else kinds.index(lm.TAG)
        assert all(k == lm.PROMPT for k in kinds[:n_prompt])
        # Inference renders the same prompt (steps.render_prompt) and tokenizes it with the tag that follows it
        # (decode.encode_parts), as training did: a prompt ending in "\n\n" (Qwen3's think block, Llama's header)
        # tokenizes differently alone than before a word, so tokenizing it alone would not match.
        prompt = steps.render_prompt(tok, rec["messages"])
        for tag in steps.tags():
            assert decode.encode_parts(tok, [prompt, tag])[0] == ids[:n_prompt], (rec["id"], tag)
        # The action mask is exact: the masked tokens spell the action, nothing more.
        action_pos = [i for i, k in enumerate(kinds) if k == lm.ACTION]
        assert tok.decode([ids[i] for i in action_pos]).strip() == rec["action"]
        assert all(labels[i] == -100 for i in action_pos)
        assert tok.decode([ids[i] for i, k in enumerate(kinds) if k == lm.TAG]).strip() == "Action:"
        # The template's end of turn is supervised, and nothing after it.
        supervised_end = [ids[i] for i, k in enumerate(kinds) if k == lm.END and labels[i] != -100]
        assert supervised_end and supervised_end[-1] == eot
        assert all(labels[i] == -100 for i in range(ids.index(eot, n_prompt) + 1, len(ids)))


def test_qwen3_template_is_not_prefix_preserving_and_the_prompt_keeps_its_think_block(small_data):
    tok = family_tokenizer("qwen3")
    rec = records(small_data)[2]
    response = steps.format_response(rec["thought"], rec["action"])
    full = tok.apply_chat_template(rec["messages"] + [{"role": "assistant", "content": response}], tokenize=False)
    generation_prompt = tok.apply_chat_template(rec["messages"], tokenize=False, add_generation_prompt=True)
    assert not full.startswith(generation_prompt + response)  # what broke training before
    prompt = steps.render_prompt(tok, rec["messages"])
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and full.startswith(prompt + response)


def test_llama_prompt_does_not_depend_on_the_day(small_data):
    tok = family_tokenizer("llama3.1")
    prompt = steps.render_prompt(tok, records(small_data)[0]["messages"])
    assert "Today Date: 26 Jul 2024" in prompt


class FixedHead(torch.nn.Module):
    """An output layer whose greedy choice is always one token."""

    def __init__(self, vocab, token):
        super().__init__()
        self.vocab, self.token = vocab, token

    def forward(self, hidden):
        logits = torch.zeros(*hidden.shape[:-1], self.vocab)
        logits[..., self.token] = 10.0
        return logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_templates_end_of_turn_stops_generation(family, tiny_model, small_data):
    from transformers import AutoModelForCausalLM
    tok = family_tokenizer(family)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.resize_token_embeddings(len(tok))
    model.eval()
    rec = records(small_data)[0]
    prompt_ids = tok(steps.render_prompt(tok, rec["messages"]), add_special_tokens=False)["input_ids"]
    tag = tok(" Action:", add_special_tokens=False)["input_ids"]
    for token, should_end in ((lm.end_of_turn_id(tok), True), (tok.convert_tokens_to_ids("a"), False)):
        model.lm_head = FixedHead(len(tok), token)
        state = decode.encode_prompts(model, [prompt_ids], tok.pad_token_id)
        out = decode.run_branches(model, tok, state, [{"row": 0, "prefix": tag, "max_new": 4, "stop": "line"}])[0]
        assert out["ended"] is should_end and (out["ids"] == [] if should_end else len(out["ids"]) == 4)
