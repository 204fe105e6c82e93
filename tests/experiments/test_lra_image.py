"""CIFAR-10 grayscale loader over fixture pickles."""

import pytest
from conftest import write_cifar

from experiments.lra.data import DataLayoutError, load_task


@pytest.mark.parametrize(("as_tar", "str_keys"), [(False, False), (True, False), (False, True)])
def test_cifar_gray_tokens_and_lra_split(tmp_path, as_tar, str_keys):
    write_cifar(tmp_path, as_tar=as_tar, str_keys=str_keys, per_batch=4)
    data = load_task("image", tmp_path)
    # 20 training images: LRA's train[:90%] / train[90%:].
    assert (len(data.train), len(data.val), len(data.test)) == (18, 2, 4)
    assert not data.pads and data.vocab_size == 256 and data.max_len == 1024
    tokens, label = data.train[0]
    # Pure red 10 -> round(0.2989 * 10) = 3; mid grey 128 stays 128.
    assert tokens.shape == (1024,) and set(tokens.tolist()) == {3} and int(label) == 1
    assert set(data.train[1][0].tolist()) == {128}
    assert set(data.test[0][0].tolist()) == {round(0.2989 * 255)}
    assert [int(item[1]) for item in data.test] == [0, 1, 2, 3]


def test_cifar_full_split_and_errors(tmp_path):
    write_cifar(tmp_path)
    data = load_task("image", tmp_path, split="full")
    assert len(data.train) == 20 and data.val is data.test
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataLayoutError, match="data_batch_3"):
        load_task("image", tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataLayoutError, match="Malformed CIFAR-10 batch"):
        load_task("image", tmp_path)
