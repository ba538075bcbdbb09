"""evaluate.py: online rollouts of prompt actions vs CoT actions, in-domain and out-of-domain, many envs at once.

Runs whole episodes on the test tasks of the step data (make_data.py's <data>/<env>_<split>.jsonl
name the episodes; the environments rebuild them) with the same prompt format as training:
  prompt  the turn is prefilled with the action tag; the model writes the action line
  cot     the turn is prefilled with the thought tag; the model reasons, then writes the action
With --log-both (default) every step also records what the other mode would have done in that same
state, so CoT-vs-prompt agreement is measured on-policy. --policy expert / random give the ceiling and
the floor. --num-envs environments run in lockstep, each in its own worker process (python -m envs --serve);
each step's prompts go through one batched pass (decode.run_branches: left padding, KV cache). Finished
episodes are replaced by new ones, longest first prompt first (--order), so a batch pads little. A worker
that crashes or hangs (--step-timeout) is restarted and the episode retried once, then recorded with its
error. An invalid or empty action is sent as is.

Writes to --out: episodes.jsonl (one line per episode, appended and flushed; a rerun skips ids
already there), summary.jsonl and summary.csv (success, score, steps, invalid actions and on-policy
agreement per checkpoint x env x split x mode with bootstrap 95% intervals, plus mode "cot-prompt":
the paired CoT-minus-prompt difference on the same tasks), meta.json. One record:
    "id":          "k0.3_seed0/checkpoint-000040/cot/alfworld/ood_test/pick_two_obj_and_place-1/trial_0"
    "checkpoint":  "k0.3_seed0/checkpoint-000040"    "step": 40    (base model: "base", 0; "expert", "random")
    "env", "task_type", "split", "task_id", "mode":  "cot"
    "won": false, "score": 0.0, "steps": 24, "max_steps": 24, "expert_steps": 8   (the cap; the expert's path length)
    "invalid_actions": 12, "agreement": 0.34, "error": null, "errored": false, "tries": 1   (2: its worker was restarted)
    "transcript":  [{"obs": "...", "output": " I need ...\\nAction: go to shelf 1", "action": "go to shelf 1",
                     "other_action": "take mug 1 from shelf 1", "invalid": false}, ...]

    python evaluate.py --adapter runs/k0.3_seed0 --env all --split id_test,ood_test --mode both
    python evaluate.py --policy expert --env alfworld,bfcl --data /tmp/d --out /tmp/eval_expert
"""
import argparse
import collections
import json
import math
import os
import random
import select
import subprocess
import sys
import time

# The flags that change episodes: a rerun into the same --out resumes only with these (and the same test
# files, base model and checkpoint weights); the others (parallelism, backend, threads, device) change speed only.
RESULT_FLAGS = ("policy", "mode", "no_log_both", "env", "split", "max_episodes", "max_steps", "max_steps_factor",
                "history", "max_action_tokens", "max_thought_tokens", "max_len", "seed", "dtype")
parser = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    epilog="An output folder holds one configuration and one writer: a rerun into it resumes only with the same "
           + ", ".join("--" + f.replace("_", "-") for f in RESULT_FLAGS if f != "dtype") + ", test files, base model, "
           "precision and checkpoint weights (new checkpoints may join); otherwise one line says what differs. "
           "A second process on it is refused.")
# what to run
parser.add_argument("--policy", default="model", choices=["model", "expert", "random"], help="who acts")
parser.add_argument("--model", default="", help="base model: hub id, local folder, or smollm2-135m (embedded); default: the "
                                                 "adapters' own base_model_name_or_path where it is a local folder, else smollm2-135m")
