"""Byte-level Text (IMDb) and Retrieval (AAN) loaders."""

import pytest
import torch
from conftest import IMDB_REVIEWS, write_aan, write_imdb

from experiments.lra.data import DataLayoutError, load_task


def _byte_ids(text: str) -> list[int]:
    return [byte + 1 for byte in text.encode("utf-8")]


@pytest.mark.parametrize("as_tar", [False, True])
def test_imdb_labels_bytes_padding_and_truncation(tmp_path, as_tar):
    write_imdb(tmp_path, as_tar)
    data = load_task("text", tmp_path, max_len=50)
    assert (len(data.train), len(data.test)) == (4, 2)
    assert data.val is data.test, "LRA validates IMDb on the test split"
    assert data.vocab_size == 257 and data.num_classes == 2
    items = {(int(label), tuple(tokens.tolist())) for tokens, label in data.train}
    for (split, sentiment, _), text in IMDB_REVIEWS.items():
        if split != "train":
            continue
        ids = _byte_ids(text)[:50]
        expected = tuple(ids + [0] * (50 - len(ids)))
        assert (int(sentiment == "pos"), expected) in items
    cafe = _byte_ids("Café")
    assert len(cafe) == 5  # é is two bytes, each its own token


def test_imdb_missing_names_the_layout(tmp_path):
    with pytest.raises(DataLayoutError, match="aclImdb_v1.tar.gz"):
        load_task("text", tmp_path)
    (tmp_path / "aclImdb_v1.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(DataLayoutError, match="Unreadable IMDb archive"):
        load_task("text", tmp_path)


def test_aan_columns_quotes_and_labels(tmp_path):
    write_aan(tmp_path)
    data = load_task("retrieval", tmp_path, max_len=100)
    assert data.pair and len(data.train) == len(data.val) == len(data.test) == 4
    first, second, label = data.train[0]
    assert int(label) == 1
    assert first[: len(_byte_ids('See "quoted" text'))].tolist() == _byte_ids('See "quoted" text')
    assert second[:12].tolist() == _byte_ids("Café résumé")[:12]
    long_first, short_second, label = data.train[1]
    assert int(label) == 0 and torch.all(long_first != 0), "a 120-byte document fills max_len 100"
    assert short_second.tolist()[:6] == _byte_ids("short") + [0]
    assert [int(item[2]) for item in data.test] == [1, 0, 1, 0]


def test_aan_malformed_row_and_missing_split(tmp_path):
    write_aan(tmp_path, rows=["1\tp1\tp2\tonly four columns"])
    with pytest.raises(DataLayoutError, match="line 1"):
        load_task("retrieval", tmp_path)
    write_aan(tmp_path)
    (tmp_path / "tsv_data" / "new_aan_pairs.eval.tsv").unlink()
    with pytest.raises(DataLayoutError, match=r"Missing Retrieval file.*new_aan_pairs\.eval\.tsv"):
        load_task("retrieval", tmp_path)
