"""The chapters: clean sources, a documented parameters cell, and a smoke run of each with papermill.

The executed copies land in build/smoke/, where `make test` then runs nbval on them (the cells marked
`# NBVAL_CHECK_OUTPUT` must give the same output again, so the chapters are deterministic).
"""
import json
import re

import nbformat
import papermill as pm
import pytest

from pruning_utils.chapters import ROOT, chapter_paths, run_chapter

CHAPTERS = chapter_paths()
SMOKE_DIR = ROOT / "build" / "smoke"


def code_cells(path):
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def test_there_are_chapters():
    assert [p.stem for p in CHAPTERS][:1] == ["00_baselines"]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_source_notebook_is_clean(path):
    raw = json.loads(path.read_text())
    for cell in raw["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, "strip outputs before committing"
    assert "!pip" not in path.read_text() and "sys.path" not in path.read_text()


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_parameters_cell_is_first_and_documented(path):
    first = code_cells(path)[0]
    assert "parameters" in first.metadata.get("tags", [])
    assignments = [line for line in first.source.splitlines() if re.match(r"^\w+ = ", line)]
    assert assignments and assignments[0].startswith('size = "default"')
    for line in assignments:
        assert "#" in line, f"parameter without a comment saying what it allows: {line}"
    params = pm.inspect_notebook(str(path))
    assert list(params) == [line.split(" = ")[0] for line in assignments]  # papermill parsed every line
    assert all(p["help"] for p in params.values())


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_runs_at_smoke_size(path):
    run_chapter(path, SMOKE_DIR, "smoke")
    executed = nbformat.read(SMOKE_DIR / path.name, as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert errors == []
    assert any("NBVAL_CHECK_OUTPUT" in c.source for c in executed.cells), "no cell of key numbers for nbval"


def test_bad_parameter_stops_the_chapter_with_a_clear_error(tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match=r"resnet_depth=21 is not allowed; expected one of 8, 14"):
        run_chapter(CHAPTERS[0], tmp_path, "smoke", extra={"resnet_depth": 21})
