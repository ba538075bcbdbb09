"""bench/gpu_check.py on the CPU with a tiny model: every stage of the CUDA check runs (CI has no GPU)."""
import os

from conftest import run


def test_gpu_check_smoke_on_cpu(small_data, tmp_path):
    proc = run("bench/gpu_check.py", "--device", "cpu", "--size", "tiny", "--steps", "2", "--batch-size", "4",
               "--records", "2", "--data", os.path.join(small_data[0], "alfworld_train.jsonl"), "--out", str(tmp_path))
    for stage in ("train.py", "torchrun --nproc_per_node 1 train.py", "probe.py", "evaluate.py --backend hf"):
        assert f"ok   {stage} (" in proc.stdout, proc.stdout
    assert "decode batch 32:" in proc.stdout and "gpu_check done: all stages ok" in proc.stdout
    episodes = (tmp_path / "eval" / "episodes.jsonl").read_text().splitlines()
    assert len(episodes) == 2 * 2  # 2 replayed episodes x 2 modes
