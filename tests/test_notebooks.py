"""The chapters: clean sources, a documented parameters cell, and a smoke run of each with papermill.

The executed copies land in build/smoke/, where `make test` then runs nbval on them (the cells marked
`# NBVAL_CHECK_OUTPUT` must give the same output again, so the chapters are deterministic).
"""
import json
import re

import nbformat
import papermill as pm
import pytest

from pruning_utils import glued
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
    # every number and figure the prose names was glued by the run (else the HTML build warns, or worse)
    prose = "\n".join(c.source for c in executed.cells if c.cell_type == "markdown")
    wanted = set(re.findall(r"\{glue(?::\w+)?\}`([^`:<]+)", prose)) | set(re.findall(r"\{glue:figure\} (\S+)", prose))
    missing = wanted - set(glued.read(SMOKE_DIR / path.name, figures=True))
    assert not missing, f"the prose names numbers the run did not glue: {sorted(missing)}"


# A chapter that trains what it needs, run again on an EMPTY checkpoint cache: its glued numbers must equal
# those of the smoke run above, which used the cache the earlier chapters filled. A result that depends
# on which chapter trained a model first (threads set before training, say) fails here.
EMPTY_CACHE_CHAPTER = "04_neuron_merging"


def test_glued_numbers_do_not_depend_on_the_cache_order(tmp_path, monkeypatch):
    from pruning_utils import glued

    path = next(p for p in CHAPTERS if p.stem == EMPTY_CACHE_CHAPTER)
    if not (SMOKE_DIR / path.name).exists():
        run_chapter(path, SMOKE_DIR, "smoke")
    monkeypatch.setenv("PRUNING_BOOK_CACHE", str(tmp_path / "empty-cache"))
    run_chapter(path, tmp_path / "out", "smoke")
    assert glued.read(tmp_path / "out" / path.name)  # it glued something
    assert glued.diff(SMOKE_DIR, tmp_path / "out", ignore=glued.TIMING, only=[path.stem]) == []


def test_unknown_parameter_stops_the_chapter(tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match=r"unknown parameter\(s\) 'sede' \(did you mean 'seeds'"):
        run_chapter(CHAPTERS[0], tmp_path, "smoke", extra={"sede": 1})


def test_bad_parameter_stops_the_chapter_with_a_clear_error(tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match=r"resnet_depth=21 is not allowed; expected one of 8, 14"):
        run_chapter(CHAPTERS[0], tmp_path, "smoke", extra={"resnet_depth": 21})


def test_chapter_2_full_path_dissects_resnet50_on_a_broden_folder(tmp_path, monkeypatch):
    """The full-size branch (torchvision's ResNet-50 on a real Broden folder) on a Broden-format fixture:
    our generated scenes, and random ResNet-50 weights in a file of our own (``resnet50_weights``)."""
    import torch
    import torchvision

    from pruning_utils import broden

    chapter = next(p for p in CHAPTERS if p.stem.startswith("02_"))
    folder = broden.generate(tmp_path / "broden", 0, 12, size=48, seed=0)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(pm.PapermillExecutionError, match="broden_dir=.*is not a folder"):
        run_chapter(chapter, tmp_path / "out", "smoke", extra={"broden_dir": str(tmp_path / "nowhere")})
    with pytest.raises(pm.PapermillExecutionError, match="download=False and the ResNet-50 weights are not at"):
        run_chapter(chapter, tmp_path / "out", "smoke", extra={"broden_dir": str(folder)})
    weights = tmp_path / "resnet50-random.pth"
    torch.save(torchvision.models.resnet50().state_dict(), weights)
    run_chapter(chapter, tmp_path / "out", "smoke", extra={"broden_dir": str(folder), "resnet50_weights": str(weights)})
    executed = nbformat.read(tmp_path / "out" / chapter.name, as_version=4)
    cell = next(c for c in executed.cells if c.cell_type == "code" and c.source.startswith("if P.broden_dir"))
    table = "".join(o.get("data", {}).get("text/plain", "") for o in cell.outputs)
    rows = [line.split() for line in table.split("\n\n")[0].splitlines() if re.match(r"^[0-9]+\s", line)]
    # smoke prunes to 64% of the weights: ResNet-50 unpruned, then two one-shot rounds of 20%
    assert "weights_remaining" in table and [r[0] for r in rows] == ["0", "1", "2"]
    assert [float(r[1]) for r in rows] == pytest.approx([1.0, 0.8, 0.64], abs=1e-3)


def test_chapter_2_stops_with_a_clear_message_when_a_dense_network_is_at_chance(tmp_path, monkeypatch):
    """A learning rate at which nothing is learned leaves the dense network at chance: the chapter must stop
    there (train.check_trained) instead of dissecting an untrained network."""
    chapter = next(p for p in CHAPTERS if p.stem.startswith("02_"))
    monkeypatch.setenv("PRUNING_BOOK_CACHE", str(tmp_path / "cache"))
    with pytest.raises(pm.PapermillExecutionError, match=r"UntrainedModel.*the dense ResNet-8 of seed 0.*within "
                                                         r"0.10 of chance"):
        run_chapter(chapter, tmp_path / "out", "smoke", extra={"lr": 1e-5, "epochs": 1, "images": 64})
