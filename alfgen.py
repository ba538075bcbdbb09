"""ALFWorld-style game files, generated offline from the alfworld package's own logic.

Real ALFWorld games come from `alfworld-download` (needs internet). This module writes games
in the same `game.tw-pddl` format (JSON with pddl_domain, grammar, pddl_problem, solvable,
walkthrough) for all six task types, using only what ships inside the alfworld wheel:

- the PDDL domain `alfworld/data/alfred.pddl` and the text grammar `alfred.twl2` (task text filled
  in where the grammar says UNKNOWN GOAL, as alfworld's add_task_to_grammar does),
- the goals and their task sentences from `alfworld.gen.goal_library`,
- what can hold / heat / cool / clean / toggle what, from `alfworld.gen.constants`,
- room layouts (which receptacles, how many) from data/templates/alfworld_scenes.json.

The games play through TextWorld exactly like the real ones (same domain, same grammar, same
object naming, `Name_bar_N` ids demangled to "name N"). A scene is a set of receptacles, each at
its own location, with objects inside them; the agent starts at a location of its own.
Whether a game is solvable is decided by the planner in envs/alfworld.py (make_data.py drops unsolved ones).
"""
import json
import os

import alfworld
import alfworld.gen.constants as C
import alfworld.gen.goal_library as goal_library

HERE = os.path.dirname(os.path.abspath(__file__))
ALFWORLD_DATA = os.path.join(os.path.dirname(alfworld.__file__), "data")

TASK_TYPES = ("pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
              "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place")

STATIC_RECEPTACLES = sorted(set(C.RECEPTACLES) - set(C.MOVABLE_RECEPTACLES))
# Object types must not share a name with a receptacle type (both become "<Name>Type" constants).
OBJECT_TYPES = sorted(set(C.OBJECTS) - set(STATIC_RECEPTACLES))
PICKUPABLE = sorted({o for objs in C.VAL_RECEPTACLE_OBJECTS.values() for o in objs
                     if "Sliced" not in o and o not in STATIC_RECEPTACLES and o in OBJECT_TYPES})
# Receptacle type that performs each transformation; it can never be the goal receptacle.
TOOL = {"pick_clean_then_place_in_recep": ("SinkBasin", "Cleanable"),
        "pick_heat_then_place_in_recep": ("Microwave", "Heatable"),
        "pick_cool_then_place_in_recep": ("Fridge", "Coolable")}
LAMP = "DeskLamp"


def load_scenes():
    with open(os.path.join(HERE, "data", "templates", "alfworld_scenes.json")) as f:
        return json.load(f)


def receptacle_id(rtype, n):
    # Basins are ids of the form Sink_bar_1_bar_SinkBasin, as in the ALFRED scenes.
    if rtype.endswith("Basin"):
        return f"{rtype[:-len('Basin')]}_bar_{n}_bar_{rtype}"
    return f"{rtype}_bar_{n}"


def can_contain(rtype, otype):
    return otype in C.VAL_RECEPTACLE_OBJECTS.get(rtype, ())


def sample_scene(rng, room, scenes):
    """{receptacle id: receptacle type} for one room, at least one of each type with min >= 1."""
    recs = {}
    for rtype, (lo, hi) in sorted(scenes[room].items()):
        for n in range(1, rng.randint(lo, hi) + 1):
            recs[receptacle_id(rtype, n)] = rtype
    return recs


def choose_task(rng, task_type, recs, scenes):
    """Pick (object type, goal receptacle type) that this scene can realise, or None."""
    present = sorted(set(recs.values()))
    if task_type == "look_at_obj_in_light":
        if not any(r in present for r in scenes["lamp_receptacles"]):
            return None
        candidates = [(o, None) for o in PICKUPABLE if any(can_contain(r, o) for r in present)]
    else:
        tool, prop = TOOL.get(task_type, (None, None))
        if tool and tool not in present:
            return None
        objs = [o for o in PICKUPABLE if prop is None or o in C.VAL_ACTION_OBJECTS[prop]]
        candidates = []
        for o in objs:
            for r in present:
                if r == tool or not can_contain(r, o):
                    continue
                # The object must start somewhere that is not already a goal receptacle.
                if any(can_contain(s, o) and s != r for s in present):
                    candidates.append((o, r))
    return rng.choice(candidates) if candidates else None


