"""study.sh end to end on single-turn BFCL with the tiny random model: every stage of a two-seed study, the first
seed rolled out at every checkpoint from the base model on, the report and its copy to the study folder; a rerun
of the same command trains nothing again."""
import csv
import os
import subprocess
import sys

from conftest import ROOT


def study(tiny_model, tmp_path):
    env = dict(os.environ, ENV="bfcl", PY=sys.executable, MODEL=tiny_model, TRAIN_ITEMS="16", TEST_ITEMS="3",
               EPISODES="3", RECORDS="3", SEEDS="0 1", SAVE_STEPS="1", THREADS="1", NUM_ENVS="4",
               TRAIN_ARGS="--lr 1e-3 --lora-r 4 --lora-alpha 8", DATA=str(tmp_path / "data"),
               OUT=str(tmp_path / "results"), STUDY_DIR=str(tmp_path / "study"))
    proc = subprocess.run(["bash", "study.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def stages(tmp_path):
    with open(tmp_path / "results" / "stages.tsv") as f:
        return [line.split("\t")[0] for line in f]


def test_bfcl_study_end_to_end_and_resumed(tiny_model, tmp_path):
    study(tiny_model, tmp_path)
    folder = tmp_path / "study"
    for name in ("results.md", "claims.csv", "online_by_step.csv", "pooled_over_seeds.csv", "k_effect.csv",
                 "made_from.json", "stages.tsv", "commit.txt", "agreement.png", "online_by_step.png"):
        assert (folder / name).exists(), name
    # The first seed's runs are rolled out at the base model and at both checkpoints (steps 1 and 2), the second
    # seed's at their last; no conflict probe (BFCL has no valid-action lists).
    rows = list(csv.DictReader(open(folder / "online_by_step.csv")))
    assert {(r["run"], r["step"]) for r in rows} == {(f"k{k}_seed0", s) for k in ("0.0", "0.3") for s in ("0", "1", "2")}
    assert {r["split"] for r in rows} == {"id_test", "ood_test"} and all(r["n"] == "3" for r in rows)
    assert not (tmp_path / "results" / "conflicts" / "base").exists()
    claims = {r["claim"]: r for r in csv.DictReader(open(folder / "claims.csv"))}
    assert {r["env"] for r in claims.values()} == {"bfcl"} and "conflicts" not in claims
    assert claims["online_flat"]["measured"].startswith("change from base")
    ran = stages(tmp_path)
    assert sorted(s for s in ran if s.startswith("train")) == ["train_k0.0_seed0", "train_k0.0_seed1",
                                                                "train_k0.3_seed0", "train_k0.3_seed1"]
    # The same command again: nothing is trained or rolled out twice, and the report is the same.
    before = (folder / "results.md").read_text()
    study(tiny_model, tmp_path)
    again = stages(tmp_path)[len(ran):]
    assert not any(s.startswith("train") for s in again) and "data" not in again
    assert (folder / "results.md").read_text() == before


def test_an_unknown_environment_is_refused_in_one_line(tmp_path):
    env = dict(os.environ, ENV="webshop", PY=sys.executable, DATA=str(tmp_path / "data"), OUT=str(tmp_path / "results"))
    proc = subprocess.run(["bash", "study.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: ENV=webshop: expected alfworld, scienceworld, bfcl or bfcl_mt"
    assert not (tmp_path / "results").exists()
