"""Multi-turn BFCL: the multi-turn entries on BFCL's own execution backends; an action is a call list, the
observation each call's result. OOD: multi_turn_long_context entries whose base twin is not in train."""
import ast
import functools
import importlib
import inspect
import itertools
import json
import os
import re

from envs.bfcl import _read_bfcl, bfcl_data_dir
from envs.common import ClosingEnv, EnvError, stable_frac

BFCL_MT_ID = "multi_turn_base"
BFCL_MT_OOD = "multi_turn_long_context"
BFCL_MT_TEST_FRAC = 0.25   # share of base entries held out as id_test (by a hash of the id)
BFCL_MT_OBS_CAP = 600      # characters of one call's result the agent sees (the rest is cut, and the cut is said)
BFCL_MT_STEP_CAP = 4       # a whole step's observation, however many calls it made: at most this many call caps
END_TURN = "[]"            # the action with no call: the reply to the user that ends their turn
_TYPE_NAMES = {"string": "str", "integer": "int", "float": "float", "number": "float", "boolean": "bool",
               "array": "list", "dict": "dict", "object": "dict", "tuple": "tuple", "any": "any"}


def _mt_key(value):
    return json.dumps(value, sort_keys=True)


@functools.lru_cache(maxsize=None)
def bfcl_mt_entries(category):
    """{entry id: entry} of a multi-turn category, each with its per-turn ground truth (call strings)."""
    root = bfcl_data_dir()
    questions = _read_bfcl(os.path.join(root, f"BFCL_v4_{category}.json"))
    answers = _read_bfcl(os.path.join(root, "possible_answer", f"BFCL_v4_{category}.json"))
    return {qid: dict(q, ground_truth=answers[qid]["ground_truth"]) for qid, q in questions.items() if qid in answers}


def bfcl_mt_tasks(test_frac=BFCL_MT_TEST_FRAC):
    """Base entries hash-split into train / id_test; long_context entries are ood_test unless a base
    twin (an entry with the same questions or the same initial state) is in train, where it would
    have been trained on with only the state smaller. Each task holds only ids: workers load the entry."""
    base, long = bfcl_mt_entries(BFCL_MT_ID), bfcl_mt_entries(BFCL_MT_OOD)
    split = {qid: "id_test" if stable_frac(qid) < test_frac else "train" for qid in base}
    twins = {}
    for qid, e in base.items():
        twins.setdefault(("q", _mt_key(e["question"])), []).append(qid)
        twins.setdefault(("s", _mt_key(e["initial_config"])), []).append(qid)
    tasks = [{"id": f"bfcl_mt/{qid}", "env": "bfcl_mt", "task_type": BFCL_MT_ID, "split": split[qid], "entry_id": qid}
             for qid in base]
    for qid, e in long.items():
        mine = twins.get(("q", _mt_key(e["question"])), []) + twins.get(("s", _mt_key(e["initial_config"])), [])
        if all(split[t] != "train" for t in mine):
            tasks.append({"id": f"bfcl_mt/{qid}", "env": "bfcl_mt", "task_type": BFCL_MT_OOD, "split": "ood_test",
                          "entry_id": qid})
    return tasks


@functools.lru_cache(maxsize=None)
def _mt_class_api(class_name):
    """({function name: one-line signature}, {function name: inspect.Signature}) of one backend class."""
    from bfcl_eval.constants.executable_backend_config import CLASS_FILE_PATH_MAPPING, MULTI_TURN_FUNC_DOC_FILE_MAPPING
    cls = getattr(importlib.import_module(CLASS_FILE_PATH_MAPPING[class_name]), class_name)
    lines, sigs = {}, {}
    with open(os.path.join(bfcl_data_dir(), "multi_turn_func_doc", MULTI_TURN_FUNC_DOC_FILE_MAPPING[class_name])) as f:
        docs = [json.loads(line) for line in f if line.strip()]
    for doc in docs:
        name = doc["name"]
        sig = inspect.signature(getattr(cls, name))
        sigs[name] = sig.replace(parameters=list(sig.parameters.values())[1:])  # without self
        props = doc.get("parameters", {}).get("properties", {})
        required = set(doc.get("parameters", {}).get("required", []))
        params = ", ".join(f"{p}: {_TYPE_NAMES.get(spec.get('type'), spec.get('type', 'any'))}"
                           + ("" if p in required else f" = {spec.get('default')!r}") for p, spec in props.items())
        desc = doc.get("description", "").split("Tool description:")[-1].strip()
        desc = re.split(r"(?<=[.!?])\s", desc, maxsplit=1)[0]
        lines[name] = f"{name}({params}): {desc}"
    return lines, sigs


