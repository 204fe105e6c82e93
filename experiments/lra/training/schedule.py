"""Optimisers (AdamW, LAMB) with their weight-decay split, and the learning-rate schedules."""

import math

import torch

OPTIMIZERS = ("adamw", "lamb")
SCHEDULES = ("warmup_cosine", "lra_rsqrt", "lra_cosine")


def make_optimizer(model: torch.nn.Module, config: dict) -> torch.optim.Optimizer:
    """config: the resolved train config (optimizer, lr, betas, eps, weight_decay,
    weight_decay_on)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        # Biases, norms, temperatures, layer scales and the CLS token are left alone.
        is_matrix = parameter.ndim >= 2 and "cls_token" not in name
        (decay if is_matrix or config["weight_decay_on"] == "all" else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": config["weight_decay"]},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    options = {"lr": config["lr"], "betas": tuple(config["betas"]), "eps": config["eps"]}
    if config["optimizer"] == "adamw":
        # LRA's Flax Adam with weight_decay is decoupled decay scaled by the learning rate:
        # exactly AdamW.
        return torch.optim.AdamW(groups, **options)
    if config["optimizer"] == "lamb":
        # The paper trains with apex's FusedLAMB (timm "fusedlamb"), which needs a CUDA build
        # of apex. torch-optimizer's Lamb is the same layer-wise trust-ratio update; debias=True
        # gives FusedLAMB's Adam bias correction. FusedLAMB also clips the global gradient norm
        # to 1, which the paper's max_grad_norm = 1 (grad_clip) does here.
        import torch_optimizer

        return torch_optimizer.Lamb(groups, debias=True, **options)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {config['optimizer']!r}")


def learning_rate_factor(config: dict):
    """step -> lr / config['lr'], where step counts the updates already made."""
    warmup, max_steps, schedule = config["warmup_steps"], config["max_steps"], config["schedule"]
    if schedule == "warmup_cosine":
        floor = config["min_lr"] / config["lr"]

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    elif schedule == "lra_rsqrt":
        # LRA's train_utils: min(1, step / warmup) / sqrt(max(step, warmup)); the first update
        # (step 0) has rate 0, as there.
        def factor(step: int) -> float:
            return min(1.0, step / warmup) / math.sqrt(max(step, warmup))

    elif schedule == "lra_cosine":
        cycle = config["steps_per_cycle"] or max_steps

        def factor(step: int) -> float:
            progress = max(0.0, (step - warmup) / cycle)
            return min(1.0, step / warmup) * max(
                0.0, 0.5 * (1.0 + math.cos(math.pi * (progress % 1.0)))
            )

    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return factor


def make_scheduler(optimizer, config: dict):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor(config))