parser.add_argument("--adapter", nargs="*", default=[], help="train.py checkpoint folders, or run folders (their last checkpoint)")
parser.add_argument("--all-checkpoints", action="store_true", help="run folders expand to every checkpoint, not just the last")
parser.add_argument("--with-base", action="store_true", help="also evaluate the base model when --adapter is given")
parser.add_argument("--mode", default="both", choices=["prompt", "cot", "both"], help="how the model acts")
parser.add_argument("--no-log-both", action="store_true", help="do not record the other mode's action at each step")
# which episodes
parser.add_argument("--env", default="all", help="comma list of alfworld, scienceworld, bfcl, bfcl_mt, or all (those the --data folder has)")
parser.add_argument("--split", default="id_test,ood_test", help="comma list of id_test, ood_test")
parser.add_argument("--data", default="data/generated", help="make_data.py output folder: its <env>_<split>.jsonl name the episodes")
parser.add_argument("--max-episodes", type=int, default=0, help="per env x split, a seeded sample of this many episodes (0 = all)")
parser.add_argument("--max-steps", type=int, default=0, help="cap on steps per episode (0 = the env's own: ALFWorld 50, ScienceWorld per task, BFCL 1, multi-turn BFCL 2x the expert path)")
parser.add_argument("--max-steps-factor", type=float, default=0.0,
                    help="also cap each episode at ceil(F x its expert path length in the step data) steps (0 = no such cap)")
parser.add_argument("--history", type=int, default=4, help="past exchanges kept in the prompt (as in make_data.py)")
# generation
parser.add_argument("--backend", default="hf", choices=["hf", "generate"],
                    help="hf (batched branches, CPU or GPU) or generate (reference: one HF generate call per state and "
                         "mode on the full prompt, as ReAct/ETO loops do; for checks and benchmarks)")
parser.add_argument("--max-action-tokens", type=int, default=96, help="greedy tokens for an action line")
parser.add_argument("--max-thought-tokens", type=int, default=192, help="greedy tokens for reasoning + action in cot mode")
parser.add_argument("--max-rows", type=int, default=16, help="generation rows per forward pass (hf backend)")
parser.add_argument("--max-len", type=int, default=0, help="most tokens of a prompt plus its generation; a longer one stops "
                                                          "the run with an error naming the episode (0 = the model's context)")
# run
parser.add_argument("--num-envs", type=int, default=8, help="environments stepping in lockstep (worker processes)")
parser.add_argument("--order", default="length", choices=["length", "file"],
                    help="the order episodes take the lockstep slots: length (longest first prompt first, so a batch holds "
                         "prompts of similar length) or file; speed only")
parser.add_argument("--step-timeout", type=float, default=120.0, help="seconds an env reset/step may take before its worker is restarted")
parser.add_argument("--worker-cmd", default="", help="environment worker command (default: this python, python -m envs --serve)")
parser.add_argument("--seed", type=int, default=0, help="episode sample, random policy, bootstrap")
parser.add_argument("--out", default="results/eval", help="output folder")
parser.add_argument("--device", default="auto", help="auto (cuda+bf16 if present, else cpu+fp32), cpu, cuda, cuda:1")
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
args = parser.parse_args()
t0 = time.time()  # "evaluate done: ... s" is the whole run after argument parsing: workers, model load, episodes

from tqdm import tqdm  # noqa: E402

import checkpoint_io  # noqa: E402
import cli  # noqa: E402
import jsonio  # noqa: E402
import provenance  # noqa: E402
import stats  # noqa: E402
import steps  # noqa: E402

cli.exit_cleanly()
HERE = os.path.dirname(os.path.abspath(__file__))
# context_exceeded: the episode ended because its next prompt no longer fit the context (a loss of its own)
METRICS = ["won", "score", "steps", "invalid_rate", "agreement", "context_exceeded"]
TEST_FILES = []  # the step files load_tasks read: the episodes' identity for --out


def fail(msg):
    sys.exit(f"\nerror: {msg}")  # on a line of its own, after any progress bar


# ----------------------------------------------------------------------------- episodes

PROMPT_CHARS = {}  # (split, task id) -> characters of its first prompt in the step data: the queue's order


