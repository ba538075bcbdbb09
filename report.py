"""report.py: the study's tables and figures from probe.py and evaluate.py outputs (one run or a whole sweep).

Reads every <results>/probe/*/records.jsonl, <results>/conflicts/*/records.jsonl and
<results>/eval/*/episodes.jsonl; each checkpoint is tied to its training run (k = --mask-action-frac,
seed) through the meta.json that train.py wrote beside it (or a run.json, or the folder name: see
run_info). Records are pooled by identity, not by folder (load): a copied folder counts once, two runs
whose folders share a name stay apart (labelled with their parent folder), and a folder holding records of
two writers or two configurations is an error. Records of all environments are pooled per split
(id_test / ood_test); every number is a mean with a bootstrap 95% interval.

Writes to <results>/report/: one PNG per figure and the CSV behind it, and results.md (the tables).
  agreement.png      prompt-action and CoT-action accuracy vs training step, ID and OOD
  loglik.png         reference-action log-likelihood after the tag alone / the reference thought / the own thought
  revisions.png      consistency and helpful / harmful revisions vs training step
  truncation.png     CoT action accuracy and reference log-likelihood vs kept share of the reasoning
  conflicts.png      following the conflicting trace (a2) vs anchoring on the prompt (a1) vs step
  attribution.png    share of attention and of input gradient of the action on prompt vs thought
  online.png         success rate by mode, ID vs OOD, per k (last checkpoint of each run)
  ood_vs_k.png       OOD success vs k, by mode (seeds pooled)
  pooled_over_seeds.csv  each k's measures at its last checkpoints pooled over seeds, and their change from the
                     base model paired by step (crossed bootstrap), the claims' numbers; in results.md too
  made_from.json     what made every output pooled here: settings, inputs, base model and checkpoints by sha256,
                     and each checkpoint's training run (settings and data by content)
  k_effect.csv       each k minus the smallest, paired by step / conflict / game: per seed and pooled over seeds
                     (crossed bootstrap: seeds and items drawn together), the table in results.md too
Same inputs, same bytes: nothing here depends on time or order on disk.

    python report.py --results results/demo
    python report.py --results results/sweep
"""
import argparse
import glob
import hashlib
import json
import os
import re
import sys

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--results", default="results/demo", help="folder holding probe/, conflicts/ and eval/ subfolders")
parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
parser.add_argument("--combine", nargs="+", metavar="STUDY",
                    help="instead: set the claims.csv of these study folders (studies/<study>, one environment each) side "
                         "by side, a column per environment, into --combine-out")
parser.add_argument("--combine-out", default="studies/claims",
                    help="folder --combine writes results.md, claims.csv and verdicts.md (the verdicts alone) to")
args = parser.parse_args()

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import claims  # noqa: E402
import cli  # noqa: E402
import jsonio  # noqa: E402
import provenance  # noqa: E402
import stats  # noqa: E402

cli.exit_cleanly()

def fail(msg):
    sys.exit(f"error: {msg}")


if args.combine:  # the claims table across environments, from committed study folders only
    import csv
    rows, sources = [], {}
    for folder in args.combine:
        path = os.path.join(folder, "claims.csv")
        try:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                found = list(reader)
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            fail(f"{path}: {getattr(e, 'strerror', None) or e} (run report.py on that study first)")
        lacking = [c for c in ("env", "claim", "measured", "verdict") if c not in (reader.fieldnames or [])]
        if lacking:
            fail(f"{path}:1: no column {lacking[0]!r}: not a claims.csv report.py wrote")
        for r in found:
            if (r["claim"], r["env"]) in sources:
                fail(f"{path}: {r['env']} is also in {sources[(r['claim'], r['env'])]}: one study per environment")
            sources[(r["claim"], r["env"])] = path
            rows.append(r)
    envs = [e for e in claims.ENV_NAMES if any(r["env"] == e for r in rows)]
    envs += sorted({r["env"] for r in rows} - set(envs))
    text = ("# The paper's claims across environments\n\n" + claims.rule()
            + "\n\nMade by `python report.py --combine " + " ".join(args.combine) + "` from: "
            + ", ".join(f"`{os.path.join(f, 'claims.csv')}`" for f in args.combine) + ".\n\n" + claims.table(rows, envs) + "\n")
    provenance.claim_output(args.combine_out, fail)
    jsonio.write_text_atomic(os.path.join(args.combine_out, "results.md"), text)
    jsonio.write_csv_atomic(os.path.join(args.combine_out, "claims.csv"), rows)
    jsonio.write_text_atomic(os.path.join(args.combine_out, "verdicts.md"), claims.verdicts(rows, envs) + "\n")
    print(f"claims of {', '.join(envs)} -> {args.combine_out}/results.md, verdicts.md")
    sys.exit(0)

OUT = os.path.join(args.results, "report")
SPLITS = ("id_test", "ood_test")
SPLIT_NAME = {"id_test": "in-domain", "ood_test": "out-of-domain"}


