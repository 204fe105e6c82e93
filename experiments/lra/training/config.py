"""Per-task JSON configs (experiments/lra/configs/<task>.json) and command-line overrides."""

import copy
import json
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def load_config(task: str, path=None) -> dict:
    path = Path(path) if path else CONFIG_DIR / f"{task}.json"
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    config = json.loads(path.read_text())
    missing = {"task", "data", "model", "train"} - set(config)
    if missing:
        raise ValueError(f"config {path} lacks sections {sorted(missing)}")
    if config["task"] != task:
        raise ValueError(f"config {path} is for task {config['task']!r}, not {task!r}")
    config["source"] = str(path)
    return config


def with_overrides(config: dict, section: str, **values) -> dict:
    """A copy of config with the given non-None values set in one section."""
    config = copy.deepcopy(config)
    config[section].update({key: value for key, value in values.items() if value is not None})
    return config
