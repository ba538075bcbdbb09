"""The step format every stage shares: one agent step is one record, its response

    Thought: <reasoning>
    Action: <action>

The tags live in data/templates/format.json, the system prompts in data/templates/prompts.json;
nothing here pastes a prompt inline. Here: the record's fields and their check (read_steps), the
prompt of step t (build_messages), the chat rendering both training and inference use (render_turn),
and how a response splits into thought and action. Pure functions, the way nanoGPT shares only
model.py. The rest of the shared code, by concern:

    jsonio.py         JSONL, JSON and CSV files: read with file:line errors, written whole, appended and resumed
    provenance.py     a run's identity (made_from, digests), one writer per output (locks), one configuration
    checkpoint_io.py  checkpoint folders from any trainer: listed in step order, checked whole, their base model
    cli.py            what every script's command line shares: numeric flag checks, Ctrl-C without a traceback
    stats.py          bootstrap, Wilson, Fisher and t intervals of the report
    lm.py             which model and device, how a step becomes tokens; sft.py and decode.py: train and decode
    envs/             the environments behind one step interface; eto.py: the ETO/AgentGym importer
"""
import functools
import json
import os
import random
import re

from jsonio import DataError, check_unique_ids, read_jsonl_lines

HERE = os.path.dirname(os.path.abspath(__file__))


TEMPLATES = os.path.join(HERE, "data", "templates")


# Fields every step record must carry (make_data.py writes them, all later stages read them).
STEP_FIELDS = ("id", "env", "task_type", "split", "messages", "thought", "action")


SPLITS = ("train", "id_test", "ood_test")


ENVS = ("alfworld", "scienceworld", "bfcl", "bfcl_mt")


class ContextError(ValueError):
    """A prompt, with the tokens to be generated after it, does not fit the context (never cut silently)."""


@functools.lru_cache(maxsize=None)
def load_template(name):
    path = os.path.join(TEMPLATES, name)
    with open(path) as f:
        return json.load(f)


def tags():
    fmt = load_template("format.json")
    return fmt["thought_tag"], fmt["action_tag"]


def format_response(thought, action):
    """The assistant turn for one step: 'Thought: ...\\nAction: ...'."""
    thought_tag, action_tag = tags()
    return f"{thought_tag} {thought}\n{action_tag} {action}"


def action_only_response(action):
    """The response of action-only SFT (--no-cot) and of prompt-mode history turns."""
    return f"{tags()[1]} {action}"


def response_spans(thought, action):
    """Character spans (start, end) of thought, action tag and action in format_response's output.

    train.py maps these onto tokens by offsets, so the masked tokens are exactly those of the action.
    """
    thought_tag, action_tag = tags()
    text = format_response(thought, action)
    t0 = len(thought_tag) + 1
    tag0 = t0 + len(thought) + 1
    a0 = tag0 + len(action_tag) + 1
    assert text[t0:t0 + len(thought)] == thought and text[a0:] == action
    return {"thought": (t0, t0 + len(thought)), "tag": (tag0, tag0 + len(action_tag)), "action": (a0, len(text))}


def parse_response(text):
    """Split model output into (thought, action). action is None when no action tag was written.

    The action is the first line after the last action tag; the thought is what stands before
    that tag, without its own tag.
    """
    thought_tag, action_tag = tags()
    i = text.rfind(action_tag)
    if i < 0:
        return text.strip(), None
    before, after = text[:i], text[i + len(action_tag):]
    thought = before.strip()
    if thought.startswith(thought_tag):
        thought = thought[len(thought_tag):].strip()
    action = after.strip().split("\n")[0].strip()
    return thought, action


def first_line(text):
    """The action a prompt-prefilled turn produced: its first non-empty line."""
    for line in text.split("\n"):
        if line.strip():
            return line.strip()
    return ""


def first_words(text, frac, at_least=0):
    """text cut after its first max(at_least, round(frac * n)) of its n words, as the text has them: the spaces,
    tabs and newlines between those words kept (ETO's thoughts span lines), so every cut is a prefix of the
    text; all n words give the whole text, trailing whitespace included."""
    ends = [m.end() for m in re.finditer(r"\S+", text)]
    keep = max(at_least, round(frac * len(ends)))
    return text if keep >= len(ends) else text[:ends[keep - 1]] if keep else ""


def normalize_action(action):
    """Exact-match key: lower case, single spaces, no trailing period."""
    if action is None:
        return None
    return re.sub(r"\s+", " ", action.strip().lower()).rstrip(".").strip()


def same_action(a, b):
    """Do two actions agree? Equal exact-match keys, and an action at all: two empty or missing
    actions (no tag, nothing after it) are two failures to act, not an agreement."""
    a, b = normalize_action(a), normalize_action(b)
    return bool(a) and a == b


