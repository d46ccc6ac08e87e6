"""Workload simulator: bytes and time a disaggregated receiver spends per layer group, per
reuse policy.

A request trace runs through the real receiver cache manager once per
:class:`~kvtriton.plan.ReusePolicy`, on a clock: see :mod:`kvtriton.sim.engine` for the model
(context-side prefill, admission, the link, decoding), :mod:`kvtriton.sim.timing` for link
profiles and rates, :mod:`kvtriton.sim.trace` for traces and kvtriton's JSONL format,
:mod:`kvtriton.sim.mooncake` for Mooncake-format traces, :mod:`kvtriton.sim.synthetic` for
the seeded chat / agent generators and :mod:`kvtriton.sim.report` for the results (and their
JSON). docs/traces.md documents both trace formats. The ``kvtriton simulate`` command lives
in :mod:`kvtriton.cli.simulate`; nothing here imports the CLI.
"""

from kvtriton.sim.engine import POLICIES, default_capacity_blocks, simulate
from kvtriton.sim.mooncake import DEFAULT_BLOCK_TOKENS, BlockTokens, load_mooncake
from kvtriton.sim.report import GroupStats, PolicyResult, SimResult, TimeStats
from kvtriton.sim.synthetic import TRACE_KINDS, agent_trace, chat_trace, synthetic_trace
from kvtriton.sim.timing import LINK_PROFILES, LinkProfile, TimeModel
from kvtriton.sim.trace import TRACE_FORMATS, Request, Trace, load_trace, trace_from_records

__all__ = [
    "DEFAULT_BLOCK_TOKENS",
    "LINK_PROFILES",
    "POLICIES",
    "TRACE_FORMATS",
    "TRACE_KINDS",
    "BlockTokens",
    "GroupStats",
    "LinkProfile",
    "PolicyResult",
    "Request",
    "SimResult",
    "TimeModel",
    "TimeStats",
    "Trace",
    "agent_trace",
    "chat_trace",
    "default_capacity_blocks",
    "load_mooncake",
    "load_trace",
    "simulate",
    "synthetic_trace",
    "trace_from_records",
]
