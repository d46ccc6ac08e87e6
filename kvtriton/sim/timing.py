"""The simulator's model of time: the link (bandwidth + a fixed cost per request), prefill and
decode rates, and percentile summaries. Pure Python.

Link profiles are data: :data:`LINK_MEASUREMENTS` holds, per profile, the measured points
(request size, GB/s) and where they come from; :func:`fit_link` turns them into the affine
model ``time = overhead + bytes / bandwidth`` (least squares on relative error), so a new
measurement is one edit here. A profile without measurements states its two numbers and says
that they are an estimate. ``GB/s`` is payload (each byte counted once), ``1e9`` bytes/s.

Prefill and decode rates are assumptions, not measurements of this project (it runs no
model); they are stated once, in :data:`DEFAULT_PREFILL_TOKENS_PER_S` and
:data:`DEFAULT_DECODE_TOKENS_PER_S`, and every result records the values it used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "DEFAULT_DECODE_TOKENS_PER_S",
    "DEFAULT_LINK",
    "DEFAULT_PREFILL_TOKENS_PER_S",
    "LINK_MEASUREMENTS",
    "LINK_PROFILES",
    "LinkProfile",
    "Percentiles",
    "TimeModel",
    "fit_link",
    "link_profile",
    "percentile",
]

MiB = 1024**2

#: Per profile: what it is, the measured ``(MiB per request, GB/s payload)`` points, and
#: their source; or, for an estimate, ``gbps`` and ``overhead_us`` with the reasoning.
LINK_MEASUREMENTS: dict[str, dict[str, Any]] = {
    "nccl": {
        "description": "raw NCCL send/recv of one contiguous buffer, GPU0 -> GPU1 over NVLink",
        "device": "2x H200 SXM",
        "points": ((4, 44.0), (64, 182.0), (256, 349.0), (1024, 363.0)),
        "source": "docs/DESIGN.md §4 (reference numbers, measured)",
    },
    "kvtriton-nccl": {
        "description": "kvtriton's transfer end to end (ask -> last scatter done: handshake, "
        "gather, NCCL, scatter), one request at a time",
        "device": "2x H100 80GB HBM3 (NVLink)",
        "points": ((16, 5.3), (64, 21.0), (256, 67.0), (1024, 167.0)),
        "source": "BENCHMARKS.md, Transfer, column 'e2e x1' (measured 2026-11-28)",
    },
    "kvtriton-direct": {
        "description": "kvtriton's direct channel end to end (ask -> committed: control hops, "
        "one copy kernel per chunk from the mapped sender pool, commit), one request at a "
        "time, two processes on one GPU",
        "device": "1x H200 (two processes, CUDA IPC)",
        "points": ((16, 11.8), (64, 46.2), (256, 156.7), (1024, 353.6)),
        "source": "BENCHMARKS.md, Direct channel, column 'e2e x1' (measured 2026-12-01)",
    },
    "direct": {
        "description": "direct intra-host channel: one kernel copies the sender's pages into "
        "the receiver's (CUDA IPC / peer access)",
        "device": "H200",
        "gbps": 2000.0,
        "overhead_us": 100.0,
        "estimate": True,
        "source": "ESTIMATE of the hardware limit (kvtriton-direct is kvtriton's measured "
        "channel): a device copy runs ~4.0-4.2 TB/s read+write on "
        "H200 (docs/DESIGN.md §4: 4239 GB/s copy_, 4035 GB/s written through CUDA IPC), i.e. "
        "~2 TB/s of payload; 100 us per request is the target of issue 11 (1-block ask -> "
        "committed p50)",
    },
}

#: The profile ``kvtriton simulate`` uses unless told otherwise.
DEFAULT_LINK = "nccl"

#: ASSUMED context-side prefill throughput, tokens/s per context rank: about what a
#: gpt-oss-120b class MoE (~5 B active parameters, ~10 GFLOP per token) reaches on one H200
#: at ~40% of its dense bf16 peak. Not measured here; pass your own.
DEFAULT_PREFILL_TOKENS_PER_S = 40_000.0
#: ASSUMED decode speed of one request on the receiver, tokens/s (a batched decoder's step
#: time is about flat in the batch size). Not measured here; pass your own.
DEFAULT_DECODE_TOKENS_PER_S = 100.0


@dataclass(frozen=True)
class LinkProfile:
    """A link between the context and the generation side: moving ``n`` bytes of one request
    takes ``overhead_us * 1e-6 + n / (gbps * 1e9)`` seconds once the link is free.

    Attributes:
        name: the profile's name (``"custom"`` when edited).
        gbps: payload bandwidth in GB/s (1e9 bytes per second).
        overhead_us: fixed cost per request in microseconds (also paid by a full hit, which
            still asks and commits).
        description, device, source: what it models and where the numbers come from.
        estimate: the numbers are an estimate, not a measurement.
        points: the measured ``(MiB, GB/s)`` points it was fitted to (empty for estimates).
    """

    name: str
    gbps: float
    overhead_us: float
    description: str = ""
    device: str = ""
    source: str = ""
    estimate: bool = False
    points: tuple[tuple[float, float], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        _positive(self.gbps, "link bandwidth (GB/s)")
        if not isinstance(self.overhead_us, (int, float)) or isinstance(self.overhead_us, bool):
            raise ValueError(f"request overhead must be a number of us, got {self.overhead_us!r}")
        if not 0 <= self.overhead_us < math.inf:
            raise ValueError(f"request overhead must be >= 0 us, got {self.overhead_us!r}")

    def seconds(self, nbytes: int) -> float:
        """Link time of one request of ``nbytes`` (no queueing)."""
        return self.overhead_us * 1e-6 + nbytes / (self.gbps * 1e9)

    def with_overrides(
        self, gbps: float | None = None, overhead_us: float | None = None
    ) -> LinkProfile:
        """This profile with its bandwidth and/or fixed cost replaced (named ``custom``)."""
        if gbps is None and overhead_us is None:
            return self
        return replace(
            self,
            name="custom",
            gbps=self.gbps if gbps is None else gbps,
            overhead_us=self.overhead_us if overhead_us is None else overhead_us,
            description=f"{self.name} with "
            + ", ".join(
                part
                for part in (
                    None if gbps is None else f"{gbps:g} GB/s",
                    None if overhead_us is None else f"{overhead_us:g} us per request",
                )
                if part
            ),
            estimate=self.estimate,
        )

    def label(self) -> str:
        """One line: name, bandwidth, fixed cost (and "estimate")."""
        est = ", ESTIMATE" if self.estimate else ""
        return f"{self.name}: {self.gbps:.0f} GB/s + {self.overhead_us:.0f} us/request{est}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "gbps": self.gbps,
            "request_overhead_us": self.overhead_us,
            "estimate": self.estimate,
            "description": self.description,
            "device": self.device,
            "source": self.source,
            "points_mib_gbps": [list(p) for p in self.points],
        }


def _positive(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{what} must be a number > 0, got {value!r}")
    return float(value)


def fit_link(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """``(gbps, overhead_us)`` of the affine time model closest to measured
    ``(MiB, GB/s)`` points: least squares on the relative error of each point's time."""
    if len(points) < 2:
        raise ValueError("fitting a link needs at least two measured points")
    # time t_i = a + b * x_i; minimise sum(((a + b x_i) / t_i - 1)^2): weighted least squares.
    rows = [(m * MiB, m * MiB / (g * 1e9)) for m, g in points]
    s11 = sum(1 / t**2 for _, t in rows)
    s12 = sum(x / t**2 for x, t in rows)
    s22 = sum(x * x / t**2 for x, t in rows)
    r1 = sum(1 / t for _, t in rows)
    r2 = sum(x / t for x, t in rows)
    det = s11 * s22 - s12 * s12
    a = (r1 * s22 - r2 * s12) / det
    b = (s11 * r2 - s12 * r1) / det
    if b <= 0:
        raise ValueError(f"the points {list(points)} give no positive bandwidth")
    return 1 / b / 1e9, max(0.0, a * 1e6)