def load_tasks():
    """Task dicts of the test episodes named by the step data, per env and split, in file order."""
    import envs
    splits = cli.comma_list(args.split, "--split")
    for s in splits:
        if s not in ("id_test", "ood_test"):
            fail(f"--split: unknown split {s!r}; expected id_test and/or ood_test")
    # all: the environments the data folder has test episodes of
    want_envs = [e for e in steps.ENVS if any(os.path.exists(os.path.join(args.data, f"{e}_{s}.jsonl")) for s in splits)] \
        if args.env == "all" else cli.comma_list(args.env, "--env")
    if not want_envs:
        fail(f"{args.data}: no <env>_<split>.jsonl test files for --env all (make them with make_data.py, or pass --data)")
    for e in want_envs:
        if e not in steps.ENVS:
            fail(f"--env: unknown environment {e!r}; expected {', '.join(steps.ENVS)} or all")
    meta_path = os.path.join(args.data, "meta.json")
    data_args = {}
    if os.path.exists(meta_path):
        TEST_FILES.append(meta_path)
        try:
            with open(meta_path) as f:
                data_args = json.load(f)["args"]
            data_args.get("alfworld_data")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            fail(f"{meta_path}: not readable make_data.py metadata ({type(e).__name__}: {e})")
    rng = random.Random(f"episodes/{args.seed}")
    tasks = []
    for env in want_envs:
        known = None
        for split in splits:
            path = os.path.join(args.data, f"{env}_{split}.jsonl")
            if not os.path.exists(path):
                fail(f"{path} not found: make it with make_data.py (or pass --data)")
            numbered = jsonio.read_jsonl_lines(path, required=("task_id",))
            for lineno, r in numbered:
                if not isinstance(r["task_id"], str):
                    fail(f"{path}:{lineno}: field 'task_id' must be a string, got {type(r['task_id']).__name__}")
            expert_steps = collections.Counter(r["task_id"] for _, r in numbered)
            for _, r in numbered:
                PROMPT_CHARS.setdefault((split, r["task_id"]), len(json.dumps(r.get("messages"))))
            TEST_FILES.append(path)
            ids = list(expert_steps)  # file order
            if args.max_episodes and len(ids) > args.max_episodes:
                ids = [ids[i] for i in sorted(rng.sample(range(len(ids)), args.max_episodes))]
            if env == "scienceworld":
                for tid in ids:
                    _, name, var = tid.split("/")
                    tasks.append({"id": tid, "env": env, "task_type": name, "split": split, "task_name": name, "variation": int(var),
                                  "expert_steps": expert_steps[tid]})
                continue
            if known is None:
                if env == "alfworld":
                    root = data_args.get("alfworld_data")
                    if root:
                        root = os.path.join(root, "json_2.1.1") if os.path.isdir(os.path.join(root, "json_2.1.1")) else root
                    known = {t["id"]: t for t in envs.alfworld_tasks(root or os.path.join(args.data, "alfworld_games"))}
                elif env == "bfcl_mt":  # the data's cut on call results applies to the rollouts too
                    cap = data_args.get("bfcl_mt_obs_cap", envs.BFCL_MT_OBS_CAP)
                    known = {t["id"]: dict(t, obs_cap=cap) for t in envs.bfcl_mt_tasks()}
                else:
                    known = {t["id"]: t for t in envs.bfcl_tasks()}
            for tid in ids:
                if tid not in known:
                    fail(f"{path}: episode {tid} is not among the {env} tasks (was the data made elsewhere?)")
                tasks.append(dict(known[tid], split=split, expert_steps=expert_steps[tid]))
    return tasks


class WorkerError(RuntimeError):
    pass