# Fields that differ between copies of one result (timing, retries, the name the checkpoint was listed under).
VOLATILE = ("seconds", "tries", "id", "checkpoint")
# Flags of an older probe.py / evaluate.py meta.json (no made_from) that change speed or naming, not results.
NOT_CONFIG = ("out", "conflicts_out", "threads", "device", "batch_size", "max_rows", "num_envs", "checkpoints", "adapter",
              "step_timeout", "worker_cmd", "backend", "no_base", "with_base", "all_checkpoints")


def digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def run_info(folder):
    """(configuration digest, {checkpoint name: info}, what made it) of a probe/eval output folder, from its meta.json.

    info: run (the training run's identity), label (its folder name), k, seed, ckpt (the checkpoint's identity:
    the weights' digest probe.py / evaluate.py recorded in made_from). A run's identity is what train.py says
    defines it (settings and data by content), so a copied run folder is one run and two runs sharing a
    folder name are two. k and seed come from train.py's meta.json beside the checkpoint, else a run.json the
    user wrote in the run folder ({"k": 0.3, "seed": 1}), else a k{k}_seed{seed} folder name; k is a number,
    "no-CoT", or None (unknown: checkpoints of another trainer), and such runs are labelled by their folder.
    What made it, for made_from.json: its made_from (result-changing settings, inputs and base model by sha256,
    checkpoints by weights) and, for each checkpoint train.py wrote, the run it came from (run_identity: settings
    and data; the base model by content), from the same files."""
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.exists(meta_path):
        fail(f"{meta_path} missing: not a probe.py / evaluate.py output folder")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        listed = [(name, path) for name, _, path in meta["checkpoints"]]
        made = meta.get("made_from")
        config = digest({k: made[k] for k in ("settings", "inputs")} if made else
                        {k: v for k, v in meta["args"].items() if k not in NOT_CONFIG})
        weights = dict(made["checkpoints"]) if made else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        fail(f"{meta_path}: not readable probe.py / evaluate.py metadata ({type(e).__name__}: {e})")
    info, trained = {}, {}
    for (name, path), (_, step, _) in zip(listed, meta["checkpoints"]):
        if path is None:  # the base model, or evaluate.py's expert / random policy
            run = name if name in ("expert", "random") else "base"
            model = (made or {}).get("inputs", {}).get("model", "") if run == "base" else ""
            info[name] = {"run": run, "label": run, "k": None, "seed": None, "ckpt": f"{run}:{model}"}
            continue
        k = seed = None
        run_id = "folder:" + os.path.abspath(os.path.dirname(os.path.normpath(path)))  # an older train.py's run
        ckpt_meta = os.path.join(path, "meta.json")
        run_json = next((p for p in (os.path.join(os.path.dirname(os.path.normpath(path)), "run.json"),
                                     os.path.join(path, "run.json")) if os.path.exists(p)), None)
        if os.path.exists(ckpt_meta):
            try:
                with open(ckpt_meta) as f:
                    m = json.load(f)
                a = m["args"]
                k, seed = ("no-CoT" if a.get("no_cot") else a["mask_action_frac"]), a["seed"]
                run_id = digest(m["run_identity"]) if "run_identity" in m else run_id
                trained[name] = {"step": step, "run_identity": m.get("run_identity"), "model_identity": m.get("model_identity"),
                                 "data": m.get("data"), "versions": m.get("versions")}
            except (OSError, ValueError, KeyError, TypeError) as e:
                fail(f"{ckpt_meta}: not readable train.py metadata ({type(e).__name__}: {e})")
        elif run_json:
            try:
                with open(run_json) as f:
                    given = json.load(f)
                k, seed = given.get("k"), given.get("seed")
            except (OSError, ValueError, AttributeError) as e:
                fail(f"{run_json}: not a JSON object like {{\"k\": 0.3, \"seed\": 1}} ({type(e).__name__}: {e})")
            if not (k is None or isinstance(k, (int, float))) or not (seed is None or isinstance(seed, int)):
                fail(f"{run_json}: field 'k' must be a number and 'seed' an integer, got {k!r}, {seed!r}")
        else:  # the run folder moved, or another trainer's: train.py's default naming k{k}_seed{seed} if it fits
            m = re.match(r"k([\d.]+)_seed(\d+)", name)
            k, seed = (float(m.group(1)), int(m.group(2))) if m else (None, None)
        ckpt = weights.get(name) or (provenance.folder_digest(path) if os.path.isdir(path) else "path:" + os.path.abspath(path))
        info[name] = {"run": run_id, "label": name.split("/")[0], "k": float(k) if isinstance(k, int) else k,
                      "seed": seed, "ckpt": ckpt, "path": path}
    made_by = {"made_from": made, "checkpoints": [[name, step] for name, step, _ in meta["checkpoints"]],
               "trained": trained, "versions": meta.get("versions")}
    return config, info, made_by


