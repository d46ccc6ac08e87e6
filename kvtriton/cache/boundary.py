"""The single-boundary search of the cache manager (DESIGN.md §1, single-boundary mode).

Given a prompt's block hashes, find the largest block count ``j`` such that one common
prefix ``c = j*B`` could be resumed by every group: full attention holds every block below
``c`` (its run from block 0 caps ``j``: ``upper``), a sliding window ``W`` holds every block
touching ``[max(0, c + 1 - W), c)``, a state group holds a snapshot at ``c``. Pure Python.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvtriton.cache.hashing import BlockHash

__all__ = ["common_boundary"]

Contains = Callable[[BlockHash], bool]


def common_boundary(
    hashes: Sequence[BlockHash],
    upper: int,
    tokens_per_block: int,
    windows: Sequence[tuple[int, Contains]],
    snapshots: Sequence[Contains],
) -> int:
    """The largest block count ``j <= upper`` valid for every window and snapshot index.

    ``windows``: ``(W, contains)`` per sliding group; ``snapshots``: ``contains`` per state
    group (``contains(hash)``: the group's index holds it). Tries ``j = upper`` directly (the
    common case), else scans ``j`` downwards over presence lists at C speed: a sliding group
    missing block ``b`` of ``[lo(j), j)`` rules out every ``j'`` in ``(p + 1, j]`` where ``p``
    is its highest cached block below ``b`` (``lo`` never decreases with ``j``, and a window
    of ``W >= 2`` always holds block ``j' - 1``), so the scan jumps to ``p + 1``; a state group
    jumps to its next snapshot.
    """
    if upper == 0:
        return 0
    bsz = tokens_per_block
    if not windows and not snapshots:
        return upper
    last = hashes[upper - 1]
    if all(has(last) for has in snapshots) and all(
        all(has(hashes[b]) for b in range(max(0, upper * bsz + 1 - w) // bsz, upper))
        for w, has in windows
    ):
        return upper
    # rev[i] is about block upper - 1 - i: block b <-> position upper - 1 - b
    rev = list(hashes[:upper])
    rev.reverse()
    present = [(w, list(map(has, rev))) for w, has in windows]
    state_ok: list[bool] | None = None
    for has in snapshots:
        here = list(map(has, rev))
        state_ok = (
            here if state_ok is None else [a and b for a, b in zip(state_ok, here, strict=True)]
        )
    j = upper
    while j > 0:
        if state_ok is not None:  # the largest j' <= j with a snapshot at j'
            try:
                j = upper - state_ok.index(True, upper - j)
            except ValueError:
                return 0
        jumped = False
        for w, have in present:
            lo = max(0, j * bsz + 1 - w) // bsz
            if lo >= j:  # W = 1: the window before c is empty
                continue
            try:
                missing = upper - 1 - have.index(False, upper - j, upper - lo)
            except ValueError:
                continue
            try:  # the highest cached block below the missing one
                j = upper - have.index(True, upper - missing)
            except ValueError:
                return 0
            jumped = True
            break
        if not jumped:
            return j
    return 0
