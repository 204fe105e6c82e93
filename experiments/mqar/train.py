"""Train the small causal model on multi-query associative recall (MQAR) with one attention.

    python -m experiments.mqar.train --attention taylorshift --seq-len 128 --num-pairs 16 \
        --dim 64 --out runs/mqar/taylorshift-128-64-s0

Every training batch is fresh data, generated from (seed, step): a resumed run sees exactly the
batches the uninterrupted one would. Validation (every --eval-every steps, logged) and test (once,
at the end, on the last model) use held-out examples from seeds no training step uses.

Writes to --out: config.json (every setting), metrics.csv (train rows every --log-every steps,
val rows at each evaluation), last.pt (written atomically; --resume continues from it), and
results.json with the test accuracy: the fraction of query positions whose argmax is the value
paired with the queried key.
"""

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from experiments.lra.training.checkpoint import (
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_atomic,
)
from experiments.lra.training.metrics import MetricsLog
from experiments.lra.training.schedule import make_optimizer, make_scheduler

from .data import IGNORE_INDEX, MQARDataset, check_sizes, generate_mqar
from .model import ATTENTIONS, CausalLM

MODES = ("auto", "direct", "efficient")
# Held-out sets come from seed streams that training never draws: training step s of run seed r
# uses generator seed (r << 32) + s with s < 2^31.
VAL_STREAM, TEST_STREAM = 1 << 31, (1 << 31) + 1


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--attention", default="taylorshift", choices=ATTENTIONS)
    parser.add_argument("--mode", default="auto", choices=MODES, help="TaylorShift algorithm")
    parser.add_argument("--out", required=True, help="output directory")
    data = parser.add_argument_group("data")
    data.add_argument("--vocab-size", type=int, default=256)
    data.add_argument("--seq-len", type=int, default=64)
    data.add_argument("--num-pairs", type=int, default=8)
    data.add_argument("--num-val", type=int, default=128, help="held-out validation examples")
    data.add_argument("--num-test", type=int, default=500, help="held-out test examples")
    model = parser.add_argument_group("model")
    model.add_argument("--dim", type=int, default=64)
    model.add_argument("--depth", type=int, default=2)
    model.add_argument("--heads", type=int, default=2)
    model.add_argument(
        "--mlp-ratio", type=int, default=0, help="MLP width / model width; 0: no MLP"
    )
    model.add_argument(
        "--short-conv", type=int, default=0, help="kernel of a causal short convolution per block"
    )
    training = parser.add_argument_group("training")
    training.add_argument("--max-steps", type=int, default=1500)
    training.add_argument("--batch-size", type=int, default=32)
    training.add_argument("--eval-batch-size", type=int, default=32)
    training.add_argument("--lr", type=float, default=3e-3)
    training.add_argument("--warmup-steps", type=int, default=50)
    training.add_argument("--weight-decay", type=float, default=0.1)
    training.add_argument("--eval-every", type=int, default=300)
    training.add_argument("--log-every", type=int, default=50, help="steps between train rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    parser.add_argument(
        "--threads", type=int, help="CPU threads for torch (default: torch's choice)"
    )
    parser.add_argument(
        "--stop-at-step", type=int, help="save and stop at this step, as an interruption would"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bar")
    return parser.parse_args(argv)


def train_config(args) -> dict:
    """The keys experiments.lra.training.schedule reads: AdamW, linear warmup, cosine to 0."""
    return {
        "optimizer": "adamw",
        "lr": args.lr,
        "betas": [0.9, 0.98],
        "eps": 1e-8,
        "weight_decay": args.weight_decay,
        "weight_decay_on": "matrices",
        "schedule": "warmup_cosine",
        "min_lr": 0.0,
        "warmup_steps": args.warmup_steps,
        "max_steps": args.max_steps,
    }


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    step: int = 0
    # Train loss and accuracy summed since the last log row: a resumed run logs the same numbers.
    window_loss: float = 0.0
    window_correct: int = 0
    window_count: int = 0
    elapsed_s: float = 0.0


def recall_sums(logits, targets) -> tuple[torch.Tensor, int, int]:
    """(summed loss, correct, count) over the query positions (targets != IGNORE_INDEX)."""
    loss = F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    queried = targets != IGNORE_INDEX
    correct = int((logits.argmax(dim=-1)[queried] == targets[queried]).sum())
    return loss, correct, int(queried.sum())


@torch.no_grad()
def evaluate(model, dataset: MQARDataset, batch_size: int) -> tuple[float, float]:
    """(mean loss, accuracy) over every query position of the dataset."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for start in range(0, len(dataset), batch_size):
        inputs = dataset.inputs[start : start + batch_size]
        targets = dataset.targets[start : start + batch_size]
        loss, batch_correct, batch_count = recall_sums(model(inputs), targets)
        loss_sum, correct, count = (
            loss_sum + loss.item(),
            correct + batch_correct,
            count + batch_count,
        )
    model.train()
    return loss_sum / count, correct / count


def training_batch(args, step: int):
    generator = torch.Generator().manual_seed((args.seed << 32) + step)
    return generate_mqar(args.batch_size, args.vocab_size, args.seq_len, args.num_pairs, generator)


def held_out(args, stream: int, count: int) -> MQARDataset:
    return MQARDataset(
        count, args.vocab_size, args.seq_len, args.num_pairs, seed=(args.seed << 32) + stream
    )


def _taylorshift_extension() -> bool:
    import taylorshift

    return bool(taylorshift.extension_available)


def run(args) -> dict | None:
    """Trains and tests; the results, or None when stopped early by --stop-at-step."""
    check_sizes(args.vocab_size, args.seq_len, args.num_pairs)
    if not 0 <= args.seed < 1 << 31:
        raise ValueError(f"--seed must be in [0, 2^31), got {args.seed}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    last_path = out_dir / "last.pt"
    if args.resume and not last_path.is_file():
        raise FileNotFoundError(f"--resume given but {last_path} does not exist")
    torch.manual_seed(args.seed)
    model = CausalLM(
        args.vocab_size, args.seq_len, args.dim, args.attention,
        depth=args.depth, heads=args.heads, mode=args.mode, mlp_ratio=args.mlp_ratio,
        short_conv=args.short_conv,
    )  # fmt: skip
    config = train_config(args)
    optimizer, progress = make_optimizer(model, config), Progress()
    scheduler = make_scheduler(optimizer, config)
    val_set = held_out(args, VAL_STREAM, args.num_val)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(vars(args), indent=2))

    if args.resume:
        checkpoint = load_checkpoint(last_path, torch.device("cpu"))
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        progress = Progress(**checkpoint["progress"])
        restore_rng(checkpoint["rng"])

    def save_last():
        save_atomic(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "progress": asdict(progress),
                "rng": capture_rng(),
            },
            last_path,
        )

    log = MetricsLog(out_dir, progress.step if args.resume else None)
    bar = tqdm(
        total=args.max_steps,
        initial=progress.step,
        desc=f"mqar {args.attention} L={args.seq_len} d={args.dim} seed {args.seed}",
        disable=args.no_progress,
        dynamic_ncols=True,
    )
    started = time.perf_counter() - progress.elapsed_s
    model.train()
    try:
        while progress.step < args.max_steps:
            inputs, targets = training_batch(args, progress.step)
            loss_sum, correct, count = recall_sums(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            (loss_sum / count).backward()
            optimizer.step()
            scheduler.step()
            progress.step += 1
            progress.window_loss += loss_sum.item()
            progress.window_correct += correct
            progress.window_count += count
            progress.elapsed_s = time.perf_counter() - started
            bar.update(1)
            step = progress.step
            if step % args.log_every == 0 or step == args.max_steps:
                log.log(
                    step, "train",
                    loss=progress.window_loss / progress.window_count,
                    accuracy=progress.window_correct / progress.window_count,
                    lr=scheduler.get_last_lr()[0], elapsed_s=progress.elapsed_s,
                )  # fmt: skip
                progress.window_loss, progress.window_correct, progress.window_count = 0.0, 0, 0
            if step % args.eval_every == 0 or step == args.max_steps:
                val_loss, val_accuracy = evaluate(model, val_set, args.eval_batch_size)
                log.log(
                    step, "val", loss=val_loss, accuracy=val_accuracy,
                    elapsed_s=progress.elapsed_s,
                )  # fmt: skip
                bar.set_postfix(val_acc=f"{val_accuracy:.3f}")
            if step % args.eval_every == 0 or step == args.max_steps or step == args.stop_at_step:
                save_last()
            if step == args.stop_at_step:
                return None
    finally:
        bar.close()
        log.close()

    test_loss, test_accuracy = evaluate(
        model, held_out(args, TEST_STREAM, args.num_test), args.eval_batch_size
    )
    taylorshift = args.attention != "softmax"
    results = {
        "attention": args.attention,
        "mode": args.mode if taylorshift else None,
        "order": model.blocks[0].attention.order,
        # The pure-PyTorch fallback is much slower: timings mean little without this fact.
        "taylorshift_extension": _taylorshift_extension() if taylorshift else None,
        "seq_len": args.seq_len,
        "num_pairs": args.num_pairs,
        "vocab_size": args.vocab_size,
        "dim": args.dim,
        "depth": args.depth,
        "heads": args.heads,
        "mlp_ratio": args.mlp_ratio,
        "short_conv": args.short_conv,
        "seed": args.seed,
        "steps": progress.step,
        "batch_size": args.batch_size,
        "test_accuracy": test_accuracy,
        "test_loss": test_loss,
        "test_queries": args.num_test * args.num_pairs,
        # Per layer and head: how sharp the polynomial weights became (cosine logits lie in
        # [-tau, tau]).
        "temperatures": [
            block.attention.temperature.tolist() for block in model.blocks if taylorshift
        ],
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "train_seconds": progress.elapsed_s,
        "threads": torch.get_num_threads(),
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def main(argv=None) -> None:
    results = run(parse_args(argv))
    if results:
        print(
            f"mqar {results['attention']} L={results['seq_len']} d={results['dim']} "
            f"seed {results['seed']}: test accuracy {results['test_accuracy']:.4f} "
            f"({results['train_seconds']:.0f} s)"
        )


if __name__ == "__main__":
    main()
