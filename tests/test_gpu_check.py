"""bench/gpu_check.py on the CPU with a tiny model: every stage of the CUDA check runs (CI has no GPU)."""
import os

from conftest import run


def test_gpu_check_smoke_on_cpu(small_data, tmp_path):
    proc = run("bench/gpu_check.py", "--device", "cpu", "--size", "tiny", "--steps", "2", "--batch-size", "4",
               "--records", "2", "--data", os.path.join(small_data[0], "alfworld_train.jsonl"), "--out", str(tmp_path))
    for stage in ("train.py --micro-batch-tokens 4096", "torchrun --nproc_per_node 1 train.py", "probe.py",
                  "evaluate.py --backend hf"):
        assert f"ok   {stage} (" in proc.stdout, proc.stdout
    assert "baseline: transformers generate, batch  1:" in proc.stdout and "decode batch 32:" in proc.stdout
    assert "gpu_check done: all stages ok" in proc.stdout
    episodes = (tmp_path / "eval" / "episodes.jsonl").read_text().splitlines()
    assert len(episodes) == 2 * 2  # 2 replayed episodes x 2 modes


def test_gpu_check_stages_micro_batches_and_profile(small_data, tmp_path):
    """--stages runs only the named stages; a --micro-batch-tokens list trains once per value (train.py and
    the in-process warm steps); --profile prints torch.profiler tables of a training step, decode.run_branches
    and generate."""
    proc = run("bench/gpu_check.py", "--device", "cpu", "--size", "tiny", "--steps", "1", "--batch-size", "4",
               "--records", "2", "--data", os.path.join(small_data[0], "alfworld_train.jsonl"), "--out", str(tmp_path),
               "--stages", "train,step,speed", "--micro-batch-tokens", "512,4096", "--profile")
    for mbt in ("512", "4096"):
        assert f"ok   train.py --micro-batch-tokens {mbt} (" in proc.stdout, proc.stdout
        assert f"train.py --micro-batch-tokens {mbt}: " in proc.stdout
        for share in ("on ", "off"):
            assert f"warm training step, micro-batch tokens {int(mbt):5d}, share-prefix {share}: " in proc.stdout
    assert "profile of one warm training step" in proc.stdout
    assert "probe.py" not in proc.stdout and "evaluate.py" not in proc.stdout and "torchrun" not in proc.stdout
    for name in ("decode.run_branches", "transformers generate"):
        assert f"profile of 16 greedy tokens at batch 1, {name}:" in proc.stdout
    assert "aten::" in proc.stdout and "gpu_check done: all stages ok" in proc.stdout


def test_cost_model_scales_with_model_size_and_gpus():
    """bench/cost_model.py: hours proportional to parameters (rates scaled by size), divided by the GPUs."""
    def table(*extra):
        out = run("bench/cost_model.py", "--params", "4,8", *extra).stdout
        return [[float(c.replace(",", "")) for c in line.split("|")[3:5]] for line in out.splitlines()
                if line.startswith("| 4B") or line.startswith("| 8B")]
    rows = table("--gpus", "8")
    assert len(rows) == 6
    for (one_a, eight_a), (one_b, _) in zip(rows[:3], rows[3:]):
        assert abs(one_b - 2 * one_a) <= 0.11 and abs(eight_a - one_a / 8) <= 0.06
    doubled = table("--epochs", "10")
    assert abs(doubled[0][0] - 2 * rows[0][0]) <= 0.11 and doubled[1] == rows[1]  # training only
