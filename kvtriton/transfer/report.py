"""The disaggregated experiment's report as text (:func:`format_report`)."""

from __future__ import annotations

from typing import Any

__all__ = ["format_report"]


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_report(report: dict[str, Any]) -> str:
    """A readable summary: header, per-group table, phases, final VERIFIED/FAILED line."""
    cfg = report["config"]
    lines = [
        f"kvtriton disaggregated transfer: {report['model']}, {report['topology']}",
        f"  data over the {report['channel']} channel on {report['device']}, control over sockets; "
        f"{cfg['conversations']} conversations x {cfg['turns']} turns "
        f"({cfg['first_turn_tokens']} tokens, +{cfg['turn_tokens']} per turn)",
        "  Context ranks prefill position-derived KV; generation ranks keep earlier turns in "
        "their prefix cache",
        "  (sliding-window pages evicted), ask each overlapping sender for exactly the missing "
        "per-group ranges,",
        "  commit only intact requests, and check every needed position bit-exact.",
        "",
    ]
    modes = report["modes"]
    pg = modes.get("per_group")
    sb = modes.get("single_boundary")
    title = "per-group" if pg else "single-boundary"
    lines.append(
        f"  Moved with {title} reuse, against one boundary per sequence and against "
        f"no reuse (all receivers):"
    )
    hdr = f"  {'group':<12} {'kind':<13} {'tokens':>7} {'bytes':>11}"
    if sb and pg:
        hdr += f" {'single-bnd':>11} {'saved':>6}"
    hdr += f" {'no reuse':>11} {'saved':>6}"
    main = pg or sb
    lines.append(hdr)
    for name, g in main["groups"].items():
        kind = g["kind"] + (f"({g['window']})" if g["window"] else "")
        tokens = str(g["tokens"]) if g["kind"] != "state" else "-"
        row = f"  {name:<12} {kind:<13} {tokens:>7} {_fmt_bytes(g['bytes']):>11}"
        if sb and pg:
            sbb = sb["groups"][name]["bytes"]
            save = f"{100 * (1 - g['bytes'] / sbb):.0f}%" if sbb else "-"
            row += f" {_fmt_bytes(sbb):>11} {save:>6}"
        nr = g["no_reuse_bytes"]
        save = f"{100 * (1 - g['bytes'] / nr):.0f}%" if nr else "-"
        row += f" {_fmt_bytes(nr):>11} {save:>6}"
        lines.append(row)
    tot = main["bytes"]
    row = f"  {'total':<12} {'':<13} {'':>7} {_fmt_bytes(tot):>11}"
    if sb and pg:
        save = f"{100 * (1 - tot / sb['bytes']):.0f}%" if sb["bytes"] else "-"
        row += f" {_fmt_bytes(sb['bytes']):>11} {save:>6}"
    nr = main["no_reuse_bytes"]
    row += f" {_fmt_bytes(nr):>11} {(f'{100 * (1 - tot / nr):.0f}%' if nr else '-'):>6}"
    lines.append(row)
    lines.append("")
    lines.append("  Time per phase (mean per request and receiver rank):")
    for mode, m in modes.items():
        rate = m["gbps"]
        gb = (
            "n/a" if not rate else (f"{rate:.2f} GB/s" if rate >= 0.1 else f"{rate * 1e3:.1f} MB/s")
        )
        lines.append(
            f"  {mode:<16} {m['requests']} requests, {_fmt_bytes(m['bytes'])}, {gb} while data "
            f"flows; stream {m['wall_s']:.2f} s"
        )
        lines.append(
            f"  {'':<16} plan {m['t_plan_ms']:.2f} ms | ask -> first byte "
            f"{m['t_handshake_ms']:.2f} ms | data {m['t_data_ms']:.2f} ms | until committed "
            f"{m['t_total_ms']:.2f} ms"
        )
    lines.append("")
    if report["verified"]:
        n = sum(m["requests"] for m in modes.values())
        lines.append(
            f"VERIFIED: {n} requests, every needed position of every group "
            f"bit-exact on every generation rank, no leaked blocks"
        )
    else:
        lines.append("FAILED:")
        lines.extend(f"  {p}" for p in report["problems"][:20])
    return "\n".join(lines)
