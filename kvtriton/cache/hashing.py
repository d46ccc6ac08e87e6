"""Stable block hashes: a SHA-256 chain over the token ids of full blocks.

The hash of logical block ``b`` (positions ``[b*B, (b+1)*B)``) is::

    h[-1] = SHA-256(b"kvtriton/block-hash/v1\\0" + encode_key(extra_key))
    h[b]  = SHA-256(h[b-1] + u64le(tokens[b*B]) + ... + u64le(tokens[(b+1)*B - 1]))

so a block's hash names the whole prefix ``[0, (b+1)*B)`` and the request's extra key (a LoRA
name, a multimodal salt ...), which enters once, through the root. Token ids are encoded as
unsigned 64-bit little-endian integers and the digest is the full 32-byte SHA-256, so the value
is identical across processes, machines and Python versions (unlike ``hash()``). Two block
sizes never share a chain (the byte length of every step differs).

Pure Python (no torch).
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence

__all__ = [
    "HASH_VERSION",
    "BlockHash",
    "ExtraKey",
    "chain_hashes",
    "encode_extra_key",
    "encode_tokens",
    "root_hash",
    "token_array",
]

#: Domain separator of the chain; bump it if the encoding ever changes.
HASH_VERSION = b"kvtriton/block-hash/v1\x00"

BlockHash = bytes
ExtraKey = bytes | str | None

_sha256 = hashlib.sha256
_TOKEN_BYTES = 8


def encode_extra_key(extra_key: ExtraKey) -> bytes:
    """Canonical bytes of an extra key: a tag byte (none / bytes / utf-8 str), length, payload."""
    if extra_key is None:
        return b"\x00"
    if isinstance(extra_key, str):
        payload, tag = extra_key.encode("utf-8"), b"\x02"
    elif isinstance(extra_key, (bytes, bytearray, memoryview)):
        payload, tag = bytes(extra_key), b"\x01"
    else:
        raise TypeError(
            f"extra_key must be bytes, str or None, got {type(extra_key).__name__} {extra_key!r}"
        )
    return tag + len(payload).to_bytes(8, "little") + payload


def root_hash(extra_key: ExtraKey = None) -> BlockHash:
    """The chain's parent of block 0 for a request with ``extra_key``."""
    return _sha256(HASH_VERSION + encode_extra_key(extra_key)).digest()


def encode_tokens(tokens: Sequence[int], *, what: str = "tokens") -> bytes:
    """Token ids as consecutive unsigned 64-bit little-endian integers.

    Raises ``TypeError`` for a non-integer id and ``ValueError`` for a negative (or >= 2**64)
    one, naming ``what``.
    """
    return token_array(tokens, what=what).tobytes()


def token_array(tokens: Sequence[int], *, what: str = "tokens") -> array:
    """The bytes of :func:`encode_tokens` held in an ``array("Q")`` (no copy to ``bytes``).

    On a big-endian host the array's items are byte-swapped: use it as a buffer (hashing,
    equality), not for its values.
    """
    if isinstance(tokens, (bytes, bytearray, str)):
        raise TypeError(f"{what} must be a sequence of int token ids, got {type(tokens).__name__}")
    try:
        packed = array("Q", tokens)
    except OverflowError:
        bad = next((t for t in tokens if not 0 <= int(t) < 2**64), None)
        raise ValueError(f"{what}: token ids must be in [0, 2**64), got {bad!r}") from None
    except TypeError:
        bad = next((t for t in tokens if not isinstance(t, int)), None)
        if bad is None:  # e.g. a torch tensor or numpy array: go through Python ints
            return token_array([int(t) for t in tokens], what=what)
        raise TypeError(
            f"{what}: token ids must be ints, got {type(bad).__name__} {bad!r}"
        ) from None
    if sys.byteorder != "little":
        packed.byteswap()
    return packed


def chain_hashes(
    token_bytes: bytes | bytearray | array | memoryview,
    tokens_per_block: int,
    parent: BlockHash,
    *,
    start_block: int = 0,
    end_block: int | None = None,
) -> list[BlockHash]:
    """Hashes of full blocks ``[start_block, end_block)`` of the encoded tokens.

    ``token_bytes`` is the output of :func:`encode_tokens` (or :func:`token_array`);
    ``parent`` is the hash of block ``start_block - 1`` (:func:`root_hash` for block 0);
    ``end_block`` defaults to the number of full blocks in ``token_bytes``.
    """
    view = memoryview(token_bytes).cast("B")
    step = tokens_per_block * _TOKEN_BYTES
    full = len(view) // step
    end = full if end_block is None else end_block
    if not 0 <= start_block <= end <= full:
        raise ValueError(
            f"block range [{start_block}, {end}) is outside the {full} full blocks of "
            f"{len(view) // _TOKEN_BYTES} tokens"
        )
    out: list[BlockHash] = []
    append = out.append
    sha = _sha256
    data = view[start_block * step : end * step]
    for offset in range(0, len(data), step):
        parent = sha(parent + data[offset : offset + step]).digest()
        append(parent)
    return out