def render_call(name, sig, args, kwargs):
    """The call string BFCL's executor gets: keyword arguments only, values written by repr (literals)."""
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise ValueError(f"{name}: {e}") from None
    parts = []
    for param, value in bound.arguments.items():
        kind = sig.parameters[param].kind
        if kind == inspect.Parameter.VAR_POSITIONAL:
            raise ValueError(f"{name}: too many positional arguments")
        items = value.items() if kind == inspect.Parameter.VAR_KEYWORD else [(param, value)]
        parts += [f"{k}={v!r}" for k, v in items]
    return f"{name}({', '.join(parts)})"


def parse_mt_action(text, sigs):
    """'[f(a=1), g('x')]' -> ["f(a=1)", "g(b='x')"] with sigs {name: Signature} the functions offered.

    Only calls of offered functions by their bare name, with literal arguments (ast.literal_eval),
    pass; ValueError names what is wrong. The strings returned are rendered again from the parsed
    values, so no text of the model's own reaches BFCL's executor (which eval()s what it gets)."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        raise ValueError("not a Python list of calls") from None
    nodes = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            raise ValueError("each item must be a call of an offered function by its name, like f(a=1)")
        name = node.func.id
        if name not in sigs:
            raise ValueError(f"no function named {name!r} is offered")
        if any(kw.arg is None for kw in node.keywords) or any(isinstance(a, ast.Starred) for a in node.args):
            raise ValueError(f"{name}: no * or ** arguments")
        try:
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise ValueError(f"{name}: arguments must be literals (strings, numbers, lists, dicts, True/False/None)") from None
        calls.append(render_call(name, sigs[name], args, kwargs))
    return calls


class BfclMultiTurn(ClosingEnv):
    """One multi-turn BFCL entry per episode, on BFCL's own backends, executor and checker.

    An action is a call list `[f(a=1), g(b='x')]`; the observation is each call's result,
    `f(a=1) -> {...}`, cut at the task's obs_cap characters (the cut said in the text; the whole step's
    text at BFCL_MT_STEP_CAP times that, so a list of many calls cannot flood the context); `[]` ends the
    user's turn and their next message follows (`User: ...`). The episode is won when BFCL's multi-turn
    checker passes on all turns; score is the share of leading turns that pass.

    Model text never reaches the executor, which eval()s what it gets: an action is parsed with ast;
    only functions offered in this entry, called by bare name with literal arguments, pass; each call is
    bound to the backend method's signature and rendered again, keywords only (positional ground-truth
    arguments are mapped the same way). Anything else is an invalid action with an `Error: ...`
    observation, and nothing runs.

    BFCL's executor keeps backend instances in its module's globals under (model name, entry id) and
    never frees them; every episode here uses names of its own and deletes its instances on reset and
    close, so no state leaks from one episode into the next."""
    name = "bfcl_mt"
    _episodes = itertools.count()

    def __init__(self):
        from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_checker, multi_turn_utils
        self._utils, self._checker = multi_turn_utils, multi_turn_checker.multi_turn_checker
        self._prefix = None

    def _free(self, prefix):
        space = vars(self._utils)
        for key in [k for k in space if k.startswith(prefix)]:
            del space[key]

    def reset(self, task):
        if self._prefix:
            self._free(self._prefix)
        entries = bfcl_mt_entries(task["task_type"])
        if task["entry_id"] not in entries:
            raise EnvError(f"unknown BFCL multi-turn entry {task['entry_id']!r} in {task['task_type']}")
        self._entry = e = entries[task["entry_id"]]
        self._prefix = f"bfclmt{os.getpid()}n{next(self._episodes)}x"
        self._cap = int(task.get("obs_cap", BFCL_MT_OBS_CAP))
        excluded = set(e.get("excluded_function") or [])
        lines, self._sigs = {}, {}
        for cls in e["involved_classes"]:
            cls_lines, cls_sigs = _mt_class_api(cls)
            lines.update({k: v for k, v in cls_lines.items() if k not in excluded})
            self._sigs.update({k: v for k, v in cls_sigs.items() if k not in excluded})
        self.signatures = {k: lines[k] for k in sorted(lines)}  # name -> "name(param: type, ...): description"
        self.functions = "\n".join(self.signatures.values())
        self.questions = ["\n".join(m["content"] for m in turn if m["role"] == "user") for turn in e["question"]]
        self.turn_plans = [[parse_mt_action(c, self._sigs)[0] for c in calls] for calls in e["ground_truth"]]
        self._turns, self._current, self._passed, self._done = [], [], 0, False
        plan_len = sum(len(p) + 1 for p in self.turn_plans)
        first = self.user_turn(0)
        return first, {"task": first, "max_steps": 2 * plan_len, "functions": self.functions,
                       "function_names": sorted(self._sigs)}

    def user_turn(self, t):
        return f"User: {self.questions[t]}"

    def _clip(self, result, cap=None):
        result, cap = str(result), cap or self._cap
        if len(result) <= cap:
            return result
        return result[:cap] + f" ... [{len(result) - cap} more characters cut]"

    def _info(self, invalid, won=False):
        return {"won": won, "score": self._passed / len(self.questions), "invalid": invalid,
                "turn": len(self._turns), "turns_passed": self._passed}

    def step(self, action):
        if self._done:
            raise EnvError("the episode is over; reset first")
        try:
            calls = parse_mt_action(action, self._sigs)
        except ValueError as e:
            return (f"Error: {e}. Reply with a list of calls like [f(a=1)], or {END_TURN} when the request is done.",
                    0.0, False, self._info(invalid=True))
        if calls:
            e = self._entry
            results, _ = self._utils.execute_multi_turn_func_call(
                calls, e["initial_config"], e["involved_classes"], self._prefix + "live", e["id"],
                long_context="long_context" in e["id"])
            self._current.append(calls)
            obs = "\n".join(f"{c} -> {self._clip(r)}" for c, r in zip(calls, results))
            return self._clip(obs, BFCL_MT_STEP_CAP * self._cap), 0.0, False, self._info(False)
        self._turns.append(self._current)
        self._current = []
        if self._passed == len(self._turns) - 1 and self.check(self._turns):
            self._passed += 1
        if len(self._turns) == len(self.questions):
            self._done = True
            won = self._passed == len(self.questions)
            return "All requests are answered.", float(won), True, self._info(False, won)
        return self.user_turn(len(self._turns)), 0.0, False, self._info(False)

    def check(self, turns):
        """BFCL's multi-turn checker on the first len(turns) turns: turns[t] lists the steps of turn t,
        each step the call strings executed. Fresh instances, freed afterwards."""
        e, n = self._entry, len(turns)
        name = self._prefix + "check"
        try:
            result = self._checker(turns, e["ground_truth"][:n], e, e["id"].rsplit("_", 1)[0], name)
        finally:
            self._free(name)
        return bool(result["valid"])

    def valid_actions(self):
        return None

    def expert_plan(self):
        return [a for plan in self.turn_plans for a in [f"[{c}]" for c in plan] + [END_TURN]]

    def close(self):
        if self._prefix:
            self._free(self._prefix)
            self._prefix = None