def build_messages(env, task, observations, actions, window, functions=None):
    """Chat messages of the prompt at step t = len(actions).

    observations: [o_0 .. o_t] (o_t is the current one); actions: [a_0 .. a_{t-1}].
    History turns show past actions only (no past reasoning), so prompt-mode and CoT-mode
    rollouts see the same kind of history. Only the last `window` exchanges are kept; the
    first user turn (task + first observation) is always kept.
    """
    if len(observations) != len(actions) + 1:
        raise ValueError(f"need one more observation than actions, got {len(observations)} and {len(actions)}")
    prompts = load_template("prompts.json")[env]
    first = prompts["first_user"].format(task=task, observation=observations[0], functions=functions or "")
    messages = [{"role": "system", "content": prompts["system"]}, {"role": "user", "content": first}]
    t = len(actions)
    start = max(0, t - window)
    if start > 0:
        omitted = load_template("format.json")["history_omitted"].format(n=start)
        messages[1]["content"] += "\n" + omitted
    for i in range(start, t):
        messages.append({"role": "assistant", "content": action_only_response(actions[i])})
        messages.append({"role": "user", "content": observations[i + 1]})
    return messages


# A private-use character that stands in for the assistant's reply while a chat template renders a turn.
RESPONSE_MARK = "\ue000"


# Templates with a dated system header (Llama-3.x writes "Today Date: ..." from the clock) get a fixed date,
# or a prompt rendered at training time and one rendered at inference would differ.
TEMPLATE_KWARGS = {"date_string": "26 Jul 2024"}


def render_turn(tokenizer, messages):
    """(prompt, end): how the model's chat template renders `messages` followed by an assistant turn,
    split around that turn's content. prompt is what stands before the reply, end what the template
    writes after it (its end of turn). This one rule is used for training (prompt + response + end) and
    for inference (the model continues prompt), so both see the same tokens, also where a template is not
    prefix-preserving: Qwen3's writes an empty <think></think> block before the final assistant message
    but not at the end of its generation prompt, so the prompt here includes that block."""
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": RESPONSE_MARK}], tokenize=False,
                                         **TEMPLATE_KWARGS)
    if full.count(RESPONSE_MARK) != 1:
        raise ValueError("the chat template does not render an assistant turn's content as given")
    prompt, end = full.split(RESPONSE_MARK)
    return prompt, end


def render_prompt(tokenizer, messages):
    """The prompt text in the model's own chat template, ending where the assistant's reply starts."""
    return render_turn(tokenizer, messages)[0]


def check_step(rec, where):
    """Validate one step record's field types; where = 'file:line' for the message."""
    for field in STEP_FIELDS:
        if field not in rec:
            raise DataError(f"{where}: missing field '{field}'")
    for field in ("id", "env", "task_type", "split", "thought", "action"):
        if not isinstance(rec[field], str):
            raise DataError(f"{where}: field '{field}' must be a string, got {type(rec[field]).__name__}")
    if not rec["action"].strip():
        raise DataError(f"{where}: field 'action' is empty")
    if rec["split"] not in SPLITS:
        raise DataError(f"{where}: field 'split' is {rec['split']!r}, expected one of {', '.join(SPLITS)}")
    if rec["env"] not in ENVS:
        raise DataError(f"{where}: field 'env' is {rec['env']!r}, expected one of {', '.join(ENVS)}")
    if not isinstance(rec.get("task_id", ""), str):
        raise DataError(f"{where}: field 'task_id' must be a string, got {type(rec['task_id']).__name__}")
    cands = rec.get("candidates")
    if cands is not None and not (isinstance(cands, list) and all(isinstance(c, str) for c in cands)):
        raise DataError(f"{where}: field 'candidates' must be null or a list of strings")
    check_messages(rec.get("messages"), where)


def check_messages(msgs, where):
    """A prompt: a non-empty list of {role, content} strings that ends with a user turn."""
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} strings")
    if msgs[-1]["role"] != "user":
        raise DataError(f"{where}: field 'messages' must end with a user turn, not {msgs[-1]['role']!r}")


def read_steps(path, with_lines=False):
    """Step records of one JSONL file, each checked by check_step, ids unique ([(line, record)] with_lines)."""
    numbered = read_jsonl_lines(path)
    for lineno, rec in numbered:
        check_step(rec, f"{path}:{lineno} (id={rec.get('id')!r})")
    check_unique_ids(numbered, path)
    return numbered if with_lines else [rec for _, rec in numbered]


def read_steps_files(paths):
    """Step records of several files, in order; an id repeated across files is an error too."""
    records, first = [], {}
    for path in paths:
        for lineno, rec in read_steps(path, with_lines=True):
            if rec["id"] in first:
                raise DataError(f"{path}:{lineno}: field 'id': duplicate {rec['id']!r} (first in {first[rec['id']]})")
            first[rec["id"]] = f"{path}:{lineno}"
            records.append(rec)
    return records


def sample_per_split(records, n, seed):
    """{(env, split): records} with at most n records per env x split, in file order, drawn with a
    generator of its own per group, so probe.py and make_conflicts.py given the same n and seed pick
    the same steps (n = 0: all)."""
    groups = {}
    for rec in records:
        groups.setdefault((rec["env"], rec["split"]), []).append(rec)
    for (env, split), recs in groups.items():
        if n and len(recs) > n:
            pick = sorted(random.Random(f"sample/{seed}/{env}/{split}").sample(range(len(recs)), n))
            groups[(env, split)] = [recs[i] for i in pick]
    return dict(sorted(groups.items()))
