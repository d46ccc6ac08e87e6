"""Repository hygiene: no unresolved merge left in a tracked text file."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: A line git writes around a conflict (``=======`` alone is a valid Markdown/RST underline).
MARKER = re.compile(r"^(<{7} |>{7} |\|{7} )", re.MULTILINE)

TEXT = {".py", ".md", ".toml", ".cfg", ".txt", ".ipynb", ".sh", ".json", ".jsonl", ".yml", ".yaml"}


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, text=True
        ).stdout
        return [ROOT / p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):  # an sdist: no git
        return [p for p in ROOT.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts]


def test_no_merge_conflict_markers() -> None:
    bad = []
    for path in tracked_files():
        if path.suffix in TEXT and path.is_file() and path.stat().st_size < 8 << 20:
            text = path.read_text(errors="replace")
            bad += [
                f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
                for m in MARKER.finditer(text)
            ]
    assert not bad, f"unresolved merge conflict markers at {bad}"


#: A layer group's kind compared with a string (``g.kind == "state"``): per-kind behaviour
#: goes through ``GroupKind`` and ``LayerGroup.is_state`` / ``.is_attention`` / ``.rule``.
KIND_STRING = re.compile(
    r"\b(g|group|grp|layer_group|spec_group)\.kind\s*[!=]=\s*[\"'](full|sliding|state)[\"']"
)


def test_no_group_kind_string_switch_in_the_package() -> None:
    bad = []
    for path in sorted((ROOT / "kvtriton").rglob("*.py")):
        text = path.read_text()
        bad += [
            f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
            for m in KIND_STRING.finditer(text)
        ]
    assert not bad, f"group kind compared with a string (use GroupKind / is_state): {bad}"


def test_a_module_over_600_lines_says_why_at_its_top() -> None:
    long = []
    for path in sorted((ROOT / "kvtriton").rglob("*.py")):
        lines = path.read_text().splitlines()
        if len(lines) > 600 and "600 lines" not in "\n".join(lines[:12]):
            long.append(f"{path.relative_to(ROOT)} ({len(lines)} lines)")
    assert not long, f"split these modules or state at their top why they stay whole: {long}"
