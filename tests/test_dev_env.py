"""./dev and environment.yml build one environment; ./dev gives JupyterLab on notebooks/."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _dev_setting(name: str) -> str:
    found = re.search(rf'^{name}="([^"]+)"$', (ROOT / "dev").read_text(), re.MULTILINE)
    assert found, f"./dev sets no {name}"
    return found[1]


def test_environment_yml_is_the_environment_dev_builds() -> None:
    pip = re.findall(r"^\s+- (\S.*)$", (ROOT / "environment.yml").read_text(), re.MULTILINE)
    assert _dev_setting("TORCH_PIN") in pip
    assert f"-e .[{_dev_setting('EXTRAS')}]" in pip
    dev = (ROOT / "dev").read_text()
    assert '"$TORCH_PIN"' in dev and '-e ".[$EXTRAS]"' in dev  # what ensure_env installs


def test_the_notebooks_extra_runs_every_notebook() -> None:
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    names = {re.split(r"[<>=\[]", req)[0] for req in extras["notebooks"]}
    assert {"jupyterlab", "ipykernel", "matplotlib", "ipywidgets", "transformers"} <= names
    assert "notebooks" in _dev_setting("EXTRAS").split(",")


def test_dev_lab_is_a_command() -> None:
    usage = subprocess.run(
        ["bash", str(ROOT / "dev"), "no-such-command"], capture_output=True, text=True, timeout=600
    )
    assert usage.returncode == 2
    assert "lab" in usage.stderr and "jupyter" in usage.stderr
