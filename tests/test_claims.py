"""The claims module: every rule reaches each of its outcomes on hand-made estimates, intervals are the
textbook ones, and the claims page lists every claim of every executed chapter."""
import json
import math

import nbformat
import numpy as np
import pytest
from scipy.stats import t as student

from pruning_utils import claims, glued
from pruning_utils.claims import Above, Below, Between, Estimate, Verdict, combine


def est(lo, hi, mean=None):
    return Estimate((lo + hi) / 2 if mean is None else mean, lo, hi, 3)


NONE = Estimate(0.5, math.nan, math.nan, 1)
NAN = Estimate(math.nan, math.nan, math.nan, 0)


@pytest.mark.parametrize("rule,estimate,verdict", [
    (Above(0.0), est(0.01, 0.05), Verdict.HOLDS),
    (Above(0.0), est(-0.05, -0.01), Verdict.DOES_NOT_HOLD),
    (Above(0.0), est(-0.01, 0.05), Verdict.INCONCLUSIVE),
    (Above(0.0), est(-0.05, 0.0), Verdict.DOES_NOT_HOLD),  # an interval ending at the threshold is not above
    (Above(0.0), NONE, Verdict.INCONCLUSIVE),  # one seed, no interval: never a verdict
    (Above(0.0), NAN, Verdict.UNTESTABLE),
    (Below(0.8), est(0.5, 0.7), Verdict.HOLDS),
    (Below(0.8), est(0.85, 0.9), Verdict.DOES_NOT_HOLD),
    (Below(0.8), est(0.75, 0.85), Verdict.INCONCLUSIVE),
    (Below(0.8), NAN, Verdict.UNTESTABLE),
    (Between(0.79, 0.81), est(0.795, 0.805), Verdict.HOLDS),
    (Between(0.79, 0.81), est(0.70, 0.75), Verdict.DOES_NOT_HOLD),
    (Between(0.79, 0.81), est(0.85, 0.90), Verdict.DOES_NOT_HOLD),
    (Between(0.79, 0.81), est(0.78, 0.80), Verdict.INCONCLUSIVE),
    (Between(0.79, 0.81), est(0.70, 0.90), Verdict.INCONCLUSIVE),  # too wide to decide
    (Between(0.79, 0.81), NONE, Verdict.INCONCLUSIVE),
])
def test_each_rule_reaches_each_outcome(rule, estimate, verdict):
    assert rule.decide(estimate) is verdict


def test_between_needs_an_ordered_band():
    with pytest.raises(ValueError, match="lo <= hi"):
        Between(0.9, 0.1)


def test_combine_parts():
    H, D, I, U = Verdict.HOLDS, Verdict.DOES_NOT_HOLD, Verdict.INCONCLUSIVE, Verdict.UNTESTABLE
    assert combine([H, H]) is H
    assert combine([H, I]) is I
    assert combine([H, I, D]) is D
    assert combine([U, H]) is H  # an untestable part (e.g. a layer not run) does not decide
    assert combine([U, U]) is U and combine([]) is U


def test_t_interval_over_seeds_is_the_textbook_one():
    e = Estimate.over_seeds([0.90, 0.92, 0.94])
    # mean 0.92, s = 0.02, t(0.975, 2) = 4.3027: half width 0.02 * 4.3027 / sqrt(3) = 0.04968
    assert e.mean == pytest.approx(0.92) and e.n == 3
    assert (e.hi - e.mean) == pytest.approx(0.0496836, rel=1e-4) and (e.mean - e.lo) == pytest.approx(0.0496836, rel=1e-4)
    one = Estimate.over_seeds([0.9])
    assert not one.has_interval and "no interval" in one.text()
    with pytest.raises(ValueError, match="NaN or infinity"):
        Estimate.over_seeds([0.9, float("nan")])
    with pytest.raises(ValueError, match="at least one value"):
        Estimate.over_seeds([])