# "<kind>/<folder>" -> what made that output (run_info), written to made_from.json beside the tables.
MADE_FROM = {}


# (k, seed, env) -> {run identity: where}, and "base" -> {base model identity: where}, over every kind loaded: the
# tables key runs by k and seed, so two runs there (or two base models) would be pooled or one of them dropped.
TABLE_KEYS = {}


def load(kind, filename):
    """All records of <results>/<kind>/*/<filename>, each tagged with run (its label), k and seed.

    Pooled by identity, not by folder: a record is (configuration, run, checkpoint weights, record id), so a
    copied folder counts once (its records must equal the original's), and two runs whose folders share a name stay
    apart, labelled with their parent folders. One id twice in a folder (two writers), a record of a checkpoint
    its meta.json does not list, or one checkpoint with results of two configurations is an error."""
    recs, seen, configs, labels = [], {}, {}, {}
    for folder in sorted(glob.glob(os.path.join(args.results, kind, "*"))):
        path = os.path.join(folder, filename)
        if jsonio.parts_of(path):
            fail(f"{folder}: part files of an unfinished multi-process run ({', '.join(map(os.path.basename, jsonio.parts_of(path)))}); "
                 f"rerun that command to finish and merge them")
        if not os.path.exists(path):
            continue
        holder = provenance.lock_holder(folder)
        if holder:
            fail(f"{folder} is still being written by {holder}; report it when that run has ended")
        config, info, MADE_FROM[os.path.relpath(folder, args.results)] = run_info(folder)
        try:
            numbered = jsonio.read_jsonl_lines(path, required=("id", "checkpoint"))
        except jsonio.DataError as e:
            fail(str(e))
        latest = {}
        for lineno, r in numbered:
            if r["checkpoint"] not in info:
                fail(f"{path}:{lineno}: checkpoint {r['checkpoint']!r} is not in {folder}/meta.json: "
                     f"records of another configuration in one folder")
            if r["id"] in latest and not latest[r["id"]][1].get("errored"):  # a retried episode follows its errored record
                fail(f"{path}:{lineno}: id {r['id']!r} again (first on line {latest[r['id']][0]}): "
                     f"two writers on one folder? its numbers cannot be trusted")
            latest[r["id"]] = (lineno, r)
        for _, r in latest.values():
            if r.get("errored"):  # errored episodes are faults, not losses
                continue
            i = info[r["checkpoint"]]
            key = (config, i["run"], i["ckpt"], r["id"][len(r["checkpoint"]) + 1:])
            if key in seen:
                other_folder, other = seen[key]
                if {k: v for k, v in other.items() if k not in VOLATILE} != {k: v for k, v in r.items() if k not in VOLATILE}:
                    fail(f"{other_folder} and {folder} hold different results for {r['id']} from one configuration "
                         f"and the same checkpoint weights; keep one of them")
                continue  # a copy of a folder already pooled: counted once
            seen[key] = (folder, r)
            table_key = "base" if i["run"] == "base" else (i["k"], i["seed"], r.get("env")) if i["k"] is not None else None
            same = TABLE_KEYS.setdefault(table_key, {}) if table_key else {}
            same.setdefault(i["ckpt"] if i["run"] == "base" else i["run"], f"{i['label']} in {folder}")
            if len(same) > 1:
                a, b = sorted(same.values())[:2]
                fail(f"two base models ({a}; {b}) would be one 'base' row" if i["run"] == "base" else
                     f"two runs with k={i['k']}, seed {i['seed']} on {r.get('env')} but other settings or data ({a}; {b}) "
                     f"would be one row of every table; report them from separate --results")
            configs.setdefault((i["run"], i["ckpt"]), {}).setdefault(config, folder)
            labels.setdefault(i["label"], {}).setdefault(i["run"], i.get("path"))
            recs.append(dict(r, run=i["run"], label=i["label"], k=i["k"], seed=i["seed"]))
    for ckpt, by_config in configs.items():
        if len(by_config) > 1:
            fail(f"{' and '.join(sorted(by_config.values()))} hold {kind} results of one checkpoint under different "
                 f"settings or inputs; pooling them would mix configurations: report them from separate --results")
    # The label a reader sees: the run folder's name, with its parent folder where two runs share the name.
    names = {}
    for label, runs in labels.items():
        for run, path in runs.items():
            names[run] = label if len(runs) == 1 else (
                f"{label} ({os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(path))))})" if path else label)
        if len(runs) > 1 and len({names[r] for r in runs}) < len(runs):
            for n, run in enumerate(sorted(runs)):
                names[run] = f"{label} #{n + 1}"
    for r in recs:
        r["run"] = names[r.pop("run")]
        r.pop("label")
    return recs


def per_run(recs):
    """Base-model records are step 0 of every run in the same file set: copy them into each run."""
    runs = sorted({r["run"] for r in recs if r["run"] != "base"})
    out = [r for r in recs if r["run"] != "base"]
    for r in recs:
        if r["run"] == "base":
            out += [dict(r, run=run) for run in runs] or [r]
    return out


