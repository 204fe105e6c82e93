"""Token encodings shared by the loaders and generators (LRA conventions, padding id 0)."""

import numpy as np
import torch

PAD_ID = 0

# ListOps: a fixed vocabulary (rather than one built from data) keeps released and generated
# files id-compatible. [FIRST and [LAST are defined by LRA's generator but unused; they keep ids.
LISTOPS_TOKENS = (
    ["<pad>", "<unk>"]
    + [str(digit) for digit in range(10)]
    + ["[MIN", "[MAX", "[MED", "[SM", "[FIRST", "[LAST", "]"]
)
LISTOPS_IDS = {token: index for index, token in enumerate(LISTOPS_TOKENS)}
LISTOPS_UNK_ID = LISTOPS_IDS["<unk>"]

# Byte-level text (LRA's ByteTextEncoder): id = byte + 1, so id 0 stays free for padding.
BYTE_VOCAB_SIZE = 257
# Pixels (Image, Pathfinder): the 8-bit value is the token; these tasks never pad.
PIXEL_VOCAB_SIZE = 256


def listops_tokens(source: str) -> list[str]:
    """Split an LRA ListOps source string; the parentheses are serialisation noise."""
    return source.replace("(", " ").replace(")", " ").split()


def encode_listops(source: str) -> np.ndarray:
    ids = [LISTOPS_IDS.get(token, LISTOPS_UNK_ID) for token in listops_tokens(source)]
    return np.asarray(ids, dtype=np.uint8)


def encode_bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).astype(np.int16) + 1


def pad_to(ids: np.ndarray, max_len: int) -> torch.Tensor:
    """Truncate to max_len and right-pad with PAD_ID, as LRA does."""
    out = torch.full((max_len,), PAD_ID, dtype=torch.long)
    ids = ids[:max_len]
    out[: len(ids)] = torch.from_numpy(ids.astype(np.int64))
    return out