def test_paired_and_proportion_and_paired_images():
    p = Estimate.paired([0.9, 0.8, 0.7], [0.85, 0.76, 0.64])
    assert p.mean == pytest.approx(0.05) and p.n == 3
    with pytest.raises(ValueError, match="same seeds"):
        Estimate.paired([1, 2], [1])
    w = Estimate.proportion(90, 100)  # Wilson: 0.9 on 100 items -> [0.8256, 0.9448]
    assert w.mean == 0.9 and w.lo == pytest.approx(0.8256, abs=1e-3) and w.hi == pytest.approx(0.9448, abs=1e-3)
    a = np.array([1, 1, 1, 0, 1, 1, 0, 1] * 50)
    b = np.array([1, 0, 1, 0, 1, 0, 0, 1] * 50)
    d = Estimate.paired_images(a, b)
    assert d.mean == pytest.approx(0.25) and d.lo < 0.25 < d.hi and d.n == 400
    same = Estimate.paired_images(a, a)
    assert same.mean == 0 and same.lo == same.hi == 0  # identical predictions: no difference at all


def test_text_of_an_estimate():
    assert Estimate.over_seeds([1.0, 3.0]).text(".1f").startswith("2.0 ± 12.7 (n = 2)")
    assert Estimate(0.5, 0.4, 0.7, 5).text(".1f") == "0.5 [0.4, 0.7] (n = 5)"
    assert NAN.text() == "not measured"


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(claims, "CLAIMS", {})
    claims.declare("t.gain", "99_test", "t-claims", "boosting beats one tree", "+0.10", "accuracy gain",
                   Above(0.0), parts="layer")
    claims.declare("t.acc", "99_test", "t-claims", "accuracy near the paper's", "0.99", "test accuracy",
                   Between(0.98, 1.0))
    return claims.CLAIMS


def test_declare_decide_and_json(registry):
    with pytest.raises(ValueError, match="declared twice"):
        claims.declare("t.acc", "99_test", "x", "s", "p", "m", Above(0))
    r1 = claims.decide("t.gain", {"conv1": est(0.01, 0.03), "conv2": est(-0.01, 0.02)})
    assert r1.verdict is Verdict.INCONCLUSIVE
    assert r1.part_verdicts == {"conv1": Verdict.HOLDS, "conv2": Verdict.INCONCLUSIVE}
    r2 = claims.decide("t.acc", Estimate.over_seeds([0.989, 0.99, 0.991]))  # 0.99 ± 0.0025
    r3 = claims.untestable("t.acc", "no MNIST here")
    assert r3.verdict is Verdict.UNTESTABLE and r3.note == "no MNIST here"
    rows = json.loads(claims.to_json([r1, r2]))
    assert [r["verdict"] for r in rows] == ["inconclusive", "holds"]
    assert rows[0]["parts"]["conv2"]["verdict"] == "inconclusive"
    assert rows[1]["estimate"]["n"] == 3 and "interval inside [0.98, 1]" in rows[1]["rule"]
    table = claims.table([r1, r2, r3]).data
    assert list(table["verdict"]) == ["inconclusive", "holds", "cannot be tested here"]


def _executed_chapter(path, results, title="# 9. A test chapter"):
    nb = nbformat.v4.new_notebook()
    out = nbformat.v4.new_output("display_data", data={"application/papermill.record/text/plain":
                                                       repr(claims.to_json(results))},
                                 metadata={"scrapbook": {"name": "claims",
                                                         "mime_prefix": "application/papermill.record/"}})
    cell = nbformat.v4.new_code_cell("claims.publish(results)")
    cell.outputs = [out]
    nb.cells = [nbformat.v4.new_markdown_cell(title), cell]
    nbformat.write(nb, path)


def test_claims_page_lists_every_claim_of_every_executed_chapter(registry, tmp_path):
    r1 = claims.decide("t.gain", {"conv1": est(0.01, 0.03)})
    r2 = claims.decide("t.acc", est(0.90, 0.95))
    _executed_chapter(tmp_path / "98_first.ipynb", [r1])
    _executed_chapter(tmp_path / "99_second.ipynb", [r2], "# 10. Another")
    (tmp_path / "notes.ipynb").write_text("{}")  # not a chapter: ignored
    page = claims.write_page(tmp_path).read_text()
    assert page.count("{ref}`t-claims`") == 2
    assert "## 9. A test chapter" in page and "## 10. Another" in page
    assert "boosting beats one tree" in page and "**holds**" in page and "**does not hold**" in page
    assert "2 claims, 1 holds, 1 does not hold" in page
    assert glued.read(tmp_path / "98_first.ipynb")["claims"] == claims.to_json([r1])


def test_every_declared_claim_names_a_chapter_and_a_rule():
    from pruning_utils import presets

    for c in claims.CLAIMS.values():
        assert c.chapter in presets.NOTEBOOKS, f"{c.key}: unknown chapter {c.chapter}"
        assert c.section and c.statement and c.paper and c.measure
        assert isinstance(c.rule, (Above, Below, Between))


