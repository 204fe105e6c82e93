"""Per-task JSON configs in three presets, and command-line overrides.

project: experiments/lra/configs/<task>.json, this project's own setting (the default);
lra:     experiments/lra/configs/lra/<task>.json, LRA's published configuration per task;
paper:   experiments/lra/configs/paper/<task>.json, the TaylorShift paper's released code.

A loaded config is fully resolved: every training and model key has its value (the defaults
below fill what a file leaves out), so the config.json a run writes says everything it did.
"""

import copy
import json
from pathlib import Path

from ..models.encoder import resolve_model_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PRESETS = ("project", "lra", "paper")
# Tasks for which a preset has no configuration, and why (said when one is asked for).
MISSING = {
    ("paper", "retrieval"): "the TaylorShift paper's code has no Retrieval (AAN) loader or model",
    ("paper", "pathfinder"): (
        "the TaylorShift paper's code sizes Pathfinder only for its softmax baseline "
        "(transformer_lra_path: 64 wide, 4 layers, 4 heads, MLP ratio 1) and has no TaylorShift "
        "configuration for it"
    ),
}

TRAIN_DEFAULTS = {
    "optimizer": "adamw",
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    "weight_decay": 0.01,
    # matrices: decay weights of rank >= 2 except the CLS token; all: every parameter (LRA's
    # Flax Adam applies its decoupled decay to all of them).
    "weight_decay_on": "matrices",
    # warmup_cosine: linear warmup, then cosine from lr to min_lr at max_steps.
    # lra_rsqrt: LRA's "constant * linear_warmup * rsqrt_decay" with constant = lr.
    # lra_cosine: LRA's "constant * linear_warmup * cosine_decay" with steps_per_cycle.
    "schedule": "warmup_cosine",
    "min_lr": 0.0,
    "steps_per_cycle": None,
    "grad_clip": None,
    "label_smoothing": 0.0,
}
REQUIRED_TRAIN = ("batch_size", "eval_batch_size", "lr", "max_steps", "eval_every", "warmup_steps")


def config_path(task: str, preset: str) -> Path:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    if (preset, task) in MISSING:
        raise ValueError(f"no '{preset}' preset for task {task!r}: {MISSING[preset, task]}")
    return (
        CONFIG_DIR / f"{task}.json" if preset == "project" else CONFIG_DIR / preset / f"{task}.json"
    )


def load_config(task: str, path=None, preset: str = "project") -> dict:
    """The raw config of a task: from path if given, else the preset's file."""
    path = Path(path) if path else config_path(task, preset)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    config = json.loads(path.read_text())
    missing = {"task", "data", "model", "train"} - set(config)
    if missing:
        raise ValueError(f"config {path} lacks sections {sorted(missing)}")
    if config["task"] != task:
        raise ValueError(f"config {path} is for task {config['task']!r}, not {task!r}")
    config.setdefault("preset", preset)
    config["source"] = str(path)
    return config


def resolve(config: dict) -> dict:
    """config with every model and training default filled in (raises on unknown keys)."""
    config = copy.deepcopy(config)
    config["model"] = resolve_model_config(config["model"])
    missing = [key for key in REQUIRED_TRAIN if key not in config["train"]]
    if missing:
        raise ValueError(f"train config lacks {missing}")
    unknown = set(config["train"]) - set(TRAIN_DEFAULTS) - set(REQUIRED_TRAIN) - {"_about"}
    if unknown:
        raise ValueError(f"unknown train config keys {sorted(unknown)}")
    config["train"] = {**TRAIN_DEFAULTS, **config["train"]}
    return config


def with_overrides(config: dict, section: str, **values) -> dict:
    """A copy of config with the given non-None values set in one section."""
    config = copy.deepcopy(config)
    config[section].update({key: value for key, value in values.items() if value is not None})
    return config
