"""Optional event trace of the transfer path: ``KVTRITON_TRACE=DIR`` makes every process
append ``<monotonic seconds> <event> <request id>`` lines to ``DIR/trace.<pid>.txt`` (the
monotonic clock is shared by the processes of one host, so traces line up). Off by default:
then :func:`trace` is one branch."""

from __future__ import annotations

import os
import time
from typing import TextIO

__all__ = ["trace"]

_DIR = os.environ.get("KVTRITON_TRACE")
_FILE: TextIO | None = None


def trace(event: str, request_id: str = "") -> None:
    """Record ``event`` of ``request_id`` (when ``KVTRITON_TRACE`` is set)."""
    global _FILE
    if not _DIR:
        return
    if _FILE is None:
        os.makedirs(_DIR, exist_ok=True)
        _FILE = open(os.path.join(_DIR, f"trace.{os.getpid()}.txt"), "a", buffering=1)
    _FILE.write(f"{time.monotonic():.6f} {event} {request_id}\n")
