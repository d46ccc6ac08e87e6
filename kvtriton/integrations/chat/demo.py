"""Checking and reporting a chat (demo, notebook 05): the user turns, the per-turn check
against :func:`~kvtriton.integrations.chat.greedy_reference`, the report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvtriton.integrations.chat.launch import ChatConfig, launch_chat, load_model
from kvtriton.integrations.chat.workers import greedy_reference

if TYPE_CHECKING:
    pass


def demo_user_turns(
    lengths: Sequence[int] = (21, 13), *, seed: int = 1, vocab_size: int = 96
) -> tuple[tuple[int, ...], ...]:
    """Seeded random user turns of the given lengths (token ids below ``vocab_size``)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return tuple(tuple(torch.randint(0, vocab_size, (n,), generator=g).tolist()) for n in lengths)


@dataclass(frozen=True)
class TurnCheck:
    """One turn compared with :func:`greedy_reference` (no disaggregation).

    Attributes: ``mode``, ``turn``, ``tokens_match``, ``exact`` (logits bit-identical),
    ``max_abs_diff`` (largest logit difference).
    """

    mode: str
    turn: int
    tokens_match: bool
    exact: bool
    max_abs_diff: float


def verify_chat(
    model: Any, cfg: ChatConfig, records: Mapping[str, Sequence[Mapping[str, Any]]]
) -> list[TurnCheck]:
    """Replay every turn of ``records`` (from :func:`launch_chat`) without disaggregation.

    Turn ``k``'s prompt is rebuilt from ``cfg.user_turns`` and the recorded replies, then
    prefilled from scratch and decoded greedily for ``cfg.steps`` steps, with
    ``cfg.num_threads`` torch threads (as the ranks used).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        return _verify(model, cfg, records)
    finally:
        torch.set_num_threads(before)


def _verify(
    model: Any, cfg: ChatConfig, records: Mapping[str, Sequence[Mapping[str, Any]]]
) -> list[TurnCheck]:
    import torch

    checks: list[TurnCheck] = []
    for mode, turns in records.items():
        conversation: list[int] = []
        for k, rec in enumerate(turns):
            prompt = conversation + list(cfg.user_turns[k])
            tokens, logits = greedy_reference(model, prompt, cfg.steps)
            got = torch.as_tensor(rec["logits"])
            checks.append(
                TurnCheck(
                    mode,
                    k,
                    list(rec["tokens"]) == tokens,
                    bool(torch.equal(got, logits)),
                    float((got - logits).abs().max()),
                )
            )
            conversation = prompt + list(rec["tokens"])
    return checks


def format_chat_report(
    records: Mapping[str, Sequence[Mapping[str, Any]]], checks: Sequence[TurnCheck] = ()
) -> str:
    """A table per turn and mode: prompt length, positions moved per group, bytes, and (with
    ``checks``) whether the tokens and logits match the non-disaggregated run."""
    from kvtriton.table import Column, Table, format_bytes, format_percent

    by_key = {(c.mode, c.turn): c for c in checks}
    columns: list[Column | str] = [
        "mode",
        Column("turn"),
        Column("P"),
        "moved (positions)",
        Column("bytes"),
    ]
    if checks:
        columns += ["tokens", Column("max |dlogit|")]
    table = Table(columns)
    for mode, turns in records.items():
        for k, rec in enumerate(turns):
            moved = [f"{g} [{a}, {b})" for g, (a, b) in rec["moved"].items()]
            moved += [f"{s} (state)" for s in rec.get("states", ())]
            row: list[object] = [
                mode,
                k + 1,
                rec["prompt_len"],
                ", ".join(moved) or "nothing",
                format_bytes(int(rec.get("bytes", rec["kv_bytes"]))),
            ]
            check = by_key.get((mode, k))
            if checks:
                if check is None:
                    row += ["-", "-"]
                else:
                    row += [
                        "same" if check.tokens_match else "DIFFER",
                        "0 (bit-exact)" if check.exact else f"{check.max_abs_diff:.2e}",
                    ]
            table.add_row(*row)
    lines = [table.render()]
    if "per_group" in records and "single_boundary" in records:
        for k, (pg, sb) in enumerate(
            zip(records["per_group"], records["single_boundary"], strict=True)
        ):
            a, b = int(pg.get("bytes", pg["kv_bytes"])), int(sb.get("bytes", sb["kv_bytes"]))
            if b > a:
                lines.append(
                    f"turn {k + 1}: per-group reuse moves {format_bytes(a)}, single "
                    f"boundary {format_bytes(b)} (saves {format_percent(b - a, b)})"
                )
    return "\n".join(lines)


@dataclass(frozen=True)
class ChatDemo:
    """What :func:`run_chat_demo` returns.

    Attributes:
        records: ``{mode: [turn record, ...]}`` from the generation rank.
        checks: every turn compared with the non-disaggregated run.
        report: :func:`format_chat_report` text.
        ok: every turn generated the reference's tokens, with logits bit-exact or within
            ``atol = rtol = 1e-5`` (the float32 rounding of reused receiver-computed KV).
    """

    records: Mapping[str, Sequence[Mapping[str, Any]]]
    checks: tuple[TurnCheck, ...]
    report: str
    ok: bool


def run_chat_demo(cfg: ChatConfig) -> ChatDemo:
    """Launch ``cfg`` (:func:`launch_chat`), replay it without disaggregation
    (:func:`verify_chat`) and format the report: one call for a CLI or a notebook.

    ``cfg.user_turns`` may be empty: then :func:`demo_user_turns` draws two turns (21 and
    13 tokens) below the model's vocabulary size.
    """
    import numpy as np

    model = load_model(cfg)
    if not cfg.user_turns:
        from dataclasses import replace

        cfg = replace(cfg, user_turns=demo_user_turns(vocab_size=int(model.config.vocab_size)))
    records = launch_chat(cfg)
    checks = tuple(verify_chat(model, cfg, records))
    ok = True
    for c in checks:
        expected = np.asarray(records[c.mode][c.turn]["logits"])
        bound = 1e-5 + 1e-5 * float(np.abs(expected).max())
        ok = ok and c.tokens_match and (c.exact or c.max_abs_diff <= bound)
    return ChatDemo(records, checks, format_chat_report(records, checks), ok)
