"""The training script on every task's fixtures: outputs, exact resume, summary, main job."""

import csv
import json

import pytest
import torch

from experiments.lra import main_job, summary, train


def run_train(task, root, config, out, *extra):
    argv = ["--task", task, "--data-root", str(root), "--config", str(config), "--out", str(out)]
    train.main([*argv, "--log-every", "2", "--no-progress", *extra])


def read_metrics(out):
    with (out / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize(
    ("task", "attention"),
    [
        ("listops", "taylorshift"),
        ("listops", "softmax"),
        ("text", "taylorshift"),
        ("retrieval", "taylorshift"),
        ("image", "taylorshift"),
        ("pathfinder", "softmax"),
    ],
)
def test_a_few_steps_per_task(all_tasks_root, tiny_configs, tmp_path, task, attention):
    out = tmp_path / "run"
    run_train(task, all_tasks_root, tiny_configs[task], out, "--attention", attention)
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == task and results["attention"] == attention and results["steps"] == 6
    assert 0.0 <= results["test_accuracy"] <= 1.0 and results["best_step"] in (3, 6)
    assert (results["taylorshift_extension"] is None) == (attention == "softmax")
    assert {path.name for path in out.iterdir()} >= {
        "best.pt",
        "last.pt",
        "metrics.csv",
        "config.json",
    }
    assert not list(out.glob(".*.tmp")), "a temporary checkpoint was left behind"
    rows = read_metrics(out)
    assert [(r["step"], r["split"]) for r in rows if r["split"] == "val"] == [
        ("3", "val"),
        ("6", "val"),
    ]
    assert all(float(r["loss"]) > 0 for r in rows)
    checkpoint = torch.load(out / "last.pt", weights_only=False)
    assert checkpoint["progress"]["step"] == 6 and checkpoint["world_size"] == 1


def test_resume_equals_uninterrupted_training(all_tasks_root, tiny_configs, tmp_path):
    # 24 training items at batch 4: stopping at step 4 is mid-epoch, and step 9 is in the next one.
    common = ("--max-steps", "9", "--seed", "3")
    run_train("listops", all_tasks_root, tiny_configs["listops"], tmp_path / "straight", *common)
    run_train(
        "listops",
        all_tasks_root,
        tiny_configs["listops"],
        tmp_path / "resumed",
        *common,
        "--stop-at-step",
        "4",
    )
    assert not (tmp_path / "resumed" / "results.json").exists()
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)["progress"]["step"] == 4
    run_train(
        "listops",
        all_tasks_root,
        tiny_configs["listops"],
        tmp_path / "resumed",
        *common,
        "--resume",
    )

    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert straight["scheduler"] == resumed["scheduler"]
    assert torch.equal(straight["rng"][0]["torch"], resumed["rng"][0]["torch"])

    def without_time(rows):
        return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]

    assert without_time(read_metrics(tmp_path / "straight")) == without_time(
        read_metrics(tmp_path / "resumed")
    )
    first, second = (
        json.loads((tmp_path / d / "results.json").read_text()) for d in ("straight", "resumed")
    )
    assert (
        first["test_accuracy"] == second["test_accuracy"]
        and first["best_step"] == second["best_step"]
    )


def test_resume_without_checkpoint_fails(all_tasks_root, tiny_configs, tmp_path):
    with pytest.raises(FileNotFoundError, match="last.pt"):
        run_train("listops", all_tasks_root, tiny_configs["listops"], tmp_path, "--resume")


def test_summary_table_per_task_and_attention(tmp_path, capsys):
    for folder, task, attention, accuracy in [
        ("a", "listops", "taylorshift", 0.4),
        ("b", "listops", "taylorshift", 0.2),
        ("c", "text", "softmax", 0.655),
    ]:
        (tmp_path / folder).mkdir()
        mode = "auto" if attention == "taylorshift" else None
        result = {"task": task, "attention": attention, "mode": mode, "test_accuracy": accuracy,
                  "best_val_accuracy": accuracy, "seed": 0, "steps": 1, "parameters": 10,
                  "train_seconds": 1.0}  # fmt: skip
        (tmp_path / folder / "results.json").write_text(json.dumps(result))
    summary.main([str(tmp_path), "--out", str(tmp_path / "table.md")])
    table = (tmp_path / "table.md").read_text()
    assert "| attention | listops | text | retrieval | image | pathfinder |" in table
    assert "| softmax | — | 65.50 | — | — | — |" in table
    assert "| taylorshift (auto) | 30.00 ± 14.14 (n=2) | — |" in table


def test_main_job_end_to_end_at_toy_size(tmp_path, capsys):
    main_job.main(
        ["--out", str(tmp_path), "--num-train", "40", "--num-eval", "10", "--max-steps", "3"]
    )
    printed = capsys.readouterr().out
    assert "SMOKE-SIZE RUN" in printed
    assert "| taylorshift (auto) |" in printed and "| softmax |" in printed
    assert (tmp_path / "summary.md").read_text().startswith("SMOKE-SIZE RUN")
