"""Stable block hashes: a hash chain over the token ids of full blocks.

The hash of logical block ``b`` (positions ``[b*B, (b+1)*B)``) is::

    h[-1] = H(b"kvtriton/block-hash/v1\\0" + encode_key(extra_key))
    h[b]  = H(h[b-1] + u64le(tokens[b*B]) + ... + u64le(tokens[(b+1)*B - 1]))

so a block's hash names the whole prefix ``[0, (b+1)*B)`` and the request's extra key (a LoRA
name, a multimodal salt ...), which enters once, through the root. Token ids are encoded as
unsigned 64-bit little-endian integers and the digest is the hash's full output, so the value
is identical across processes, machines and Python versions (unlike ``hash()``). Two block
sizes never share a chain (the byte length of every step differs).

``H`` is chosen by name (:data:`HASH_NAMES`): ``"sha256"`` (the default; 32-byte digests) or
``"xxh3_128"`` (the ``xxhash`` package; 16-byte digests, several times faster on long prompts,
not cryptographic: a client able to choose token ids could construct a collision). Their
roots differ (the name enters the root of every chain but SHA-256's, which keeps the v1
values) and so do their digest sizes, so chains of two hashes never meet.

Pure Python (no torch).
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Callable, Sequence
from typing import Literal

__all__ = [
    "DEFAULT_HASH",
    "HASH_NAMES",
    "HASH_VERSION",
    "BlockHash",
    "ExtraKey",
    "HashName",
    "available_hash_names",
    "chain_hashes",
    "check_hash_name",
    "encode_extra_key",
    "encode_tokens",
    "root_hash",
    "token_array",
]

#: Domain separator of the chain; bump it if the encoding ever changes.
HASH_VERSION = b"kvtriton/block-hash/v1\x00"

BlockHash = bytes
ExtraKey = bytes | str | None

HashName = Literal["sha256", "xxh3_128"]
#: The block hashes a cache manager can use.
HASH_NAMES: tuple[str, ...] = ("sha256", "xxh3_128")
DEFAULT_HASH: HashName = "sha256"

_TOKEN_BYTES = 8


def _sha256_digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def check_hash_name(name: object) -> HashName:
    """``name`` if it is one of :data:`HASH_NAMES`; ``ValueError`` (or ``ImportError`` when
    ``xxhash`` is missing) otherwise."""
    if name not in HASH_NAMES:
        raise ValueError(f"hash_name must be one of {HASH_NAMES}, got {name!r}")
    _digest(name)  # type: ignore[arg-type]
    return name  # type: ignore[return-value]


def available_hash_names() -> tuple[HashName, ...]:
    """The :data:`HASH_NAMES` usable here (``xxh3_128`` needs the ``xxhash`` package)."""
    names: list[HashName] = []
    for name in HASH_NAMES:
        try:
            names.append(check_hash_name(name))
        except ImportError:
            pass
    return tuple(names)


def _digest(name: HashName) -> Callable[[bytes], bytes]:
    """The one-shot digest function of hash ``name``."""
    if name == "sha256":
        return _sha256_digest
    try:
        import xxhash
    except ImportError:  # a dependency of kvtriton, but keep the message useful
        raise ImportError(
            "hash_name='xxh3_128' needs the xxhash package: pip install xxhash"
        ) from None
    return xxhash.xxh3_128_digest


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


def root_hash(extra_key: ExtraKey = None, *, hash_name: HashName = DEFAULT_HASH) -> BlockHash:
    """The chain's parent of block 0 for a request with ``extra_key``."""
    domain = (
        HASH_VERSION if hash_name == DEFAULT_HASH else HASH_VERSION + hash_name.encode() + b"\0"
    )
    return _digest(hash_name)(domain + encode_extra_key(extra_key))


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
    hash_name: HashName = DEFAULT_HASH,
) -> list[BlockHash]:
    """Hashes of full blocks ``[start_block, end_block)`` of the encoded tokens.

    ``token_bytes`` is the output of :func:`encode_tokens` (or :func:`token_array`);
    ``parent`` is the hash of block ``start_block - 1`` (:func:`root_hash` of the same
    ``hash_name`` for block 0); ``end_block`` defaults to the number of full blocks in
    ``token_bytes``.
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
    data = view[start_block * step : end * step]
    if hash_name == "sha256":  # two C calls per block: no Python wrapper in the loop
        sha = hashlib.sha256
        for offset in range(0, len(data), step):
            parent = sha(parent + data[offset : offset + step]).digest()
            append(parent)
        return out
    digest = _digest(hash_name)
    for offset in range(0, len(data), step):
        parent = digest(parent + data[offset : offset + step])
        append(parent)
    return out
