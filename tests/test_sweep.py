"""Sweeps on Dask distributed (a LocalCluster of 2 worker processes), on the tiny probe notebook."""
import json
from pathlib import Path

import pytest

from pruning_utils import sweep

PROBE = Path(__file__).parent / "notebooks" / "probe.ipynb"


@pytest.fixture(scope="module")
def client():
    from dask.distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("executed")


def test_values_are_parsed_as_yaml_literals():
    assert sweep.parse_value("[0]") == [0] and sweep.parse_value("0.5") == 0.5
    assert sweep.parse_value("true") is True and sweep.parse_value("None") is None
    assert sweep.parse_value("l2-GM") == "l2-GM"
    assert sweep.combinations({"a": [1, 2], "b": ["x", "y"]}) == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    with pytest.raises(ValueError, match="lists a value twice"):
        sweep.combinations({"a": [[0], [0]]})


def test_a_2x2_sweep_gives_a_4_row_table_and_a_figure_per_result(client, cache, tmp_path):
    result = sweep.sweep(PROBE, {"seeds": [[0], [1]], "scale": [1.0, 2.0]}, tmp_path, size="smoke",
                         client=client, cache=cache, log=lambda m: None)
    t = result.table
    assert len(t) == 4 and (t["status"] == "ok").all() and not t["cached"].any()
    expected = {(json.dumps(s), sc): sc * (s[0] + 1) for s in ([0], [1]) for sc in (1.0, 2.0)}
    got = {(json.dumps(r["param:seeds"]), r["param:scale"]): r["value"] for _, r in t.iterrows()}
    assert got == expected
    assert set(t["claim:probe_value"]) == {"inconclusive"}  # one seed per run: no interval
    assert (t["size_used"] == "smoke").all()
    names = {p.name for p in result.figures}
    assert {"value.png", "claim_probe_value_mean.png"} <= names and all(p.stat().st_size for p in result.figures)
    assert result.csv.read_text().count("\n") == 5  # header and 4 rows


def test_a_bad_value_is_reported_and_the_other_runs_kept(client, cache, tmp_path):
    result = sweep.sweep(PROBE, {"scale": [3.0, -1.0]}, tmp_path, size="smoke", client=client, cache=cache,
                         log=lambda m: None)
    t = result.table.set_index("param:scale")
    assert t.loc[3.0, "status"] == "ok" and t.loc[3.0, "value"] == 3.0
    assert t.loc[-1.0, "status"] == "failed" and "scale=-1.0 is not allowed" in t.loc[-1.0, "error"]
    assert len(result.failed) == 1 and Path(t.loc[-1.0, "output"]).exists()  # the partial notebook is kept


def test_a_rerun_executes_nothing(client, cache, tmp_path):
    grid = {"seeds": [[0], [1]], "scale": [1.0, 2.0]}
    first = sweep.sweep(PROBE, grid, tmp_path / "a", size="smoke", client=client, cache=cache,
                        figures=False, log=lambda m: None)
    entries = sorted(p.name for p in (cache / "probe").iterdir())
    again = sweep.sweep(PROBE, grid, tmp_path / "b", size="smoke", client=client, cache=cache,
                        figures=False, log=lambda m: None)
    assert again.table["cached"].all() and (again.table["status"] == "ok").all()
    assert sorted(p.name for p in (cache / "probe").iterdir()) == entries  # nothing stored anew
    assert list(again.table["value"]) == list(first.table["value"])


def test_unknown_parameter_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="has no parameter.*'ratio'"):
        sweep.sweep(PROBE, {"ratio": [0.5]}, tmp_path, client=object(), log=lambda m: None)
