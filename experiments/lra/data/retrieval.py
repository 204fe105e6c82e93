"""Byte-level AAN document matching (LRA Retrieval): tsv_data/new_aan_pairs.*.tsv."""

from pathlib import Path

from .datasets import PairDataset, TaskData
from .encoding import BYTE_VOCAB_SIZE, encode_bytes
from .errors import DataLayoutError

LAYOUT = (
    "  tsv_data/new_aan_pairs.train.tsv\n"
    "  tsv_data/new_aan_pairs.eval.tsv\n"
    "  tsv_data/new_aan_pairs.test.tsv\n"
    "  (no header; five tab-separated columns: label, id1, id2, text1, text2)"
)
MAX_LEN = 4000


def read_aan_tsv(path: Path, max_len: int = MAX_LEN):
    """Returns (first documents, second documents, labels) as byte-id arrays.

    Lines are split on tabs as bytes: quotes are literal (LRA reads with use_quote_delim=False) and
    documents stay raw bytes, as LRA's byte encoder sees them. LRA cuts documents to 10000
    characters before encoding, which never bites once they are cut to max_len <= 10000 bytes.
    """
    if not path.is_file():
        raise DataLayoutError("Missing Retrieval file", path, LAYOUT)
    first, second, labels = [], [], []
    with path.open("rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.rstrip(b"\r\n")
            if not line:
                continue
            fields = line.split(b"\t")
            try:
                if len(fields) != 5:
                    raise ValueError(f"{len(fields)} columns")
                label = int(float(fields[0]))
                if label not in (0, 1):
                    raise ValueError(f"label {label}")
            except ValueError as error:
                problem = f"Malformed Retrieval row at line {line_number} ({error})"
                raise DataLayoutError(problem, path, LAYOUT) from error
            first.append(encode_bytes(fields[3][:max_len]))
            second.append(encode_bytes(fields[4][:max_len]))
            labels.append(label)
    if not labels:
        raise DataLayoutError("Empty Retrieval file", path, LAYOUT)
    return first, second, labels


def load_retrieval(data_root, max_len: int = MAX_LEN) -> TaskData:
    directory = Path(data_root) / "tsv_data"
    # The release names its validation split 'eval'.
    splits = {
        name: PairDataset(*read_aan_tsv(directory / f"new_aan_pairs.{split}.tsv", max_len), max_len)
        for name, split in (("train", "train"), ("val", "eval"), ("test", "test"))
    }
    return TaskData(
        "retrieval",
        **splits,
        vocab_size=BYTE_VOCAB_SIZE,
        num_classes=2,
        max_len=max_len,
        pads=True,
        pair=True,
    )
