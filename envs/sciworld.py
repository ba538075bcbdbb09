"""ScienceWorld: the Java engine from the scienceworld wheel, one JVM per env; expert: the gold action sequence.
OOD: the last task of each of the 10 topics."""
import json
import os

from envs.common import ClosingEnv, EnvError

# Task ids in ScienceWorld are "<topic>-<n>"; the last n of each topic is held out (paper's OOD split).
SCIWORLD_OOD = ("1-4", "2-3", "3-4", "4-4", "5-2", "6-3", "7-3", "8-2", "9-3", "10-2")


def sciworld_task_table():
    import scienceworld
    with open(os.path.join(os.path.dirname(scienceworld.__file__), "tasks.json")) as f:
        return {t["task_name"]: t for t in json.load(f)}


# Step limits per task, as ETO/AgentGym cap ScienceWorld episodes (longer gold paths get more room).
SCIWORLD_MAX_STEPS_MIN = 30


class ScienceWorld(ClosingEnv):
    name = "scienceworld"

    def __init__(self):
        from scienceworld import ScienceWorldEnv
        self._env = ScienceWorldEnv("", envStepLimit=10_000)  # our own max_steps applies, not the JVM's
        self._server = self._env.server
        self._plan = None

    def reset(self, task):
        names = sciworld_task_table()
        if task["task_name"] not in names:
            raise EnvError(f"unknown ScienceWorld task {task['task_name']!r}")
        self._server.load(task["task_name"], int(task["variation"]), "", True)
        self._plan = list(self._server.getGoldActionSequence())
        self._server.reset()
        obs = self._server.step("look around")
        desc = self._server.getTaskDescription()
        max_steps = max(SCIWORLD_MAX_STEPS_MIN, 2 * len(self._plan))
        return obs.strip(), {"task": desc.strip(), "max_steps": max_steps}

    def step(self, action):
        obs = self._server.step(action)
        score = self._server.getScore()
        done = bool(self._server.getCompleted()) or score < 0
        return obs.strip(), 0.0, done, {"won": score >= 1.0, "score": max(0.0, float(score))}

    def valid_actions(self):
        return sorted(set(self._server.getValidActionObjectCombinations()))


def sciworld_tasks(env=None, every_ood_variation=False):
    """Every (task, variation): train/id_test variations of in-domain tasks, test variations of OOD ones (with
    every_ood_variation: their train and dev variations too, as for imported trajectories of a held-out task)."""
    own = env is None
    env = env or ScienceWorld()
    try:
        server = env._server
        tasks = []
        for name, meta in sorted(sciworld_task_table().items(), key=lambda kv: [int(x) for x in kv[1]["task_id"].split("-")]):
            ood = meta["task_id"] in SCIWORLD_OOD
            server.load(name, 0, "", False)
            held = list(server.getVariationsTest()) + (list(server.getVariationsTrain()) + list(server.getVariationsDev())
                                                         if every_ood_variation else [])
            groups = [("ood_test", sorted(held))] if ood else \
                [("train", server.getVariationsTrain()), ("id_test", server.getVariationsTest())]
            for split, variations in groups:
                for v in variations:
                    tasks.append({"id": f"scienceworld/{name}/{v}", "env": "scienceworld", "task_type": name,
                                  "split": split, "task_name": name, "variation": int(v)})
        return tasks
    finally:
        if own:
            env.close()