def _profile(name: str, entry: Mapping[str, Any]) -> LinkProfile:
    points = tuple((float(m), float(g)) for m, g in entry.get("points", ()))
    if points:
        gbps, overhead = fit_link(points)
    else:
        gbps, overhead = float(entry["gbps"]), float(entry["overhead_us"])
    return LinkProfile(
        name=name,
        gbps=gbps,
        overhead_us=overhead,
        description=entry.get("description", ""),
        device=entry.get("device", ""),
        source=entry.get("source", ""),
        estimate=bool(entry.get("estimate", False)),
        points=points,
    )


#: The named profiles, fitted from :data:`LINK_MEASUREMENTS`.
LINK_PROFILES: dict[str, LinkProfile] = {
    name: _profile(name, entry) for name, entry in LINK_MEASUREMENTS.items()
}


def link_profile(name: str) -> LinkProfile:
    """The named profile; ``ValueError`` listing the names otherwise."""
    try:
        return LINK_PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown link profile {name!r}; profiles: {', '.join(LINK_PROFILES)}"
        ) from None


@dataclass(frozen=True)
class TimeModel:
    """Rates and the link the simulator's clock runs on (see :mod:`kvtriton.sim.engine`).

    Attributes:
        link: the context -> generation link (FIFO: one request at a time).
        prefill_tokens_per_s: context-side prefill throughput per context rank.
        decode_tokens_per_s: how fast one request decodes on the receiver.
        context_ranks: prefills running at once (FIFO, each on one rank).
        context_cache: the context side reuses a prefix it prefilled before (an unbounded
            prefix cache at block granularity: compute resumes after the longest cached
            prefix, at least one token is computed); ``False``: every prompt is prefilled
            whole.
    """

    link: LinkProfile = field(default_factory=lambda: LINK_PROFILES[DEFAULT_LINK])
    prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S
    decode_tokens_per_s: float = DEFAULT_DECODE_TOKENS_PER_S
    context_ranks: int = 1
    context_cache: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.link, LinkProfile):
            raise TypeError(f"link must be a LinkProfile, got {type(self.link).__name__}")
        _positive(self.prefill_tokens_per_s, "prefill_tokens_per_s")
        _positive(self.decode_tokens_per_s, "decode_tokens_per_s")
        ranks = self.context_ranks
        if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
            raise ValueError(f"context_ranks must be an int >= 1, got {ranks!r}")

    def prefill_seconds(self, tokens: int) -> float:
        return tokens / self.prefill_tokens_per_s

    def decode_seconds(self, tokens: int) -> float:
        return tokens / self.decode_tokens_per_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "link": self.link.to_dict(),
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "context_ranks": self.context_ranks,
            "context_cache": self.context_cache,
        }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (``0 <= q <= 1``) of ascending values, interpolating linearly
    between the two nearest ranks (numpy's default); ``nan`` for no values."""
    n = len(sorted_values)
    if not n:
        return math.nan
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True)
class Percentiles:
    """``p50``, ``p90``, ``p99`` and ``mean`` of per-request values (and the values)."""

    p50: float
    p90: float
    p99: float
    mean: float
    values: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles:
        ordered = tuple(sorted(values))
        mean = math.fsum(ordered) / len(ordered) if ordered else math.nan
        return cls(
            percentile(ordered, 0.5),
            percentile(ordered, 0.9),
            percentile(ordered, 0.99),
            mean,
            ordered,
        )

    def to_dict(self) -> dict[str, float]:
        return {"p50": self.p50, "p90": self.p90, "p99": self.p99, "mean": self.mean}
