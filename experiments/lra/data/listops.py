"""ListOps from LRA's TSV release: listops-1000/basic_{train,val,test}.tsv."""

from pathlib import Path

from .datasets import SequenceDataset, TaskData
from .encoding import LISTOPS_TOKENS, encode_listops
from .errors import DataLayoutError

LAYOUT = (
    "  listops-1000/basic_train.tsv\n  listops-1000/basic_val.tsv\n  listops-1000/basic_test.tsv\n"
    "  (tab-separated, header 'Source<TAB>Target', Target an integer 0-9)"
)
NUM_CLASSES = 10
MAX_LEN = 2000


def read_listops_tsv(path: Path):
    """Returns (token id arrays, labels). Rows are read with \\r stripped (csv writes \\r\\n)."""
    if not path.is_file():
        raise DataLayoutError("Missing ListOps file", path, LAYOUT)
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].strip().split("\t") != ["Source", "Target"]:
        raise DataLayoutError(
            "Malformed ListOps file (no 'Source<TAB>Target' header)", path, LAYOUT
        )
    sequences, labels = [], []
    for line_number, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[1].strip().isdigit() or int(fields[1]) >= NUM_CLASSES:
            raise DataLayoutError(f"Malformed ListOps row at line {line_number}", path, LAYOUT)
        sequences.append(encode_listops(fields[0]))
        labels.append(int(fields[1]))
    return sequences, labels


def load_listops(data_root, max_len: int = MAX_LEN) -> TaskData:
    directory = Path(data_root) / "listops-1000"
    splits = {
        split: SequenceDataset(*read_listops_tsv(directory / f"basic_{split}.tsv"), max_len)
        for split in ("train", "val", "test")
    }
    return TaskData(
        "listops",
        **splits,
        vocab_size=len(LISTOPS_TOKENS),
        num_classes=NUM_CLASSES,
        max_len=max_len,
        pads=True,
    )
