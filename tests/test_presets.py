"""Each parameter is declared once (presets.py): the notebooks' parameters cells are generated from it,
and presets.start stops a chapter on any parameter name it does not declare."""
import json
import types

import pytest
import torch

from pruning_utils import presets
from pruning_utils.chapters import NOTEBOOKS as NOTEBOOK_DIR
from pruning_utils.params import ParameterError


@pytest.mark.parametrize("stem,chapter", sorted(presets.NOTEBOOKS.items()))
def test_parameters_cell_is_the_generated_one(stem, chapter):
    nb = json.loads((NOTEBOOK_DIR / f"{stem}.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    assert "".join(cell["source"]) == presets.parameters_cell(chapter), \
        "run `python -m pruning_utils.presets` after editing presets.py"
    names = [line.split(" = ")[0] for line in "".join(cell["source"]).splitlines() if " = None" in line]
    assert names == list(presets.CHAPTERS[chapter][0])  # the same names, in the same order
    lines = "".join(cell["source"]).splitlines()
    assert len(lines) <= 25, f"{len(lines) - 1} parameters: a chapter declares at most 24"
    too_long = [line for line in lines if len(line) > 100]
    assert not too_long, f"shorten these parameters' docs in presets.py: {too_long}"


def test_every_chapter_notebook_is_known():
    stems = {p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb")}
    assert stems == set(presets.NOTEBOOKS)


def test_generated_cell_states_each_preset():
    text = presets.parameters_cell("baselines")
    assert text.startswith('size = "default"  # run size: ')
    assert "seeds = None  # " in text and "; preset [0]" in text
    assert "resnet_depth = None  # depth of the CIFAR ResNet; one of 8, 14, 20, 32, 56, or None; preset None" in text


def _namespace(**values):
    ns = {"__name__": "__main__", "In": [], "Out": {}, "np": types.ModuleType("numpy"), "glue": print,
          "_": None, "size": "smoke"}
    ns.update(values)
    return ns


def test_start_resolves_validates_and_fixes_threads():
    before = torch.get_num_threads()
    try:
        P = presets.start("baselines", _namespace(seeds=None, threads=1, resnet_depth=8))
        assert (P.size, P.seeds, P.seed, P.threads, P.resnet_depth) == ("smoke", [0], 0, 1, 8)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_start_stops_on_an_unknown_name_and_names_the_closest():
    with pytest.raises(ParameterError, match=r"unknown parameter\(s\) 'sede' \(did you mean 'seeds'"):
        presets.start("baselines", _namespace(sede=1))
    with pytest.raises(ParameterError, match="the parameters cell must set size"):
        presets.start("baselines", {k: v for k, v in _namespace().items() if k != "size"})
    with pytest.raises(ParameterError, match="chapter='nope' is not allowed"):
        presets.start("nope", _namespace())


def test_parameter_table_shows_long_values_whole():
    from pruning_utils import presets

    P = presets.chapter_params("causal_pruning", "default")
    html = presets.table(P).to_html()
    assert ", ".join(P.resnet_blocks) in html and "..." not in html
