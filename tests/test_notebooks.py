"""Execute every notebook in notebooks/ top to bottom (CPU, small sizes) and fail on any cell error;
check the notebook helpers of kvtriton.viz that compute (block maps, what-if plans).

Each notebook runs in a fresh ``python3`` kernel of *this* interpreter: a kernelspec pointing at
``sys.executable`` is written to a temporary ``JUPYTER_PATH`` (nothing is registered globally),
with ``notebooks/`` as the working directory. Outputs are not written back to the files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nbclient import NotebookClient

from kvtriton.plan import compare_policies
from kvtriton.ranges import ceil_div
from kvtriton.spec import preset
from kvtriton.viz import (
    CACHED,
    DRAFT,
    MOVED,
    NOT_NEEDED,
    PARTLY_MOVED,
    alignment_plans,
    block_maps,
    with_window,
)

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"

#: Every notebook the suite runs (each takes well under a minute on 2 CPU cores; 05 runs
#: kvtriton.integrations on tiny random transformers models, 06 spawns two gloo ranks).
NOTEBOOKS: tuple[str, ...] = (
    "01_alignment.ipynb",
    "02_kernels.ipynb",
    "03_hybrid_reuse.ipynb",
    "04_distributed.ipynb",
    "05_transformers_e2e.ipynb",
    "06_streaming.ipynb",
)

#: Per-cell limit: a guard against a hung kernel, not a speed test (a loaded CI box must not
#: fail a notebook that is merely slow).
CELL_TIMEOUT_S = 600

#: Committed notebooks keep small outputs so that they read well on GitHub.
MAX_NOTEBOOK_BYTES = 300 * 1024


@pytest.fixture(scope="module")
def local_kernel(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A temporary JUPYTER_PATH whose ``python3`` kernel runs this interpreter."""
    import ipykernel  # noqa: F401  (the kernel must be importable here: it is in the dev extra)

    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (kvtriton tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return str(root)


def test_every_notebook_is_listed() -> None:
    found = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
    assert found == sorted(NOTEBOOKS), (
        f"notebooks/ holds {found} but tests/test_notebooks.py runs {sorted(NOTEBOOKS)}: "
        "add the new notebook to NOTEBOOKS"
    )


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_is_small_and_clean(name: str) -> None:
    path = NOTEBOOK_DIR / name
    size = path.stat().st_size
    assert size < MAX_NOTEBOOK_BYTES, f"{name} is {size} bytes; keep it under {MAX_NOTEBOOK_BYTES}"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    errors = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors, f"{name}: committed outputs hold errors in cells {errors}"


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs(name: str, local_kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_PATH", local_kernel)
    # the kernel runs a notebook as a user would: without the suite's TRITON_INTERPRET=1
    # (02_kernels sets it itself; under the interpreter every CPU move of 04-06 would run the
    # Triton source, which the kernel tests already cover, at a hundredth of the speed)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    # one extra cell, in memory only: which interpreter ran the notebook
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable, end='')"))
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        startup_timeout=120,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()  # raises CellExecutionError (with the cell and traceback) on any error
    ran_with = "".join(out.get("text", "") for out in nb.cells[-1].outputs)
    assert Path(ran_with) == Path(sys.executable), (
        f"{name} ran in {ran_with!r}, not in this interpreter {sys.executable!r}"
    )


# ---------------------------------------------------------------------------------------------
# The notebook helpers of kvtriton.viz that compute something (not just draw).
# ---------------------------------------------------------------------------------------------


def _expected_token(p: int, window: int | None, cached: int, q: int) -> int:
    """Brute force from DESIGN.md §1, position by position."""
    if q >= p:
        return DRAFT
    needed = q >= p + 1 - window if window is not None else True
    if not needed:
        return NOT_NEEDED
    return CACHED if q < cached else MOVED


@given(
    p=st.integers(1, 80),
    window=st.integers(1, 40),
    c_full=st.integers(0, 100),
    c_slide=st.integers(0, 100),
    drafts=st.integers(0, 6),
    tpb=st.integers(1, 9),
)
def test_block_maps_match_brute_force(
    p: int, window: int, c_full: int, c_slide: int, drafts: int, tpb: int
) -> None:
    spec = with_window(preset("tiny-hybrid"), window)
    cached = {"full": c_full, "sliding": c_slide, "state": p}
    for policy, plan in alignment_plans(
        preset("tiny-hybrid"), p, cached, window=window, num_draft_tokens=drafts
    ).items():
        maps = {m.name: m for m in block_maps(plan, tokens_per_block=tpb)}
        assert [g.name for g in plan.groups] == list(maps) == list(spec.group_names)
        for g in plan.groups:
            m = maps[g.name]
            if g.group.is_state:
                assert m.tokens == () and m.blocks == () and m.moves_state == g.moves_state
                continue
            w = g.group.window
            want = [_expected_token(p, w, g.cached_tokens, q) for q in range(p + drafts)]
            assert list(m.tokens) == want, (policy, g.name)
            assert m.count(MOVED) == len(g.tokens) and m.bytes == g.bytes
            for b, status in enumerate(m.blocks):
                cells = want[b * tpb : (b + 1) * tpb]
                moved = cells.count(MOVED)
                if moved == tpb:
                    assert status == MOVED
                elif moved:
                    assert status == PARTLY_MOVED
                elif CACHED in cells:
                    assert status == CACHED
                elif set(cells) == {DRAFT}:
                    assert status == DRAFT
                else:
                    assert status == NOT_NEEDED
            assert len(m.blocks) == ceil_div(p + drafts, tpb)


def test_alignment_plans_names_and_kinds() -> None:
    spec = preset("tiny-hybrid")
    by_kind = alignment_plans(spec, 30, {"full": 20, "sliding": 25, "state": 30})
    by_name = compare_policies(spec, 30, {"full": 20, "sliding8": 25, "state": 30})
    assert by_kind == by_name
    # a name wins over its kind; the window is replaced and the group renamed
    plans = alignment_plans(spec, 30, {"sliding": 0, "sliding4": 28}, window=4)
    assert plans["per_group"].group("sliding4").cached_tokens == 28
    assert plans["per_group"].group("sliding4").needed.start == 27
    with pytest.raises(ValueError, match=r"unknown groups or kinds \['sliding8'\]"):
        alignment_plans(spec, 30, {"sliding8": 3}, window=4)


def test_with_window_errors() -> None:
    with pytest.raises(ValueError, match="0 sliding groups"):
        with_window(preset("llama-3-8b"), 64)
    with pytest.raises(ValueError, match=r"'full' .* is 'full', not a sliding-window group"):
        with_window(preset("tiny-hybrid"), 4, group="full")
    with pytest.raises(ValueError, match="sliding window must be an int >= 1"):
        with_window(preset("tiny-hybrid"), 0)
    with pytest.raises(ValueError, match="tokens_per_block must be a positive int"):
        block_maps(alignment_plans(preset("tiny-hybrid"), 8, {})["per_group"], tokens_per_block=0)