class Worker:
    """One environment process, spoken to in JSON lines (see envs.serve)."""

    def __init__(self, preload):
        """preload: environment names the worker builds before its first request (python -m envs --preload)."""
        self.proc = None
        self.cmd = args.worker_cmd.split() if args.worker_cmd else [sys.executable, "-m", "envs", "--serve",
                                                                    "--preload", ",".join(sorted(preload))]
        self.start()

    def start(self):
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, cwd=HERE)

    def send(self, msg):
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise WorkerError(f"worker died: {e}") from None

    def recv(self):
        ready, _, _ = select.select([self.proc.stdout], [], [], args.step_timeout)
        if not ready:
            raise WorkerError(f"no reply in {args.step_timeout:.0f}s (hung)")
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerError(f"worker exited with code {self.proc.wait()}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise WorkerError(reply["error"])
        return reply

    def restart(self):
        self.close()
        self.start()

    def close(self):
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "close"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def new_episode(task, mode, ckpt):
    name, step, _ = ckpt
    return {"id": f"{name}/{mode}/{task['id']}", "checkpoint": name, "step": step, "env": task["env"],
            "task_type": task["task_type"], "split": task["split"], "task_id": task["id"], "mode": mode,
            "task": task, "tries": 0}


def step_cap(task, env_cap):
    """The env's own step limit, capped by --max-steps and by --max-steps-factor x the expert's path."""
    factor_cap = math.ceil(args.max_steps_factor * task["expert_steps"]) if args.max_steps_factor else env_cap
    return min(env_cap, args.max_steps or env_cap, factor_cap)


def begin(ep):
    """Reset state of an (re)started episode."""
    ep.update(observations=[], actions=[], transcript=[], won=False, score=0.0, invalid=0, goal=None, functions=None,
              tools=None, turns_passed=None, max_steps=None, plan=None, valid=None, context_exceeded=False,
              t_start=time.time())


def finish(ep, error=None):
    n = len(ep["actions"])
    agree = [steps.same_action(s["action"], s["other_action"])
             for s in ep["transcript"] if s.get("other_action") is not None]
    return {k: ep[k] for k in ("id", "checkpoint", "step", "env", "task_type", "split", "task_id", "mode")} | {
        "won": bool(ep["won"]) if error is None else False, "score": ep["score"] if error is None else 0.0,
        "steps": n, "max_steps": ep["max_steps"], "expert_steps": ep["task"].get("expert_steps"), "invalid_actions": ep["invalid"], "invalid_rate": round(ep["invalid"] / n, 4) if n else None,
        "agreement": round(sum(agree) / len(agree), 4) if agree else None, "context_exceeded": ep["context_exceeded"],
        "error": error,
        "errored": error is not None, "tries": ep["tries"], "seconds": round(time.time() - ep["t_start"], 2),
        **({"turns_passed": ep["turns_passed"]} if ep["env"] == "bfcl_mt" else {}), "transcript": ep["transcript"]}


# ----------------------------------------------------------------------------- policies

class HFPolicy:
    """Prompt-mode and CoT-mode actions of a batch of states: one prompt pass, then branches."""

    def __init__(self, model, tok):
        self.model, self.tok = model, tok
        self.cache = {}  # episode id -> its last prompt's KV cache (decode.prompt_cache)
        self.opening = None  # an episode's first prompt: a new episode takes the system prompt from it

    def forget(self, key):
        self.cache.pop(key, None)

    def act(self, keys_list, messages_list, wants):
        """[{mode: generated text}] per state; None for a state whose prompt no longer fits the context."""
        import decode
        thought_tag, action_tag = steps.tags()
        prompts = [steps.render_prompt(self.tok, m) for m in messages_list]
        enc = [decode.encode_parts(self.tok, [p, action_tag, thought_tag]) for p in prompts]
        fit = fits(self.model, [len(e[0]) for e in enc])
        if not all(fit):
            keep = [i for i, f in enumerate(fit) if f]
            got = iter(self.act(*[[xs[i] for i in keep] for xs in (keys_list, messages_list, wants)]) if keep else [])
            return [next(got) if f else None for f in fit]
        # States with the same prompt (one task's prompt-mode and CoT-mode episodes at their first step; every step
        # of a one-step environment like BFCL) run it once, as one row, and branch from it.
        row_of, first_with, unique = [], {}, []  # state -> its prompt's row; row -> the first state with that prompt
        for i, e in enumerate(enc):
            row_of.append(first_with.setdefault(tuple(e[0]), len(first_with)))
            if row_of[-1] == len(unique):
                unique.append(i)
        branches, keys = [], []
        for i, want in enumerate(wants):
            if "prompt" in want:
                branches.append({"row": row_of[i], "prefix": enc[i][1], "max_new": args.max_action_tokens, "stop": "line"})
                keys.append((i, "prompt"))
            if "cot" in want:
                branches.append({"row": row_of[i], "prefix": decode.encode_parts(self.tok, [prompts[i], thought_tag])[1],
                                 "max_new": args.max_thought_tokens, "stop": "action"})
                keys.append((i, "cot"))
        reuse = [self.cache.get(keys_list[i], self.opening) for i in unique]
        state = decode.encode_prompts(self.model, [enc[i][0] for i in unique], self.tok.pad_token_id, reuse=reuse)
        for i, k in enumerate(keys_list):
            if k not in self.cache and self.opening is None:
                self.opening = decode.prompt_cache(state, row_of[i])
            self.cache[k] = decode.prompt_cache(state, row_of[i])
        out = [{} for _ in wants]
        for (i, mode), res in zip(keys, decode.run_branches(self.model, self.tok, state, branches, args.max_rows)):
            out[i][mode] = res["text"]
        return out


class GeneratePolicy:
    """The reference loop: one HF generate call per state and mode on the whole prompt, no cache kept
    between steps, no batching across states (what ReAct/ETO loops do). Same stops as the hf backend,
    so the two give the same greedy text; bench/eval_speed.py times one against the other."""

    def __init__(self, model, tok):
        import lm
        self.model, self.tok = model, tok
        self.stops = sorted(lm.stop_ids(tok, model))

    def forget(self, key):
        pass

    def _generate(self, ids, max_new, stop):
        import torch
        from transformers import StoppingCriteria

        import decode
        tok, n = self.tok, len(ids)

        class Done(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                new = input_ids[0, n:].tolist()
                return torch.tensor([bool(new) and decode._finished(tok.decode(new), stop)], device=input_ids.device)

        x = torch.tensor([ids], device=self.model.device)
        with torch.no_grad():
            out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                                      eos_token_id=self.stops, pad_token_id=tok.pad_token_id, stopping_criteria=[Done()])
        new = out[0, n:].tolist()
        if new and new[-1] in self.stops:
            new = new[:-1]
        return tok.decode(new, skip_special_tokens=True)

    def act(self, keys_list, messages_list, wants):
        import decode
        thought_tag, action_tag = steps.tags()
        out = []
        for key, messages, want in zip(keys_list, messages_list, wants):
            prompt = steps.render_prompt(self.tok, messages)
            if not fits(self.model, [len(self.tok(prompt)["input_ids"])])[0]:
                out.append(None)
                continue
            res = {}
            if "prompt" in want:
                res["prompt"] = self._generate(sum(decode.encode_parts(self.tok, [prompt, action_tag]), []),
                                               args.max_action_tokens, "line")
            if "cot" in want:
                res["cot"] = self._generate(sum(decode.encode_parts(self.tok, [prompt, thought_tag]), []),
                                            args.max_thought_tokens, "action")
            out.append(res)
        return out


def fits(model, lengths):
    """Per prompt length: does it, with the most tokens a step may generate, fit --max-len or the model's context?"""
    limit = args.max_len or getattr(model.config, "max_position_embeddings", 0) or 0
    extra = max(args.max_action_tokens, args.max_thought_tokens) + 2
    return [not limit or n + extra <= limit for n in lengths]


def parse_mode(mode, text):
    """The action a mode's output names ('' when the CoT output has no action tag: sent as is, counted invalid)."""
    if text is None:
        return None
    if mode == "prompt":
        return steps.first_line(text)
    _, action = steps.parse_response(steps.tags()[0] + text)
    return action if action is not None else ""


# ----------------------------------------------------------------------------- the lockstep loop

def run_checkpoint(ckpt, episodes, policy, workers, fout):
    queue = list(episodes)
    slots = [None] * len(workers)
    log_both = not args.no_log_both and args.policy == "model"
    bar = tqdm(total=len(queue), desc=f"eval {ckpt[0]}", unit="ep", disable=rank > 0)
    n_done = 0

    def end(s):
        """Record the slot's finished episode and free the slot."""
        nonlocal n_done
        if policy is not None:
            policy.forget(slots[s]["id"])
        jsonio.append_jsonl(fout, [finish(slots[s])])
        slots[s] = None
        n_done += 1
        bar.update()

    def crashed(s, err):
        """Restart the slot's worker; retry the episode once, then record it with its error."""
        nonlocal n_done
        ep = slots[s]
        if policy is not None:
            policy.forget(ep["id"])
        tqdm.write(f"worker {s} restarted ({err}); episode {ep['id']} " +
                   ("tried again" if ep["tries"] < 2 else "recorded as errored after 2 tries"))
        workers[s].restart()
        if ep["tries"] < 2:
            queue.insert(0, ep)
        else:
            jsonio.append_jsonl(fout, [finish(ep, error=str(err))])
            n_done += 1
            bar.update()
        slots[s] = None

    while queue or any(slots):
        # Fill free slots: send every reset first, then read the replies (workers reset in parallel).
        started = []
        for s in range(len(slots)):
            if slots[s] is None and queue:
                ep = queue.pop(0)
                ep["tries"] += 1
                begin(ep)
                slots[s] = ep
                try:
                    workers[s].send({"cmd": "reset", "task": ep["task"], "valid": args.policy == "random"})
                    started.append(s)
                except WorkerError as e:
                    crashed(s, e)
        for s in started:
            try:
                r = workers[s].recv()
            except WorkerError as e:
                crashed(s, e)
                continue
            ep = slots[s]
            ep.update(observations=[r["obs"]], goal=r["info"]["task"], functions=r["info"].get("functions"),
                      tools=r["info"].get("function_names"),
                      max_steps=step_cap(ep["task"], r["info"]["max_steps"]), plan=r["plan"], valid=r["valid"])
        live = [s for s in range(len(slots)) if slots[s] is not None and slots[s]["goal"] is not None]
        if not live:
            continue
        # Decide every live episode's action in one batched pass.
        outputs = [{} for _ in live]
        if args.policy == "model":
            msgs = [steps.build_messages(slots[s]["env"], slots[s]["goal"], slots[s]["observations"], slots[s]["actions"],
                                         args.history, slots[s]["functions"]) for s in live]
            wants = [{"prompt", "cot"} if log_both else {slots[s]["mode"]} for s in live]
            outputs = policy.act([slots[s]["id"] for s in live], msgs, wants)
        for s, out in zip(live, outputs):
            ep = slots[s]
            if out is None:  # its prompt outgrew the context: the episode ends here, as its own outcome
                ep["context_exceeded"] = True
                end(s)
                continue
            t = len(ep["actions"])
            if args.policy == "expert":
                action, entry = (ep["plan"][t] if t < len(ep["plan"]) else "look"), {}
            elif args.policy == "random":
                # a generator per episode and step: the same draws whatever --num-envs, the order or a resume
                action = random_action(ep, random.Random(f"random-policy/{args.seed}/{ep['task_id']}/{t}"))
                entry = {}
            else:
                action = parse_mode(ep["mode"], out[ep["mode"]])
                other = "cot" if ep["mode"] == "prompt" else "prompt"
                entry = {"output": out[ep["mode"]], "other_action": parse_mode(other, out.get(other)) if log_both else None}
            ep["pending"] = dict(obs=ep["observations"][-1], action=action, **entry)
            try:
                workers[s].send({"cmd": "step", "action": action, "valid": args.policy == "random"})
            except WorkerError as e:
                crashed(s, e)
        for s in live:
            ep = slots[s]
            if ep is None or "pending" not in ep:
                continue
            try:
                r = workers[s].recv()
            except WorkerError as e:
                crashed(s, e)
                continue
            entry = ep.pop("pending")
            entry["invalid"] = bool(r["invalid"])
            ep["transcript"].append(entry)
            ep["actions"].append(entry["action"])
            ep["observations"].append(r["obs"])
            ep["invalid"] += entry["invalid"]
            ep["won"], ep["score"], ep["valid"] = r["info"]["won"], r["info"]["score"], r["valid"]
            ep["turns_passed"] = r["info"].get("turns_passed")
            if r["done"] or len(ep["actions"]) >= ep["max_steps"]:
                end(s)
    bar.close()
    return n_done


def random_action(ep, rng):
    if ep["env"] == "bfcl":  # no action list: a random function with no arguments
        return f"[{rng.choice(ep['task']['functions'])['name']}()]"
    if ep["env"] == "bfcl_mt":  # a random offered function with no arguments, or the end of the user's turn
        import envs
        return rng.choice([f"[{name}()]" for name in ep["tools"]] + [envs.END_TURN])
    return rng.choice(ep["valid"]) if ep["valid"] else "look around"


def checkpoint_list():
    """[(name, step, adapter folder or None)]; run folders give their last (or, with --all-checkpoints, every)
    checkpoint in training order (checkpoint_io.list_checkpoints), each checked (lm.check_checkpoint) before any is used."""
    if args.policy != "model":
        return [(args.policy, 0, None)]
    out = [("base", 0, None)] if args.with_base or not args.adapter else []
    for item in args.adapter:
        if not os.path.isdir(item):
            fail(f"adapter folder not found: {item}")
    try:
        return out + checkpoint_io.series_of_all(args.adapter, "--adapter", last_only=not args.all_checkpoints)
    except ValueError as e:
        fail(str(e))


def latest(records):
    """The last record of every episode id: a rerun appends a retried episode after its errored record."""
    return list({r["id"]: r for r in records}.values())


def summarize(records):
    """Rows per checkpoint x env x split x mode over the completed episodes. An errored episode (its worker
    died twice) is an infrastructure fault, not a loss: it is left out of n and the rates, counted in
    `errors`, and retried by a rerun."""
    keys = ["checkpoint", "step", "env", "split", "mode"]
    records = latest(records)
    completed = [r for r in records if not r["errored"]]
    rows = stats.summarize(completed, keys, METRICS, seed=args.seed)
    # Paired CoT-minus-prompt difference, task by task, where both modes ran.
    pairs = {}
    for r in completed:
        if r["mode"] in ("prompt", "cot"):
            pairs.setdefault((r["checkpoint"], r["step"], r["env"], r["split"], r["task_id"]), {})[r["mode"]] = r
    diffs = []
    for (ck, st, env, split, _), p in pairs.items():
        if len(p) == 2:
            diffs.append({"checkpoint": ck, "step": st, "env": env, "split": split, "mode": "cot-prompt",
                          "won": float(p["cot"]["won"]) - float(p["prompt"]["won"]),
                          "score": p["cot"]["score"] - p["prompt"]["score"]})
    rows += stats.summarize(diffs, keys, ["won", "score"], seed=args.seed)
    errors = collections.Counter(tuple(r[k] for k in keys) for r in records if r["errored"])
    have = {tuple(row[k] for k in keys) for row in rows}
    rows += [dict(zip(keys, key), n=0) for key in errors if key not in have]
    for row in rows:
        row["errors"] = errors.get(tuple(row[k] for k in keys), 0)
    rows.sort(key=lambda r: (r["step"], r["checkpoint"], r["env"], r["split"], r["mode"]))
    return rows


# ----------------------------------------------------------------------------- main

for name, low in (("num_envs", 1), ("max_rows", 1), ("max_action_tokens", 1), ("max_thought_tokens", 1), ("max_len", 0),
                  ("max_episodes", 0), ("max_steps", 0), ("history", 0), ("threads", 0)):
    if getattr(args, name) < low:
        fail(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
cli.check_numbers(args, {"max_steps_factor": (0, None), "step_timeout": (("<", 0), None)}, fail)
ckpts = checkpoint_list()
try:
    tasks = load_tasks()
except jsonio.DataError as e:
    fail(str(e))
if not tasks:
    fail(f"no test episodes for --env {args.env} --split {args.split} in {args.data}")
modes = ["prompt", "cot"] if args.mode == "both" else [args.mode]
if args.policy != "model":
    modes = [args.policy]
model_path, dtype, rank, world = None, None, 0, 1
if args.policy == "model" or os.environ.get("WORLD_SIZE", "1") != "1":
    import torch

    import lm
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = lm.pick_device(args.device) if args.policy == "model" else ("cpu", None)
    # Under torchrun each process plays every world-th episode with its own workers and appends to its own
    # part file; the first process checks the output folder before the others start and merges at the end.
    try:
        rank, world, device = lm.distributed(device)
    except ValueError as err:
        fail(str(err))
if args.policy == "model":
    try:
        args.model, model_path, tok = lm.load_base(args.model, [c for _, _, c in ckpts if c])
    except ValueError as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot load model {args.model!r}: {e}")
out_path = os.path.join(args.out, "episodes.jsonl")
if rank == 0:  # one writer and one configuration per output folder, checked before anything there is read or written
    provenance.claim_output(args.out, fail)
    made_from = provenance.check_made_from(
        os.path.join(args.out, "meta.json"),
        {"settings": {name: getattr(args, name) for name in RESULT_FLAGS if name != "dtype"} | {"dtype": str(dtype)},
         "inputs": {**{f: provenance.file_digest(f) for f in TEST_FILES},
                    **({"model": provenance.model_identity(model_path)} if model_path else {})},
         "checkpoints": {name: provenance.folder_digest(c) if c else name for name, _, c in ckpts}},
        [out_path, *jsonio.parts_of(out_path)], fail)
    try:
        jsonio.read_done_all(out_path)  # a damaged line stops the run here, before anything is rewritten
    except jsonio.DataError as e:
        fail(str(e))
    meta_path = os.path.join(args.out, "meta.json")
    jsonio.write_json_atomic(meta_path, {"args": vars(args), "model_path": model_path, "episodes": len(tasks),
                                        "checkpoints": provenance.merged_checkpoints(meta_path, ckpts), "made_from": made_from,
                                        "processes": world})
if world > 1:
    lm.barrier(world)
done = {r["id"] for r in latest(jsonio.read_done_all(out_path)) if not r["errored"]}  # errored episodes run again
# A task's modes side by side: its episodes start in one batch and share their first prompt's pass (HFPolicy.act).
# Longest first prompt first: a lockstep batch then holds prompts of similar length, and its decode attends over
# little padding (every row of a batch is as wide as its longest prompt). Which episodes share a batch changes
# speed only, as --num-envs does.
queue = sorted(tasks, key=lambda t: -PROMPT_CHARS[t["split"], t["id"]]) if args.order == "length" else tasks
todos = [[ep for t in queue for mode in modes for ep in [new_episode(t, mode, ckpt)] if ep["id"] not in done][rank::world]
         for ckpt in ckpts]
# The workers start first: they import and build their environments while this process loads the model.
workers = [Worker({t["env"] for t in tasks}) for _ in range(min(args.num_envs, max(map(len, todos), default=0)))]
try:
    if args.policy == "model" and rank == 0:
        print(f"evaluate: policy model, backend {args.backend}, device {device} ({dtype}) x {world} process(es), "
              f"model {model_path}")
    if rank == 0:
        print(f"evaluate: {len(ckpts)} checkpoint(s) x {len(tasks)} episodes x modes {','.join(modes)}, "
              f"{args.num_envs} envs per process, {len(done)} episodes already in {out_path}")
    with open(jsonio.part_path(out_path, rank, world), "a") as fout:
        for ckpt, todo in zip(ckpts, todos):
            if not todo:
                continue
            policy = None
            if args.policy == "model":
                cls = GeneratePolicy if args.backend == "generate" else HFPolicy
                try:
                    policy = cls(lm.load_model(model_path, ckpt[2], device, dtype), tok)
                except ValueError as e:
                    fail(str(e))
            run_checkpoint(ckpt, todo, policy, workers[:len(todo)], fout)
            del policy
finally:
    for w in workers:
        w.close()

if world > 1:
    lm.barrier(world)
if rank > 0:
    sys.exit(0)
# One file whatever the number of processes: episodes by checkpoint, mode and task order (a retried episode
# after its errored record).
order = {f"{name}/{mode}/{t['id']}": (i, j, k) for i, (name, _, _) in enumerate(ckpts) for j, mode in enumerate(modes)
         for k, t in enumerate(tasks)}
records = jsonio.merge_parts(out_path, lambda r: order.get(r["id"], (-1, 0, 0)))
records = [r for r in records if r["checkpoint"] in {c[0] for c in ckpts}]
rows = summarize(records)
jsonio.write_jsonl_atomic(os.path.join(args.out, "summary.jsonl"), rows)
jsonio.write_csv_atomic(os.path.join(args.out, "summary.csv"), rows)
for r in rows:
    won = f"won {r['won']:+.3f} [{r['won_lo']:+.3f}, {r['won_hi']:+.3f}] score {r['score']:.3f}" if r["n"] else "no completed episode"
    print(f"{r['checkpoint']:>32} {r['env']:>12} {r['split']:>8} {r['mode']:>10} n={r['n']:3d} {won}"
          + (f", {r['errors']} errored (rerun to retry)" if r["errors"] else ""))
print(f"evaluate done: {len(records)} episodes, {time.time() - t0:.1f}s, {os.path.join(args.out, 'summary.csv')}")
