"""Workload simulator: bytes a disaggregated receiver pulls per layer group, per reuse policy.

A request trace runs through the real receiver cache manager once per
:class:`~kvtriton.plan.ReusePolicy`; see :mod:`kvtriton.sim.engine` for the model of time
(admission, lock-step decoding), :mod:`kvtriton.sim.trace` for traces and the JSONL format,
:mod:`kvtriton.sim.synthetic` for the seeded chat / agent generators and
:mod:`kvtriton.sim.report` for the results. The ``kvtriton simulate`` command lives in
:mod:`kvtriton.cli.simulate`; nothing here imports the CLI.
"""

from kvtriton.sim.engine import POLICIES, default_capacity_blocks, simulate
from kvtriton.sim.mooncake import DEFAULT_BLOCK_TOKENS, BlockTokens, load_mooncake
from kvtriton.sim.report import GroupStats, PolicyResult, SimResult
from kvtriton.sim.synthetic import TRACE_KINDS, agent_trace, chat_trace, synthetic_trace
from kvtriton.sim.trace import TRACE_FORMATS, Request, Trace, load_trace, trace_from_records

__all__ = [
    "DEFAULT_BLOCK_TOKENS",
    "POLICIES",
    "TRACE_FORMATS",
    "TRACE_KINDS",
    "BlockTokens",
    "GroupStats",
    "PolicyResult",
    "Request",
    "SimResult",
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