def test_crossed_interval_counts_seeds_and_images():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 2, 400).astype(float)
    same = np.stack([images, images, images])  # three seeds that agree: only the image term remains
    e = Estimate.crossed(same)
    se = images.std(ddof=1) / np.sqrt(400)
    assert e.mean == pytest.approx(images.mean()) and (e.hi - e.mean) == pytest.approx(1.966 * se, rel=1e-2)
    spread = same + np.array([[0.1], [0.0], [-0.1]])  # seeds that disagree widen it
    wide = Estimate.crossed(spread)
    se2 = spread.mean(1).var(ddof=1) / 3 + spread.mean(0).var(ddof=1) / 400
    ratio = (wide.hi - wide.mean) / np.sqrt(se2)  # Student's t between df = 2 (4.30) and infinity (1.96)
    assert 1.96 < ratio < 4.31 and (wide.hi - wide.lo) > 4 * (e.hi - e.lo)
    a = np.ones((3, 50))
    assert Estimate.paired_crossed(a, a).text(".2f") == "0.00 ± 0.00 (n = 3)"
    with pytest.raises(ValueError, match="same seeds and images"):
        Estimate.paired_crossed(a, a[:, :10])
    with pytest.raises(ValueError, match="finite"):
        Estimate.crossed(np.array([[np.nan, 1.0]]))


def test_crossed_reduces_to_the_t_interval_of_each_source_alone():
    seeds_only = np.repeat(np.array([[0.6], [0.7], [0.9]]), 50, axis=1)  # images identical within a seed
    e = Estimate.crossed(seeds_only)
    ref = Estimate.over_seeds([0.6, 0.7, 0.9])
    assert e.mean == pytest.approx(ref.mean) and e.lo == pytest.approx(ref.lo) and e.hi == pytest.approx(ref.hi)
    images_only = np.tile(np.arange(40) % 2, (3, 1)).astype(float)  # seeds identical
    e = Estimate.crossed(images_only)
    v = images_only[0]
    half = student.ppf(0.975, 39) * v.std(ddof=1) / np.sqrt(40)
    assert e.mean == pytest.approx(0.5) and e.hi - e.mean == pytest.approx(half)
    assert Estimate.crossed(np.ones((3, 10))).lo == 1.0  # no variance, no width
    with pytest.raises(ValueError, match="finite"):
        Estimate.crossed(np.array([[np.nan, 1.0]]))


def test_paired_is_the_crossed_interval_of_the_differences():
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 200)) < 0.8, rng.random((3, 200)) < 0.6
    d = Estimate.paired_crossed(a, b)
    ref = Estimate.crossed(a.astype(float) - b)
    assert (d.mean, d.lo, d.hi) == (ref.mean, ref.lo, ref.hi) and d.lo > 0
    assert Estimate.paired_crossed(b, a).mean == pytest.approx(-d.mean)
    with pytest.raises(ValueError, match="same seeds and images"):
        Estimate.paired_crossed(a, b[:2])


def test_glued_diff_sets_aside_the_numbers_of_timed_claims_only(registry, tmp_path):
    claims.declare("t.fast", "99_test", "t-claims", "pruning is faster", "", "latency drop", Above(0.1),
                   timed=True)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()

    def build(where, fast, acc):
        nan = Estimate(math.nan, math.nan, math.nan, 0, "not measured")
        results = [claims.decide("t.fast", est(*fast)), claims.decide("t.acc", est(*acc)),
                   claims.decide("t.gain", {"conv1": nan})]
        _executed_chapter(where / "99_test.ipynb", results)

    build(a, (0.30, 0.32), (0.985, 0.99))
    build(b, (0.40, 0.42), (0.985, 0.99))  # another load: other latencies, the same verdict, NaN == NaN
    assert glued.diff(a, b, ignore=glued.TIMING) == []
    assert len(glued.diff(a, b)) == 1  # with the timings, they differ
    build(b, (0.05, 0.08), (0.985, 0.99))  # a timed verdict that flips is a difference
    assert len(glued.diff(a, b, ignore=glued.TIMING)) == 1
    build(b, (0.30, 0.32), (0.985, 0.991))  # any result number that moves is a difference
    assert len(glued.diff(a, b, ignore=glued.TIMING)) == 1
