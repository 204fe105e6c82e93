"""Atomic checkpoint files and the RNG state that makes a resumed run continue exactly."""

import os
import random
from pathlib import Path

import numpy as np
import torch


def capture_rng() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(payload: dict, path: Path) -> None:
    """Writes a temporary file in the same directory, then renames: no reader sees half a file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: Path, device: torch.device) -> dict:
    # Our own files, holding Python and NumPy RNG states, which weights_only loading rejects.
    return torch.load(path, map_location=device, weights_only=False)
