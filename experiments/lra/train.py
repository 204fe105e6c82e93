"""Train one LRA task with TaylorShift or softmax attention.

    python -m experiments.lra.train --task listops --data-root data --attention taylorshift
    python -m experiments.lra.train --task image --preset lra --data-root data
    torchrun --nproc_per_node 8 -m experiments.lra.train --task text --data-root data ...

--preset: project (this project's setting, the default), lra (LRA's published configuration) or
paper (the TaylorShift paper's released code); see experiments/README.md.

Writes to --out: config.json (the fully resolved configuration), metrics.csv (and tensorboard/
when installed), last.pt and best.pt (written atomically), and results.json with the test accuracy
of the best-validation checkpoint.
"""

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from .data import TASKS, load_task
from .models import build_model
from .models.encoder import ATTENTION_KINDS, TAYLORSHIFT_MODES
from .training.config import PRESETS, load_config, resolve, with_overrides
from .training.distributed import setup_process, teardown_process
from .training.loop import Trainer
from .training.precision import PRECISIONS


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument(
        "--data-root", required=True, help="directory laid out like the public releases"
    )
    parser.add_argument("--attention", default="taylorshift", choices=ATTENTION_KINDS)
    parser.add_argument(
        "--mode", default="auto", choices=TAYLORSHIFT_MODES, help="TaylorShift algorithm"
    )
    parser.add_argument(
        "--order", type=int, help="TaylorShift's Taylor order (default: the config's, else 2)"
    )
    parser.add_argument(
        "--preset", default="project", choices=PRESETS, help="which published setup to follow"
    )
    parser.add_argument("--config", help="JSON config (default: the preset's file for the task)")
    parser.add_argument("--out", help="output directory (default: runs/<task>-<attention>)")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--batch-size", type=int, help="per process")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--log-every", type=int, default=50, help="steps between train-metric rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    parser.add_argument(
        "--precision", default="auto", choices=PRECISIONS, help="GPU only; CPU runs fp32"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument(
        "--threads", type=int, help="CPU threads for torch (default: torch's choice)"
    )
    parser.add_argument("--max-train-samples", type=int, help="use only the first N training items")
    parser.add_argument(
        "--max-eval-samples", type=int, help="use only the first N val and test items"
    )
    parser.add_argument(
        "--stop-at-step", type=int, help="save and stop at this step, as an interruption would"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bar")
    return parser.parse_args(argv)


def seed_everything(seed: int) -> None:
    # The model is built under the same seed on every rank; dropout then differs per rank.
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _first(dataset, count):
    if count is None or count >= len(dataset):
        return dataset
    return torch.utils.data.Subset(dataset, range(count))


def _taylorshift_extension() -> bool:
    import taylorshift

    return bool(taylorshift.extension_available)


def run(args) -> dict | None:
    """Trains and tests; the results on rank 0, None on other ranks or when stopped early."""
    config = load_config(args.task, args.config, args.preset)
    config = with_overrides(
        config, "model", attention=args.attention, mode=args.mode, order=args.order
    )
    config = with_overrides(
        config,
        "train",
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_every=args.eval_every,
    )
    config = resolve(config)
    if args.threads:
        torch.set_num_threads(args.threads)
    context = setup_process(args.device)
    out_dir = Path(args.out or f"runs/{args.task}-{args.attention}")
    seed_everything(args.seed)

    data_options = dict(config["data"])
    if data_options.get("variant") == "paper":
        # The paper's ListOps generator makes whole batches, one tree length each.
        data_options["batch_size"] = config["train"]["batch_size"]
    data = load_task(args.task, args.data_root, **data_options)
    data.train = _first(data.train, args.max_train_samples)
    data.val, data.test = (
        _first(data.val, args.max_eval_samples),
        _first(data.test, args.max_eval_samples),
    )
    model = build_model(
        config["model"], data.vocab_size, data.max_len, data.num_classes, data.pads, data.pair
    )
    options = {
        "seed": args.seed,
        "precision": args.precision,
        "num_workers": args.num_workers,
        "log_every": args.log_every,
        "stop_at_step": args.stop_at_step,
        "progress_bar": not args.no_progress,
    }
    trainer = Trainer(model, data, config["train"], context, out_dir, options)
    if context.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if args.resume and not trainer.last_path.is_file():
        raise FileNotFoundError(f"--resume given but {trainer.last_path} does not exist")
    started = time.perf_counter()
    finished = trainer.fit(resume=args.resume)
    if not finished:
        return None
    results = trainer.test()
    results.update(
        task=args.task,
        attention=args.attention,
        mode=args.mode if args.attention == "taylorshift" else None,
        order=config["model"]["order"] if args.attention == "taylorshift" else None,
        # The pure-PyTorch fallback is much slower: timings mean little without this fact.
        taylorshift_extension=_taylorshift_extension() if args.attention == "taylorshift" else None,
        preset=config["preset"],
        config=config["source"],
        seed=args.seed,
        steps=trainer.progress.step,
        parameters=sum(parameter.numel() for parameter in model.parameters()),
        train_seconds=trainer.progress.elapsed_s,
        wall_seconds_this_process=time.perf_counter() - started,
        device=str(context.device),
        world_size=context.world_size,
        precision=trainer.precision.name,
        data_root=str(args.data_root),
        train_items=len(data.train),
        test_items=len(data.test),
    )
    if not context.is_main:
        return None
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        results = run(args)
    finally:
        teardown_process()
    if results:
        print(
            f"{results['task']} {results['attention']}: "
            f"test accuracy {results['test_accuracy']:.4f} "
            f"(best val {results['best_val_accuracy']:.4f} at step {results['best_step']})"
        )


if __name__ == "__main__":
    main()
