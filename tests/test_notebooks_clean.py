"""Notebooks are committed without outputs, with a tagged parameters cell, and stay thin."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_six_notebooks_exist():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_no_outputs_and_a_parameters_cell(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    dirty = [i for i, c in enumerate(code) if c.get("outputs") or c.get("execution_count") is not None]
    assert not dirty, f"{path.name}: code cells {dirty} carry outputs; strip them (jupyter nbconvert --clear-output)"
    assert "parameters" in code[0].get("metadata", {}).get("tags", []), f"{path.name}: first code cell must be tagged 'parameters'"
    assert "widgets" not in nb.get("metadata", {}), f"{path.name}: saved widget state"
    lines = sum(len("".join(c["source"]).splitlines()) for c in code)
    assert lines < 120, f"{path.name}: {lines} lines of code; move logic into cap_lab"
