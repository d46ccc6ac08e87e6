"""Execute every notebook in notebooks/ top to bottom (CPU, small sizes) and fail on any cell error.

Each notebook runs in a fresh ``python3`` kernel of *this* interpreter: a kernelspec pointing at
``sys.executable`` is written to a temporary ``JUPYTER_PATH`` (nothing is registered globally),
with ``notebooks/`` as the working directory. Outputs are not written back to the files.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"

#: Notebook -> wall-clock budget in seconds (2 CPU cores; each runs in well under a minute).
NOTEBOOKS: dict[str, float] = {
    "01_alignment.ipynb": 60.0,
    "02_kernels.ipynb": 60.0,
    "03_hybrid_reuse.ipynb": 60.0,
    "04_distributed.ipynb": 90.0,
}

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
        "add the new notebook (with a time budget) to NOTEBOOKS"
    )


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_is_small_and_clean(name: str) -> None:
    path = NOTEBOOK_DIR / name
    size = path.stat().st_size
    assert size < MAX_NOTEBOOK_BYTES, f"{name} is {size} bytes; keep it under {MAX_NOTEBOOK_BYTES}"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    errors = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
              for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, f"{name}: committed outputs hold errors in cells {errors}"


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs(name: str, local_kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_PATH", local_kernel)
    budget = NOTEBOOKS[name]
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    # one extra cell, in memory only: which interpreter ran the notebook
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable, end='')"))
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=int(budget),  # per cell; the whole notebook is checked against budget below
        startup_timeout=120,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the cell and traceback) on any error
    elapsed = time.perf_counter() - start
    ran_with = "".join(out.get("text", "") for out in nb.cells[-1].outputs)
    assert Path(ran_with) == Path(sys.executable), (
        f"{name} ran in {ran_with!r}, not in this interpreter {sys.executable!r}")
    assert elapsed < budget, f"{name} took {elapsed:.1f} s, over its {budget:.0f} s budget"
