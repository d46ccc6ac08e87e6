"""A position-weighted 64-bit checksum of packed chunk bytes (the same value on any device).

``sum(x) + sum(x * (i + 1))`` over the bytes viewed as int32 words (wrapping int64
arithmetic), plus the tail bytes weighted by position, mixed with the length: any single
corrupted byte changes it. :func:`checksum_async` leaves the sum on the device (no host
sync); :func:`checksum_value` finishes it.
"""

from __future__ import annotations

import torch

__all__ = ["checksum", "checksum_async", "checksum_value"]


def checksum(buf: torch.Tensor) -> int:
    """Checksum of a 1-D uint8 tensor."""
    return checksum_value(*checksum_async(buf))


def checksum_value(total: torch.Tensor, n: int) -> int:
    """The checksum from :func:`checksum_async`'s ``(device scalar, nbytes)`` (syncs)."""
    return (int(total.item()) ^ (n * 0x9E3779B97F4A7C15)) & 0xFFFFFFFFFFFFFFFF


def checksum_async(buf: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The device-side part of :func:`checksum`: ``(int64 scalar, nbytes)``."""
    n = buf.numel()
    words = n // 4
    total = torch.zeros((), dtype=torch.int64, device=buf.device)
    if words:
        x = buf[: words * 4].view(torch.int32).to(torch.int64)
        idx = torch.arange(1, words + 1, dtype=torch.int64, device=buf.device)
        total = total + x.sum() + (x * idx).sum()
    if n % 4:
        tail = buf[words * 4 :].to(torch.int64)
        total = total + (tail * torch.arange(7, 7 + tail.numel(), device=buf.device)).sum()
    return total, n
