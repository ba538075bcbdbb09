"""Single-turn BFCL from the bfcl-eval package data: one step = one answer, checked by BFCL's own AST checker
(model output is parsed with `ast`, never evaluated). OOD: the held-out live_* categories."""
import ast
import json
import os
import sys
import types

from envs.common import ClosingEnv, EnvError, stable_frac

BFCL_ID = ("simple_python", "multiple", "parallel", "parallel_multiple")
BFCL_OOD = ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")


def _bfcl_checker():
    """BFCL's AST checker without its model-config module (which imports every API SDK).

    The checker only asks that module whether a model renames dots in function names; ours do not.
    """
    if "bfcl_eval.constants.model_config" not in sys.modules:
        stub = types.ModuleType("bfcl_eval.constants.model_config")

        class _NoRename(dict):
            def __missing__(self, key):
                return types.SimpleNamespace(underscore_to_dot=False)

        stub.MODEL_CONFIG_MAPPING = _NoRename()
        sys.modules["bfcl_eval.constants.model_config"] = stub
    from bfcl_eval.constants.enums import Language
    from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker
    return ast_checker, Language.PYTHON


def bfcl_data_dir():
    import bfcl_eval
    return os.path.join(os.path.dirname(bfcl_eval.__file__), "data")


def _read_bfcl(path):
    out = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EnvError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                out[rec["id"]] = rec
    return out


def bfcl_tasks(id_test_frac=0.2):
    """Items of the ID categories (hash-split into train / id_test) and of the OOD categories."""
    root = bfcl_data_dir()
    tasks = []
    for cat in BFCL_ID + BFCL_OOD:
        questions = _read_bfcl(os.path.join(root, f"BFCL_v4_{cat}.json"))
        answers = _read_bfcl(os.path.join(root, "possible_answer", f"BFCL_v4_{cat}.json"))
        for qid, q in questions.items():
            if qid not in answers or len(q["question"]) != 1:
                continue
            if cat in BFCL_OOD:
                split = "ood_test"
            else:
                split = "id_test" if stable_frac(qid) < id_test_frac else "train"
            tasks.append({"id": f"bfcl/{qid}", "env": "bfcl", "task_type": cat, "split": split,
                          "question": q["question"][0], "functions": q["function"],
                          "ground_truth": answers[qid]["ground_truth"]})
    return tasks


def first_allowed(v):
    """BFCL lists the allowed values of a parameter; inside dict values each key has its own list."""
    if isinstance(v, dict) and all(isinstance(vals, list) for vals in v.values()):
        return {k: first_allowed(vals[0]) for k, vals in v.items() if vals and vals[0] != ""}
    if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
        return [first_allowed(x) for x in v]
    return v


def gold_call(ground_truth):
    """The canonical answer string: each call with the first allowed value of every parameter
    (parameters whose first allowed value is "" are optional and left out)."""
    calls = []
    for call in ground_truth:
        (name, params), = call.items()
        args = ", ".join(f"{k}={first_allowed(vals[0])!r}" for k, vals in params.items() if vals and vals[0] != "")
        calls.append(f"{name}({args})")
    return "[" + ", ".join(calls) + "]"


def _dotted(node):
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return _dotted(node.value) + "." + node.attr
    raise ValueError("function name is not a dotted name")


def parse_calls(text):
    """'[f(a=1), m.g(b="x")]' -> [{"f": {"a": 1}}, {"m.g": {"b": "x"}}]; ValueError if not calls.

    Values must be literals (ast.literal_eval); nothing is executed. Any text is a ValueError at worst:
    nesting too deep for the parser (RecursionError) or literals too large are said, never raised."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"not a Python call list: {e.msg}") from None
    except (RecursionError, MemoryError):
        raise ValueError("not a Python call list: nested too deeply or too large") from None
    nodes = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call) or node.args:
            raise ValueError("each item must be a call with keyword arguments only")
        try:
            calls.append({_dotted(node.func): {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}})
        except (TypeError, SyntaxError, RecursionError, MemoryError):  # ValueError passes through as it is
            raise ValueError("arguments must be literals (strings, numbers, lists, dicts, True/False/None)") from None
    return calls


class Bfcl(ClosingEnv):
    name = "bfcl"

    def __init__(self):
        self._checker, self._language = _bfcl_checker()
        self._task = None

    def reset(self, task):
        self._task = task
        funcs = json.dumps(task["functions"], ensure_ascii=False)
        return task["question"][-1]["content"], {"task": task["question"][-1]["content"], "max_steps": 1,
                                                 "functions": funcs}

    def check(self, action):
        """(valid, error) of an answer string under BFCL's AST checker."""
        try:
            calls = parse_calls(action)
        except ValueError as e:
            return False, str(e)
        result = self._checker(self._task["functions"], calls, self._task["ground_truth"], self._language,
                               self._task["task_type"], "local")
        return bool(result["valid"]), "; ".join(map(str, result.get("error", [])))

    def step(self, action):
        valid, error = self.check(action)
        obs = "The call is correct." if valid else f"The call is wrong: {error}"
        return obs, float(valid), True, {"won": valid, "score": float(valid)}

    def valid_actions(self):
        return None

    def expert_plan(self):
        return [gold_call(self._task["ground_truth"])]

    def close(self):
        pass
