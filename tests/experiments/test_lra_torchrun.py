"""Data-parallel training through torchrun: two CPU processes over gloo, straight and resumed."""

import json
import os
import subprocess
import sys

import torch


def torchrun_train(root, config, out, *extra):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "experiments.lra.train", "--task", "listops", "--data-root", str(root),
        "--config", str(config), "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=180, env=environment
    )
    assert completed.returncode == 0, completed.stderr[-3000:]


def test_two_process_gloo_run_and_resume(all_tasks_root, tiny_configs, tmp_path):
    config = tiny_configs["listops"]
    torchrun_train(all_tasks_root, config, tmp_path / "straight")
    results = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 6
    # Evaluation shards the 8 test items across ranks without padding: each counted once.
    assert results["test_items"] == 8 and (results["test_accuracy"] * 8).is_integer()
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    assert len(straight["rng"]) == 2, "each rank's RNG state is saved for resume"

    torchrun_train(all_tasks_root, config, tmp_path / "resumed", "--stop-at-step", "4")
    torchrun_train(all_tasks_root, config, tmp_path / "resumed", "--resume")
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
