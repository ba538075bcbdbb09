"""The environment worker evaluate.py drives: `python -m envs --serve`, one environment per process."""
import json
import os
import sys

from envs import make_env
from envs.alfworld import alfworld_v4
from envs.bfcl import parse_calls
from envs.common import INVALID_FEEDBACK


def serve(preload=()):
    """`python -m envs --serve [--preload alfworld,...]`: one environment in its own process, driven by JSON lines.

    evaluate.py runs one per parallel slot, so a crash or hang kills only this process (it is
    restarted), and the JVM of ScienceWorld dies with it. Requests and replies, one line each:
        {"cmd": "reset", "task": {...}, "valid": true}  -> {"ok": true, "obs", "info", "valid", "plan"}
        {"cmd": "step", "action": "...", "valid": true} -> {"ok": true, "obs", "reward", "done", "info", "valid", "invalid"}
        {"cmd": "close"}                                -> exits
    An exception becomes {"ok": false, "error": "..."}. ScienceWorld gets a fresh JVM per episode:
    its worlds depend on the JVM's history of loads, and evaluation must not depend on scheduling.
    --preload builds those environments (imports, a JVM) before the first request, so a driver that
    starts its workers first has them ready while it loads its model.
    """
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library prints go to stderr, never into the protocol
    envs, used, current = {}, set(), None
    for name in preload:
        try:
            envs[name] = make_env(name)
        except Exception:  # noqa: BLE001  (the first reset of this env tries again and reports the error)
            pass
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["cmd"] == "close":
                break
            if msg["cmd"] == "reset":
                name = msg["task"]["env"]
                if name == "scienceworld" and name in used:
                    envs.pop(name).close()
                    used.discard(name)
                if name not in envs:
                    envs[name] = make_env(name)
                current = envs[name]
                used.add(name)
                obs, info = current.reset(msg["task"])
                reply = {"obs": obs, "info": info, "plan": current.expert_plan(),
                         "valid": current.valid_actions() if msg.get("valid") else None}
            elif msg["cmd"] == "step":
                action = msg["action"]
                if current.name == "alfworld":  # admissible commands are free in ALFWorld
                    invalid = alfworld_v4(action) not in current.valid_actions()
                elif current.name == "bfcl":
                    invalid = not _parses(action)
                obs, reward, done, info = current.step(action)
                if "invalid" in info:  # the env judges its own actions (multi-turn BFCL: parsed and offered)
                    invalid = info.pop("invalid")
                if current.name == "scienceworld":
                    invalid = obs.startswith(INVALID_FEEDBACK["scienceworld"])
                reply = {"obs": obs, "reward": reward, "done": done, "info": info, "invalid": invalid,
                         "valid": current.valid_actions() if msg.get("valid") and not done else None}
            else:
                raise ValueError(f"unknown command {msg['cmd']!r}")
            reply["ok"] = True
        except Exception as e:  # noqa: BLE001  (any env failure is reported to the driver, which restarts us)
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        proto.write(json.dumps(reply) + "\n")
        proto.flush()
    for env in envs.values():
        env.close()


def _parses(action):
    try:
        parse_calls(action)
        return True
    except ValueError:
        return False
