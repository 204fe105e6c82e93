"""The training loop: steps, validation, best/last checkpoints, exact resume, final test."""

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .batches import evaluation_batches, make_collate, training_batches
from .checkpoint import capture_rng, load_checkpoint, restore_rng, save_atomic
from .distributed import ProcessContext, all_reduce_sum, barrier, gather_objects
from .metrics import MetricsLog
from .precision import Precision
from .schedule import make_optimizer, make_scheduler


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_val_accuracy: float = -1.0
    best_step: int = 0
    # Train loss and accuracy summed since the last log row: a resumed run logs the same numbers.
    window_loss: float = 0.0
    window_correct: int = 0
    window_count: int = 0
    elapsed_s: float = 0.0

    def reset_window(self) -> None:
        self.window_loss, self.window_correct, self.window_count = 0.0, 0, 0


@torch.no_grad()
def evaluate(
    model,
    dataset,
    batch_size,
    context: ProcessContext,
    collate,
    precision: Precision,
    num_workers=0,
):
    """Returns (mean loss, accuracy) over the whole dataset, summed across ranks."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=context.device)
    for batch in evaluation_batches(dataset, batch_size, context, collate, num_workers):
        *inputs, labels = (tensor.to(context.device) for tensor in batch)
        with precision.autocast():
            logits = model(*inputs)
        totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        totals[1] += (logits.argmax(dim=-1) == labels).sum().item()
        totals[2] += len(labels)
    all_reduce_sum(totals, context)
    model.train()
    return (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()


class Trainer:
    def __init__(
        self, model, data, train_config: dict, context: ProcessContext, out_dir: Path, options: dict
    ):
        """options: seed, precision, num_workers, log_every, stop_at_step, progress_bar."""
        self.data, self.config, self.context = data, train_config, context
        self.out_dir, self.options = Path(out_dir), options
        self.model = model.to(context.device)
        self.precision = Precision(options["precision"], context.device)
        self.ddp_model = (
            DistributedDataParallel(
                self.model, device_ids=[context.device] if context.device.type == "cuda" else None
            )
            if context.world_size > 1
            else self.model
        )
        self.optimizer = make_optimizer(self.model, train_config)
        self.scheduler = make_scheduler(self.optimizer, train_config)
        # Trailing all-padding columns may be cut only where padding is masked: unmasked, it is
        # input the model sees (the paper's setup).
        self.collate = make_collate(data.pads and model.encoder.masking != "none")
        self.progress = Progress()

    # -- checkpoints -------------------------------------------------------------------------
    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out_dir / "best.pt"

    def save_last(self) -> None:
        # Every rank's RNG goes into the file: each rank draws its own dropout masks.
        rng_states = gather_objects(capture_rng(), self.context)
        if not self.context.is_main:
            return
        payload = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler else None,
            "progress": asdict(self.progress),
            "rng": rng_states,
            "world_size": self.context.world_size,
        }
        save_atomic(payload, self.last_path)

    def resume(self) -> None:
        checkpoint = load_checkpoint(self.last_path, self.context.device)
        if checkpoint["world_size"] != self.context.world_size:
            raise ValueError(
                f"{self.last_path} was written by {checkpoint['world_size']} processes;"
                " resume with as many"
            )
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.precision.scaler and checkpoint["scaler"]:
            self.precision.scaler.load_state_dict(checkpoint["scaler"])
        self.progress = Progress(**checkpoint["progress"])
        restore_rng(checkpoint["rng"][self.context.rank])

    # -- training ----------------------------------------------------------------------------
    def train_step(self, batch) -> None:
        *inputs, labels = (tensor.to(self.context.device, non_blocking=True) for tensor in batch)
        with self.precision.autocast():
            logits = self.ddp_model(*inputs)
            loss = F.cross_entropy(
                logits.float(), labels, label_smoothing=self.config["label_smoothing"]
            )
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.precision.scaler
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(self.optimizer)
        if self.config["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config["grad_clip"])
        if scaler:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.progress.window_loss += loss.item() * len(labels)
        self.progress.window_correct += int((logits.argmax(dim=-1) == labels).sum())
        self.progress.window_count += len(labels)

    def log_train_window(self, log: MetricsLog | None) -> None:
        totals = torch.tensor(
            [self.progress.window_loss, self.progress.window_correct, self.progress.window_count],
            dtype=torch.float64,
            device=self.context.device,
        )
        all_reduce_sum(totals, self.context)
        if log and totals[2] > 0:
            lr = self.scheduler.get_last_lr()[0]
            log.log(
                self.progress.step,
                "train",
                loss=(totals[0] / totals[2]).item(),
                accuracy=(totals[1] / totals[2]).item(),
                lr=lr,
                elapsed_s=self.progress.elapsed_s,
            )
        self.progress.reset_window()

    def validate(self, log: MetricsLog | None) -> float:
        loss, accuracy = evaluate(
            self.model,
            self.data.val,
            None if self.data.prebatched else self.config["eval_batch_size"],
            self.context,
            self.collate,
            self.precision,
            self.options["num_workers"],
        )
        if log:
            log.log(
                self.progress.step,
                "val",
                loss=loss,
                accuracy=accuracy,
                elapsed_s=self.progress.elapsed_s,
            )
        if accuracy > self.progress.best_val_accuracy:
            self.progress.best_val_accuracy, self.progress.best_step = accuracy, self.progress.step
            if self.context.is_main:
                save_atomic(
                    {
                        "model": self.model.state_dict(),
                        "step": self.progress.step,
                        "val_accuracy": accuracy,
                    },
                    self.best_path,
                )
        return accuracy

    def fit(self, resume: bool = False) -> bool:
        """Trains to max_steps; returns False when stopped early by stop_at_step."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume()
        max_steps, eval_every = self.config["max_steps"], self.config["eval_every"]
        log_every, stop_at = self.options["log_every"], self.options.get("stop_at_step")
        log = (
            MetricsLog(self.out_dir, self.progress.step if resume else None)
            if self.context.is_main
            else None
        )
        bar = tqdm(
            total=max_steps,
            initial=self.progress.step,
            desc=f"{self.data.name} train",
            disable=not (self.context.is_main and self.options["progress_bar"]),
            dynamic_ncols=True,
        )
        batches = training_batches(
            self.data.train,
            None if self.data.prebatched else self.config["batch_size"],
            self.options["seed"],
            self.progress.epoch,
            self.progress.batch_in_epoch,
            self.context,
            self.collate,
            self.options["num_workers"],
        )
        self.model.train()
        started = time.perf_counter() - self.progress.elapsed_s
        try:
            while self.progress.step < max_steps:
                epoch, batch_index, batch = next(batches)
                self.train_step(batch)
                self.progress.step += 1
                self.progress.epoch, self.progress.batch_in_epoch = epoch, batch_index + 1
                self.progress.elapsed_s = time.perf_counter() - started
                bar.update(1)
                step = self.progress.step
                if step % log_every == 0 or step == max_steps:
                    self.log_train_window(log)
                if step % eval_every == 0 or step == max_steps:
                    accuracy = self.validate(log)
                    bar.set_postfix(
                        val_acc=f"{accuracy:.3f}", best=f"{self.progress.best_val_accuracy:.3f}"
                    )
                if step % eval_every == 0 or step == max_steps or step == stop_at:
                    self.save_last()
                if step == stop_at:
                    return False
            return True
        finally:
            bar.close()
            if log:
                log.close()

    def test(self) -> dict:
        """Evaluates the best checkpoint (by validation accuracy) on the test split."""
        barrier(self.context)
        best = load_checkpoint(self.best_path, self.context.device)
        self.model.load_state_dict(best["model"])
        loss, accuracy = evaluate(
            self.model,
            self.data.test,
            None if self.data.prebatched else self.config["eval_batch_size"],
            self.context,
            self.collate,
            self.precision,
            self.options["num_workers"],
        )
        return {
            "test_loss": loss,
            "test_accuracy": accuracy,
            "best_step": best["step"],
            "best_val_accuracy": best["val_accuracy"],
        }