def table(recs, keys, metrics):
    rows = stats.summarize(recs, keys, metrics, seed=args.seed)
    return sorted(rows, key=lambda r: tuple(str(r[k]) if not isinstance(r[k], (int, float)) else f"{r[k]:012.4f}" for k in keys))


def save(fig, name, rows):
    os.makedirs(OUT, exist_ok=True)
    fig.savefig(os.path.join(OUT, name + ".png"), dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    jsonio.write_csv_atomic(os.path.join(OUT, name + ".csv"), rows)


def curves(ax, rows, x, metric, label_of, style=None):
    """One line per group with a shaded 95% interval."""
    groups = {}
    for r in rows:
        groups.setdefault(label_of(r), []).append(r)
    for label, rs in sorted(groups.items()):
        rs = sorted((r for r in rs if r[metric] is not None), key=lambda r: r[x])
        if not rs:
            continue
        xs = [r[x] for r in rs]
        line, = ax.plot(xs, [r[metric] for r in rs], marker="o", ms=3, label=label, **(style or {}))
        ax.fill_between(xs, [r[f"{metric}_lo"] for r in rs], [r[f"{metric}_hi"] for r in rs], alpha=0.15, color=line.get_color())


def by_split_figure(rows, metrics, ylabel, x="step", xlabel="training step (optimizer steps)", ylim=(-0.02, 1.02)):
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, split in zip(axes, SPLITS):
        sub = [r for r in rows if r["split"] == split]
        for metric, name in metrics:
            curves(ax, sub, x, metric, lambda r, name=name: f"{name}, {r['run']}")
        ax.set_title(SPLIT_NAME[split])
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if ylim:
            ax.set_ylim(*ylim)
    axes[0].set_ylabel(ylabel)
    axes[1].legend(fontsize=7, loc="best")
    return fig


def bars(ax, rows, metric, group_key, bar_key, bar_names):
    groups = sorted({r[group_key] for r in rows}, key=str)
    width = 0.8 / max(1, len(bar_names))
    for j, (b, name) in enumerate(bar_names):
        ys, los, his = [], [], []
        for g in groups:
            row = next((r for r in rows if r[group_key] == g and r[bar_key] == b), None)
            y = row[metric] if row and row[metric] is not None else float("nan")
            ys.append(y)
            los.append(y - row[f"{metric}_lo"] if row and row[metric] is not None else 0)
            his.append(row[f"{metric}_hi"] - y if row and row[metric] is not None else 0)
        ax.bar([i + j * width for i in range(len(groups))], ys, width, yerr=[los, his], capsize=3, label=name)
    ax.set_xticks([i + width * (len(bar_names) - 1) / 2 for i in range(len(groups))])
    ax.set_xticklabels([str(g) for g in groups])


def md_table(rows, cols):
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for _, key in cols:
            v = r.get(key)
            if isinstance(v, float) and f"{key}_lo" in r and r[f"{key}_lo"] is not None:
                cells.append(f"{v:.2f} [{r[key + '_lo']:.2f}, {r[key + '_hi']:.2f}]")
            elif isinstance(v, float):
                cells.append(f"{v:.2f}")
            else:
                cells.append("" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def last_steps(recs):
    """{run: the step of its last checkpoint among recs}."""
    last = {}
    for r in recs:
        last[r["run"]] = max(last.get(r["run"], 0), r["step"])
    return last


def trained_last(recs):
    """The records of each trained run's (k a number) last checkpoint: what the k effect and the pooled
    claims compare."""
    last = last_steps(recs)
    return [r for r in recs if isinstance(r["k"], float) and r["step"] == last[r["run"]] and r["step"] > 0]


def k_effect(recs, metrics, item_of):
    """Rows of the effect of k against the smallest k (k=0.3 minus k=0), at each run's last checkpoint,
    paired by item (the same probed step, conflict or game, item_of(record)) within a seed: per seed (bootstrap
    over items) and pooled over the seeds both k share (seeds_and_items)."""
    final = trained_last(recs)
    ks = sorted({r["k"] for r in final})
    by = {(r["k"], r["seed"], r["split"], item_of(r)): r for r in final}
    rows = []
    for k in ks[1:]:
        for split in SPLITS:
            for m in metrics:
                groups = {}
                for (kk, seed, sp, item), r in sorted(by.items(), key=lambda kv: str(kv[0])):
                    ref = by.get((ks[0], seed, sp, item))
                    if kk == k and sp == split and ref and r.get(m) is not None and ref.get(m) is not None:
                        groups.setdefault(seed, {})[item] = float(r[m]) - float(ref[m])
                if not groups:
                    continue
                row = {"metric": m, "split": split, "k": k, "vs_k": ks[0]}
                for seed, diffs in sorted(groups.items(), key=lambda kv: str(kv[0])):
                    mean, lo, hi = stats.mean_ci(list(diffs.values()), seed=args.seed)
                    rows.append(dict(row, seed=seed, n=len(diffs), diff=mean, diff_lo=lo, diff_hi=hi))
                mean, lo, hi = stats.seeds_and_items(groups, args.seed)
                rows.append(dict(row, seed=f"pooled ({len(groups)})", n=sum(map(len, groups.values())), diff=mean,
                                 diff_lo=lo, diff_hi=hi, diff_t=stats.seed_t_interval(groups)))
    return rows


def pooled_over_seeds(recs, metrics, item_of):
    """Rows of each k's measures at its runs' last checkpoints, pooled over training seeds: the level, and the
    change from the base model paired by item (item_of(record): the same probed step or conflict), each the
    mean of the seed means with seeds_and_items' crossed interval, so every interval holds between-seed
    variation. These are the numbers the claims are judged on."""
    base = {(r["split"], item_of(r)): r for r in recs if r["step"] == 0}
    final = trained_last(recs)
    rows = []
    for k in sorted({r["k"] for r in final}):
        for split in SPLITS:
            for m in metrics:
                level, change = {}, {}
                for r in final:
                    if r["k"] != k or r["split"] != split or r.get(m) is None:
                        continue
                    level.setdefault(r["seed"], {})[item_of(r)] = float(r[m])
                    b = base.get((split, item_of(r)))
                    if b is not None and b.get(m) is not None:
                        change.setdefault(r["seed"], {})[item_of(r)] = float(r[m]) - float(b[m])
                if not level:
                    continue
                row = {"metric": m, "split": split, "k": k, "seeds": len(level), "n": sum(map(len, level.values()))}
                row["value"], row["value_lo"], row["value_hi"] = stats.seeds_and_items(level, args.seed)
                row["value_t"] = stats.seed_t_interval(level)
                row["change"], row["change_lo"], row["change_hi"] = stats.seeds_and_items(change, args.seed) if change else (None,) * 3
                row["change_t"] = stats.seed_t_interval(change) if change else ""
                rows.append(row)
    return rows


def local_id(r):
    """A record's id without its checkpoint's name: the same step, conflict or game across runs."""
    return r["id"][len(r["checkpoint"]) + 1:]


# ----------------------------------------------------------------------------- figures

md = [f"# Results: {args.results}", "",
      "Every number: mean over records (all environments pooled per split) [bootstrap 95% interval]. "
      "Made by `python report.py --results " + args.results + "`.", ""]
# Everything is read and checked before the report folder is touched; one report.py at a time writes it.
probe, conf, episodes = (load(kind, name) for kind, name in (("probe", "records.jsonl"), ("conflicts", "records.jsonl"),
                                                             ("eval", "episodes.jsonl")))
if not (probe or conf or episodes):
    fail(f"nothing to report under {args.results} (expected probe/*, conflicts/*, eval/* folders)")
provenance.claim_output(OUT, fail)
probe, conf = per_run(probe), per_run(conf)
if probe:
    rows = table(probe, ["run", "step", "split"], ["prompt_correct", "cot_correct", "consistent", "helpful", "harmful",
                                                   "rank1_prompt", "rank1_thought", "ll_prompt_mean", "ll_thought_mean",
                                                   "ll_own_mean"])
    fig = by_split_figure(rows, [("prompt_correct", "prompt action"), ("cot_correct", "CoT action")], "accuracy vs reference action")
    fig.suptitle("Where the gains land: prompt action vs CoT action", y=1.02)
    save(fig, "agreement", rows)
    fig = by_split_figure(rows, [("ll_prompt_mean", "after the action tag alone"), ("ll_thought_mean", "after the reference thought"),
                                 ("ll_own_mean", "after the model's own thought")],
                          "reference action log-likelihood (nats/token)", ylim=None)
    fig.suptitle("Log-likelihood of the reference action: prompt mode vs CoT mode", y=1.02)
    save(fig, "loglik", rows)
    fig = by_split_figure(rows, [("consistent", "consistent (prompt = CoT)"), ("helpful", "helpful revision"),
                                 ("harmful", "harmful revision")], "share of steps")
    fig.suptitle("Consistency and revisions of the CoT action", y=1.02)
    save(fig, "revisions", rows)
    md += ["## Probe: prompt action vs CoT action", "", md_table(rows, [
        ("run", "run"), ("step", "step"), ("split", "split"), ("n", "n"), ("prompt acc", "prompt_correct"),
        ("CoT acc", "cot_correct"), ("consistent", "consistent"), ("helpful", "helpful"), ("harmful", "harmful"),
        ("rank-1 prompt", "rank1_prompt"), ("LL/token prompt", "ll_prompt_mean"), ("LL/token w/ thought", "ll_thought_mean")]), ""]

    # Truncation: the last checkpoint of every run, and the base model.
    last = last_steps(probe)
    pts = []
    for r in probe:
        if r["step"] == last[r["run"]] or r["step"] == 0:
            for key in r:
                m = re.match(r"trunc_correct_(\d+)$", key)
                if m:
                    pct = int(m.group(1))
                    label = "base" if r["step"] == 0 else r["run"]
                    pts.append({"model": label, "split": r["split"], "kept_pct": pct, "correct": r[key],
                                "ll": r[f"trunc_ll_{pct}"], "id": r["id"]})
    pts = list({(p["model"], p["id"], p["kept_pct"]): p for p in pts}.values())
    trows = table(pts, ["model", "split", "kept_pct"], ["correct", "ll"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, (metric, ylabel) in zip(axes, (("correct", "action accuracy after the kept reasoning"),
                                           ("ll", "log-likelihood of reference action (nats)"))):
        for split, ls in zip(SPLITS, ("-", "--")):
            curves(ax, [r for r in trows if r["split"] == split], "kept_pct", metric,
                   lambda r, split=split: f"{r['model']}, {SPLIT_NAME[split]}", style={"linestyle": ls})
        ax.set_xlabel("reference reasoning kept (% of words)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("Truncated reasoning: how much does the action depend on the trace?", y=1.02)
    save(fig, "truncation", trows)

    att = [r for r in probe if r.get("attn_prompt") is not None]
    if att:
        arows = table(att, ["run", "step", "split"], ["attn_prompt", "attn_thought", "grad_prompt", "grad_thought"])
        fig = by_split_figure(arows, [("attn_prompt", "attention on prompt"), ("attn_thought", "attention on thought"),
                                      ("grad_prompt", "gradient on prompt"), ("grad_thought", "gradient on thought")],
                              "share of the action's attention / input gradient")
        fig.suptitle("Where the action's signal comes from (reference thought in context)", y=1.02)
        save(fig, "attribution", arows)
        md += ["## Attribution: shares from the action onto prompt vs thought", "", md_table(arows, [
            ("run", "run"), ("step", "step"), ("split", "split"), ("n", "n"), ("attn prompt", "attn_prompt"),
            ("attn thought", "attn_thought"), ("grad prompt", "grad_prompt"), ("grad thought", "grad_thought")]), ""]

if conf:
    rows = table(conf, ["run", "step", "split"], ["follows", "anchors", "neither", "prefers_a2"])
    fig = by_split_figure(rows, [("follows", "follows trace (a2)"), ("anchors", "anchors on prompt (a1)")], "share of conflict probes")
    fig.suptitle("Conflicting reasoning: follow the trace or the prompt?", y=1.02)
    save(fig, "conflicts", rows)
    md += ["## Conflict probe", "", md_table(rows, [("run", "run"), ("step", "step"), ("split", "split"), ("n", "n"),
                                                    ("follows a2", "follows"), ("anchors a1", "anchors"), ("neither", "neither"),
                                                    ("prefers a2 (LL)", "prefers_a2")]), ""]

# Each game's prompt-mode and CoT-mode outcome, paired: one entry per checkpoint and game. won is success; score
# the environment's partial credit in [0, 1] (ScienceWorld's score, multi-turn BFCL's share of turns passed; the
# same as won in ALFWorld and single-turn BFCL), the primary online measure of the claims.
ONLINE = ("won", "score")
online = {}
for e in episodes:
    if e["mode"] in ("prompt", "cot"):
        o = online.setdefault((e["run"], e["step"], e["split"], e["task_id"]), dict(
            {k: e.get(k) for k in ("run", "k", "seed", "step", "split", "task_id", "env")}))
        for m in ONLINE:
            o[f"{m}_{e['mode']}"] = None if e.get(m) is None else float(e[m])
for o in online.values():
    for m in ONLINE:
        if o.get(f"{m}_cot") is not None and o.get(f"{m}_prompt") is not None:
            o[f"{m}_cot_minus_prompt"] = o[f"{m}_cot"] - o[f"{m}_prompt"]
if episodes:
    several_seeds = len({r["seed"] for r in episodes if r["k"] is not None}) > 1
    for r in episodes:  # a row per training run: seeds apart when there are several (pooled below)
        r["k_label"] = (r["run"] if r["run"] in ("base", "expert", "random") or r["k"] is None
                        else ("no-CoT" if r["k"] == "no-CoT" else f"k={r['k']}")
                        + (f", seed {r['seed']}" if several_seeds else ""))
    last = last_steps(episodes)
    final = [r for r in episodes if r["step"] == last[r["run"]] and r["mode"] in ("prompt", "cot", "expert", "random")]
    rows = table(final, ["k_label", "split", "mode"], ["won", "score", "agreement", "invalid_rate"])
    for row in rows:  # success is a proportion: its Wilson interval too, which is not degenerate at 0 or 1
        row["won_wilson_lo"], row["won_wilson_hi"] = stats.wilson(round(row["won"] * row["n"]), row["n"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, split in zip(axes, SPLITS):
        bars(ax, [r for r in rows if r["split"] == split], "won", "k_label", "mode",
             [("prompt", "prompt action"), ("cot", "CoT action"), ("expert", "expert policy"), ("random", "random policy")])
        ax.set_title(SPLIT_NAME[split])
        ax.set_xlabel("model (training objective)")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("episode success rate")
    axes[1].legend(fontsize=8)
    fig.suptitle("Online success by acting mode (last checkpoint of each run)", y=1.02)
    save(fig, "online", rows)
    floor = {r["split"]: r for r in rows if r["mode"] == "random"}
    for row in rows:
        row["won_wilson"] = f"[{row['won_wilson_lo']:.2f}, {row['won_wilson_hi']:.2f}]"
        rnd = floor.get(row["split"])  # is this policy's success above the random policy's on the same split?
        row["p_vs_random"] = "" if rnd is None or row["mode"] in ("random", "expert") else "%.3f" % stats.fisher_greater(
            round(row["won"] * row["n"]), row["n"], round(rnd["won"] * rnd["n"]), rnd["n"])
    md += ["## Online rollouts (last checkpoint of each run)", "", "p vs random: one-sided Fisher exact test that "
           "the success rate is above the random policy's on the same split.", "", md_table(rows, [
        ("model", "k_label"), ("split", "split"), ("mode", "mode"), ("n", "n"), ("success [bootstrap]", "won"),
        ("success Wilson 95%", "won_wilson"), ("p vs random", "p_vs_random"), ("score", "score"),
        ("prompt-CoT agreement", "agreement"), ("invalid actions", "invalid_rate")]), ""]
    # The paper's relative advantage: CoT minus prompt success, paired task by task.
    pairs = {}
    for r in final:
        if r["mode"] in ("prompt", "cot"):
            pairs.setdefault((r["k_label"], r["split"], r["task_id"]), {})[r["mode"]] = float(r["won"])
    diffs = [{"k_label": k, "split": split, "cot_minus_prompt": p["cot"] - p["prompt"]}
             for (k, split, _), p in pairs.items() if len(p) == 2]
    if diffs:
        drows = table(diffs, ["k_label", "split"], ["cot_minus_prompt"])
        for row in drows:  # the games a paired interval of +-0.05 would need at this spread (normal approximation)
            sd = np.std([d["cot_minus_prompt"] for d in diffs if (d["k_label"], d["split"]) == (row["k_label"], row["split"])], ddof=1)
            row["games_for_0.05"] = int(np.ceil((1.96 * sd / 0.05) ** 2)) if row["n"] > 1 and sd > 0 else None  # no spread: unknown
        jsonio.write_csv_atomic(os.path.join(OUT, "cot_minus_prompt.csv"), drows)
        md += ["### CoT minus prompt success, paired by task", "", "games for +-0.05: tasks a 95% interval of half-width "
               "0.05 would need at this spread of the paired differences, (1.96 sd / 0.05)^2; telling two checkpoints "
               "apart by 0.05 needs about twice that, more for 80% power.", "", md_table(drows, [
            ("model", "k_label"), ("split", "split"), ("n tasks", "n"), ("CoT - prompt", "cot_minus_prompt"),
            ("games for +-0.05", "games_for_0.05")]), ""]
    # Across checkpoints (evaluate.py --all-checkpoints): does the CoT advantage stay flat while both modes rise?
    # The base model's games (step 0) start every run's curve.
    steps_of = {}
    for o in online.values():
        if o["step"] > 0:
            steps_of.setdefault(o["run"], set()).add(o["step"])
    runs = sorted(run for run, at in steps_of.items() if len(at) > 1)  # the runs rolled out at several checkpoints
    if runs:
        curve = [o for o in online.values() if o["run"] in runs] + [
            dict(o, run=run) for o in online.values() if o["run"] == "base" for run in runs]
        crows = table([o for o in curve if "won_cot_minus_prompt" in o], ["run", "split", "step"],
                      [f"{m}_{mode}" for m in ("score", "won") for mode in ("prompt", "cot", "cot_minus_prompt")])
        fig = by_split_figure(crows, [("score_prompt", "prompt mode"), ("score_cot", "CoT mode"),
                                      ("score_cot_minus_prompt", "CoT minus prompt")], "online score (success in ALFWorld, BFCL)",
                              ylim=(-0.52, 1.02))
        fig.suptitle("Online across checkpoints: both modes, and CoT's advantage, paired by game", y=1.02)
        save(fig, "online_by_step", crows)
        md += ["### Online across checkpoints, paired by game", "", md_table(crows, [
            ("run", "run"), ("split", "split"), ("step", "step"), ("n games", "n"), ("score prompt", "score_prompt"),
            ("score CoT", "score_cot"), ("CoT - prompt score", "score_cot_minus_prompt"),
            ("CoT - prompt success", "won_cot_minus_prompt")]), ""]
    trained = [r for r in final if isinstance(r["k"], float) and r["split"] == "ood_test"]
    if trained:
        krows = table(trained, ["mode", "k"], ["won", "score"])
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        curves(ax, krows, "k", "won", lambda r: f"{r['mode']} action")
        ax.set_xlabel("k = share of examples with the action loss masked")
        ax.set_ylabel("out-of-domain success rate")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("OOD success vs --mask-action-frac (seeds pooled)")
        save(fig, "ood_vs_k", krows)

# The k effect, paired: the same steps and conflicts offline, the same games online, seed by seed and pooled.
def effects(probe, conf, episodes):
    rows = k_effect(probe, ["prompt_correct", "cot_correct", "consistent", "ll_prompt_mean", "ll_thought_mean", "ll_own_mean"],
                    local_id) + k_effect(conf, ["follows", "anchors"], local_id)
    return rows + [dict(r, metric=f"{r['metric']} ({mode} mode)") for mode in ("prompt", "cot")
                   for r in k_effect([e for e in episodes if e["mode"] == mode], ["won", "score"], lambda e: e["task_id"])]


# The claims' numbers: each k's last checkpoints pooled over seeds, and their change from the base model.
def pooled(probe, conf, online):
    return (pooled_over_seeds(probe, ["prompt_correct", "cot_correct", "cot_minus_prompt", "consistent", "helpful", "harmful",
                                      "ll_prompt_mean", "ll_thought_mean", "ll_own_mean", "grad_prompt", "attn_prompt"], local_id)
            + pooled_over_seeds(conf, ["follows", "anchors"], local_id)
            + pooled_over_seeds(online, [f"{m}_{mode}" for m in ONLINE for mode in ("prompt", "cot", "cot_minus_prompt")],
                                lambda o: o["task_id"]))


effect = effects(probe, conf, episodes)
if effect:
    jsonio.write_csv_atomic(os.path.join(OUT, "k_effect.csv"), effect)
    md += ["## The k effect, paired (each k minus the smallest, last checkpoints)", "",
           "Differences paired by probed step or conflict (offline) or by game (online) within a seed; per seed a "
           "bootstrap over those items; pooled: the mean of the seed means with a crossed bootstrap (seeds and "
           "items drawn together, every seed measured on the same items), so its interval includes between-seed "
           "variation (none with one seed); beside it, a t interval over the seed means (seeds alone, t's width).", "",
           md_table(effect, [("measure", "metric"), ("split", "split"), ("k", "k"), ("vs k", "vs_k"), ("seed", "seed"),
                             ("n", "n"), ("difference", "diff"), ("t over seed means", "diff_t")]), ""]
for r in probe:
    if r.get("prompt_correct") is not None and r.get("cot_correct") is not None:
        r["cot_minus_prompt"] = float(r["cot_correct"]) - float(r["prompt_correct"])
pooled_rows = pooled(probe, conf, list(online.values()))
if pooled_rows:
    jsonio.write_csv_atomic(os.path.join(OUT, "pooled_over_seeds.csv"), pooled_rows)
    md += ["## Pooled over training seeds (last checkpoints)", "",
           "Each k's runs at their last checkpoint: the mean of the seed means, and its change from the base model "
           "paired by probed step or conflict; intervals from a crossed bootstrap (seeds and items drawn together), "
           "so they include between-seed variation (none with one seed); beside each, a t interval over the seed means "
           "(seeds alone, t's width). won_*, score_*: online, paired by game.", "",
           md_table(pooled_rows, [("measure", "metric"), ("split", "split"), ("k", "k"), ("seeds", "seeds"), ("n", "n"),
                                  ("value", "value"), ("t over seed means", "value_t"), ("change from base", "change"),
                                  ("t over seed means", "change_t")]), ""]
# The paper's claims, judged per environment (claims.py): an environment's numbers alone, never pooled with another's.
ENVS = sorted({r["env"] for r in probe + conf + episodes if r.get("env")})
verdicts = []
for env in ENVS:
    if len(ENVS) == 1:
        verdicts += claims.judge(env, pooled_rows, effect)
        continue
    p, c, e = ([r for r in recs if r.get("env") == env] for recs in (probe, conf, episodes))
    verdicts += claims.judge(env, pooled(p, c, [o for o in online.values() if o.get("env") == env]), effects(p, c, e))
if verdicts:
    jsonio.write_csv_atomic(os.path.join(OUT, "claims.csv"), verdicts)
    md[4:4] = ["## The paper's claims, per environment", "", claims.rule(), "",
               claims.table(verdicts, [e for e in ENVS if any(v["env"] == e for v in verdicts)]), ""]
jsonio.write_text_atomic(os.path.join(OUT, "results.md"), "\n".join(md) + "\n")
# Every output the tables come from, by identity: a committed report can be traced to what made each number.
jsonio.write_json_atomic(os.path.join(OUT, "made_from.json"), dict(sorted(MADE_FROM.items())))
print(f"report done: {len(probe)} probe, {len(conf)} conflict, {len(episodes)} episode records -> {OUT}")