def make_problem(rng, task_type, name, scenes):
    """One game: (pddl_problem text, task sentence). Resamples the room until the task fits."""
    rooms = sorted(C.GOALS_VALID[task_type])
    for _ in range(100):
        room = rng.choice(rooms)
        recs = sample_scene(rng, room, scenes)
        task = choose_task(rng, task_type, recs, scenes)
        if task is not None:
            break
    else:
        raise RuntimeError(f"could not build a {task_type} scene in 100 tries")
    otype, goal_rtype = task
    rec_ids = sorted(recs)

    objects = {}  # object id -> (type, receptacle id)

    def place(o, n, forbid_type=None):
        choices = [r for r in rec_ids if can_contain(recs[r], o) and recs[r] != forbid_type]
        objects[f"{o}_bar_{n}"] = (o, rng.choice(choices))

    n_target = rng.randint(2, 3) if task_type == "pick_two_obj_and_place" else rng.randint(1, 2)
    for n in range(1, n_target + 1):
        place(otype, n, forbid_type=goal_rtype)
    if task_type == "look_at_obj_in_light":
        lamp_recs = [r for r in rec_ids if recs[r] in scenes["lamp_receptacles"]]
        objects[f"{LAMP}_bar_1"] = (LAMP, rng.choice(lamp_recs))
    lo, hi = scenes["distractor_objects"]
    pool = [o for o in PICKUPABLE if o != otype and any(can_contain(recs[r], o) for r in rec_ids)]
    counts = {}
    for o in rng.sample(pool, min(len(pool), rng.randint(lo, hi))):
        counts[o] = counts.get(o, 0) + 1
        place(o, counts[o])

    # Each receptacle has its own location; the agent starts at one more.
    locs = {r: f"loc_bar_{i}_bar_{rng.randint(0, 9)}_bar_{rng.randint(0, 3)}_bar_{rng.choice([0, 30, 45, 60])}"
            for i, r in enumerate(rec_ids)}
    start = f"loc_bar_{len(rec_ids)}_bar_0_bar_0_bar_30"

    decl = ["agent1 - agent"]
    decl += [f"{t}Type - otype" for t in OBJECT_TYPES]
    decl += [f"{t}Type - rtype" for t in STATIC_RECEPTACLES]
    decl += [f"{o} - object" for o in sorted(objects)]
    decl += [f"{r} - receptacle" for r in rec_ids]
    decl += [f"{l} - location" for l in sorted(set(locs.values()) | {start})]

    init = [f"(atLocation agent1 {start})"]
    for r in rec_ids:
        init.append(f"(receptacleType {r} {recs[r]}Type)")
        init.append(f"(receptacleAtLocation {r} {locs[r]})")
        if recs[r] in C.OPENABLE_CLASS_SET:
            init.append(f"(openable {r})")
    for rt in sorted(set(recs.values())):
        init += [f"(canContain {rt}Type {o}Type)" for o in sorted(C.VAL_RECEPTACLE_OBJECTS.get(rt, ())) if o in OBJECT_TYPES]
    props = {"Cleanable": "cleanable", "Heatable": "heatable", "Coolable": "coolable",
             "Sliceable": "sliceable", "Toggleable": "toggleable"}
    for oid, (o, r) in sorted(objects.items()):
        init.append(f"(objectType {oid} {o}Type)")
        init.append(f"(inReceptacle {oid} {r})")
        init.append(f"(objectAtLocation {oid} {locs[r]})")
        if o != LAMP:
            init.append(f"(pickupable {oid})")
        init += [f"({pred} {oid})" for key, pred in props.items() if o in C.VAL_ACTION_OBJECTS[key]]

    g = goal_library.gdict[task_type]
    fill = dict(obj=otype, recep=goal_rtype or "", toggle=LAMP, mrecep="")
    goal = g["pddl"].replace("#", "-").format(**fill)
    sentence = rng.choice(g["templates"]).format(**{k: v.lower() for k, v in fill.items()})
    nl = "\n        "
    problem = (f"(define (problem {name})\n(:domain alfred)\n(:objects\n        {nl.join(decl)}\n        )\n"
               f"(:init\n        {nl.join(init)}\n        )\n{goal}")
    return problem, sentence


def make_game(rng, task_type, name, scenes=None):
    """A game.tw-pddl dict (walkthrough still empty: the planner fills it)."""
    if task_type not in TASK_TYPES:
        raise ValueError(f"unknown ALFWorld task type {task_type!r}; expected one of {', '.join(TASK_TYPES)}")
    problem, sentence = make_problem(rng, task_type, name, scenes or load_scenes())
    with open(os.path.join(ALFWORLD_DATA, "alfred.pddl")) as f:
        domain = f.read()
    with open(os.path.join(ALFWORLD_DATA, "alfred.twl2")) as f:
        grammar = f.read().replace("UNKNOWN GOAL", sentence)
    return {"pddl_domain": domain, "grammar": grammar, "pddl_problem": problem, "solvable": True,
            "walkthrough": [], "task_type": task_type, "task": sentence}
