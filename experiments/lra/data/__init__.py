"""Loaders for the five LRA tasks; each returns a TaskData with token ids padded with 0."""

from .datasets import TaskData
from .errors import DataLayoutError
from .image import load_image
from .listops import load_listops
from .pathfinder import load_pathfinder
from .retrieval import load_retrieval
from .text import load_text

LOADERS = {
    "listops": load_listops,
    "text": load_text,
    "retrieval": load_retrieval,
    "image": load_image,
    "pathfinder": load_pathfinder,
}
TASKS = tuple(LOADERS)


def load_task(task: str, data_root, **options) -> TaskData:
    """Loads one task; options are the loader's keyword arguments (e.g. max_len, difficulty)."""
    if task not in LOADERS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return LOADERS[task](data_root, **options)


__all__ = ["TASKS", "DataLayoutError", "TaskData", "load_task"]
