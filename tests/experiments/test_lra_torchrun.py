"""Data-parallel training through torchrun: two CPU processes over gloo."""

import json
import os
import subprocess
import sys

import torch


def test_two_process_gloo_run(all_tasks_root, tiny_configs, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "experiments.lra.train", "--task", "listops", "--data-root", str(all_tasks_root),
        "--config", str(tiny_configs["listops"]), "--out", str(out), "--no-progress",
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=180, env=environment
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 6
    assert results["test_items"] == 8
    # Evaluation shards the 8 test items across ranks without padding, so accuracy is k/8 exactly.
    assert (results["test_accuracy"] * 8) == round(results["test_accuracy"] * 8)
    checkpoint = torch.load(out / "last.pt", weights_only=False)
    assert len(checkpoint["rng"]) == 2, "each rank's RNG state is saved for resume"
