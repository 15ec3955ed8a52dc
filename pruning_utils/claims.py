"""Claims as data: each paper's claims declared once, measured over seeds, decided by tested rules.

A :class:`Claim` holds the paper's statement and number (from :mod:`pruning_utils.reference`), what we
measure, and the :class:`Rule` that decides it, with its constants named, fixed here before any result
is seen. A chapter measures the quantity over seeds (an :class:`Estimate`: mean, 95% interval, n) and
calls :func:`decide`; the verdict is one of :class:`Verdict`: holds, does not hold, inconclusive (the
interval straddles the threshold), or cannot be tested here. :func:`publish` shows the table and glues
the results into the executed notebook, from which :func:`write_page` builds the book's claims page.

Every rule can come out either way: "holds" needs the whole interval on the paper's side of the
threshold, "does not hold" the whole interval on the other side.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

LEVEL = 0.95  # every interval in the book is a 95% interval


class Verdict(str, Enum):
    """The four outcomes of a claim."""

    HOLDS = "holds"
    DOES_NOT_HOLD = "does not hold"
    INCONCLUSIVE = "inconclusive"
    UNTESTABLE = "cannot be tested here"


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(float(x))


@dataclass(frozen=True)
class Estimate:
    """A measured quantity: its mean, a ``LEVEL`` interval [lo, hi] (NaN where none can be computed, e.g.
    from one seed), the number of independent values ``n`` behind it, and how the interval was made."""

    mean: float
    lo: float
    hi: float
    n: int
    method: str = "t over seeds"
    values: tuple[float, ...] = ()

    @classmethod
    def over_seeds(cls, values: Sequence[float], level: float = LEVEL) -> "Estimate":
        """Mean of per-seed values and Student's t interval, mean ± t(n-1) s / sqrt(n); no interval
        (NaN) from a single value. Non-finite values are an error: a NaN must not pass as a number."""
        v = np.asarray(list(values), dtype=float)
        if v.size == 0:
            raise ValueError("an estimate needs at least one value")
        if not np.isfinite(v).all():
            raise ValueError(f"values {v.tolist()} hold NaN or infinity")
        mean = float(v.mean())
        if v.size == 1:
            return cls(mean, math.nan, math.nan, 1, "one seed: no interval", tuple(v.tolist()))
        from scipy.stats import t

        half = float(t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
        return cls(mean, mean - half, mean + half, int(v.size), "t over seeds", tuple(v.tolist()))

    @classmethod
    def paired(cls, a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> "Estimate":
        """The per-seed difference a - b (paired: same seed, same test images), over seeds."""
        a, b = np.asarray(list(a), float), np.asarray(list(b), float)
        if a.shape != b.shape:
            raise ValueError(f"paired values need the same seeds: {a.shape} vs {b.shape}")
        return cls.over_seeds(a - b, level)

    @classmethod
    def paired_images(cls, correct_a: np.ndarray, correct_b: np.ndarray, level: float = LEVEL) -> "Estimate":
        """Accuracy difference of two models on the same test images, from per-image correctness (0/1,
        shape (..., images); leading axes are averaged first): mean difference ± z * SE of the paired
        per-image differences, the standard error of the comparison itself."""
        a = np.asarray(correct_a, float).reshape(-1, np.shape(correct_a)[-1]).mean(0)
        b = np.asarray(correct_b, float).reshape(-1, np.shape(correct_b)[-1]).mean(0)
        d = a - b
        from scipy.stats import norm

        half = float(norm.ppf(0.5 + level / 2) * d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.nan
        return cls(float(d.mean()), float(d.mean()) - half, float(d.mean()) + half, int(d.size),
                   "paired over test images")

    @classmethod
    def crossed(cls, values: np.ndarray, level: float = LEVEL) -> "Estimate":
        """Mean of per-(seed, image) values (S, N) with an interval that counts both sources of variance,
        seeds and test images crossed: SE^2 = var(seed means) / S + var(image means) / N (slightly
        conservative), Student's t with Welch-Satterthwaite degrees of freedom. With one seed only the
        image term remains (say so: the seeds then cover nothing)."""
        from scipy.stats import t

        v = np.asarray(values, dtype=float)
        if v.ndim != 2 or v.size == 0 or not np.isfinite(v).all():
            raise ValueError(f"crossed needs a finite (seeds, images) array; got shape {v.shape}")
        s, n = v.shape
        mean = float(v.mean())
        a = v.mean(1).var(ddof=1) / s if s > 1 else 0.0
        b = v.mean(0).var(ddof=1) / n if n > 1 else 0.0
        se2 = a + b
        method = f"{s} seeds x {n} test images, crossed"
        if se2 == 0:
            return cls(mean, mean, mean, s, method)
        df = se2 ** 2 / ((a * a / (s - 1) if s > 1 else 0.0) + (b * b / (n - 1) if n > 1 else 0.0))
        half = float(t.ppf(0.5 + level / 2, df) * math.sqrt(se2))
        return cls(mean, mean - half, mean + half, s, method)

    @classmethod
    def paired_crossed(cls, correct_a: np.ndarray, correct_b: np.ndarray, level: float = LEVEL) -> "Estimate":
        """Accuracy difference a - b of two methods on the same seeds and the same test images, from
        per-(seed, image) correctness (S, N): :meth:`crossed` of the paired differences, the standard error
        at the pruned accuracies with both seeds and images counted."""
        a, b = np.asarray(correct_a, float), np.asarray(correct_b, float)
        if a.shape != b.shape:
            raise ValueError(f"paired values need the same seeds and images: {a.shape} vs {b.shape}")
        return cls.crossed(np.atleast_2d(a - b), level)

    @classmethod
    def proportion(cls, successes: int, n: int, level: float = LEVEL) -> "Estimate":
        """A share measured on ``n`` independent items (e.g. one model's accuracy on n test images), with
        Wilson's score interval."""
        if n <= 0:
            raise ValueError("a proportion needs n >= 1")
        from scipy.stats import norm

        z = float(norm.ppf(0.5 + level / 2))
        p = successes / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return cls(p, centre - half, centre + half, n, "Wilson over items")

    @classmethod
    def bootstrap(cls, point: float, samples: Sequence[float], n: int, level: float = LEVEL,
                  method: str = "percentile bootstrap") -> "Estimate":
        """A point estimate with the percentile interval of its bootstrap ``samples``."""
        s = np.asarray(list(samples), float)
        lo, hi = np.quantile(s, [0.5 - level / 2, 0.5 + level / 2]) if s.size else (math.nan, math.nan)
        return cls(float(point), float(lo), float(hi), int(n), method)

    @property
    def has_interval(self) -> bool:
        return _finite(self.lo) and _finite(self.hi)

    def text(self, fmt: str = ".3f") -> str:
        """'0.912 ± 0.010 (n = 3)', or '0.912 [0.890, 0.925] (n = 3)' for an asymmetric interval."""
        if not _finite(self.mean):
            return "not measured"
        if not self.has_interval:
            return f"{self.mean:{fmt}} (n = {self.n}, no interval)"
        lo, hi = self.mean - self.lo, self.hi - self.mean
        if abs(lo - hi) <= 1e-9 * max(1.0, abs(self.mean)):
            return f"{self.mean:{fmt}} ± {hi:{fmt}} (n = {self.n})"
        return f"{self.mean:{fmt}} [{self.lo:{fmt}}, {self.hi:{fmt}}] (n = {self.n})"

    def to_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n, "method": self.method}


class Rule:
    """How a claim is decided from an :class:`Estimate`."""

    def decide(self, est: Estimate) -> Verdict:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError


def _untestable_or_none(est: Estimate | None) -> Verdict | None:
    if est is None or not _finite(est.mean):
        return Verdict.UNTESTABLE
    if not est.has_interval:
        return Verdict.INCONCLUSIVE
    return None


@dataclass(frozen=True)
class _OneSided(Rule):
    """A threshold and a side: holds when the whole interval lies on that side, does not hold when it lies
    wholly on the other (the threshold itself counts as the other side), inconclusive when it straddles.
    ``what`` names the threshold in words."""

    threshold: float
    what: str = ""
    SIDE = "above"  # or "below"

    def decide(self, est):
        early = _untestable_or_none(est)
        if early is not None:
            return early
        if self.SIDE == "above":
            lo, hi, t = est.lo, est.hi, self.threshold
        else:  # "below t" is "above -t" for the negated interval
            lo, hi, t = -est.hi, -est.lo, -self.threshold
        if lo > t:
            return Verdict.HOLDS
        if hi <= t:
            return Verdict.DOES_NOT_HOLD
        return Verdict.INCONCLUSIVE

    def describe(self):
        return f"interval {self.SIDE} {self.threshold:g}" + (f" ({self.what})" if self.what else "")


class Above(_OneSided):
    """Holds when the whole interval lies above ``threshold`` (see :class:`_OneSided`)."""

    SIDE = "above"


class Below(_OneSided):
    """Holds when the whole interval lies below ``threshold`` (see :class:`_OneSided`)."""

    SIDE = "below"


@dataclass(frozen=True)
class Between(Rule):
    """Holds when the whole interval lies inside [lo, hi] (e.g. 'within 0.01 of the paper'); does not
    hold when it lies wholly outside; inconclusive otherwise."""

    lo: float
    hi: float
    what: str = ""

    def __post_init__(self):
        if not self.lo <= self.hi:
            raise ValueError(f"Between needs lo <= hi, got {self.lo} > {self.hi}")

    def decide(self, est):
        early = _untestable_or_none(est)
        if early is not None:
            return early
        if self.lo <= est.lo and est.hi <= self.hi:
            return Verdict.HOLDS
        if est.hi < self.lo or est.lo > self.hi:
            return Verdict.DOES_NOT_HOLD
        return Verdict.INCONCLUSIVE

    def describe(self):
        return f"interval inside [{self.lo:g}, {self.hi:g}]" + (f" ({self.what})" if self.what else "")


def combine(verdicts: Sequence[Verdict]) -> Verdict:
    """A claim made of parts ('at every layer'): holds if every testable part holds; does not hold if any
    part does not; inconclusive otherwise; cannot be tested if no part can."""
    vs = [v for v in verdicts if v is not Verdict.UNTESTABLE]
    if not vs:
        return Verdict.UNTESTABLE
    if any(v is Verdict.DOES_NOT_HOLD for v in vs):
        return Verdict.DOES_NOT_HOLD
    if all(v is Verdict.HOLDS for v in vs):
        return Verdict.HOLDS
    return Verdict.INCONCLUSIVE


@dataclass(frozen=True)
class Claim:
    """One claim of one paper, declared once: where it lives (chapter stem and the MyST label of its
    section), the paper's statement and number, what we measure, and the rule that decides it."""

    key: str
    chapter: str
    section: str
    statement: str
    paper: str
    measure: str
    rule: Rule
    parts: str = ""  # for claims made of parts ("every layer"): what a part is; the rule applies to each
    timed: bool = False  # decided on a measured time: its number moves with the machine's load, not its verdict


@dataclass(frozen=True)
class Result:
    """A decided claim: the verdict, the estimate (or one per part) and a note (why a number differs,
    which sources of variance the seeds cover)."""

    claim: Claim
    verdict: Verdict
    estimate: Estimate | None = None
    parts: Mapping[str, Estimate] = field(default_factory=dict)
    part_verdicts: Mapping[str, Verdict] = field(default_factory=dict)
    note: str = ""
    fmt: str = ".3f"

    def ours(self) -> str:
        """Our number(s) in words: mean ± interval (n), per part where the claim has parts."""
        if self.parts:
            return "; ".join(f"{name}: {e.text(self.fmt)}" for name, e in self.parts.items())
        if self.estimate is None:
            return "not measured"
        return self.estimate.text(self.fmt)

    def to_dict(self) -> dict:
        c = self.claim
        return {"key": c.key, "chapter": c.chapter, "section": c.section, "statement": c.statement,
                "paper": c.paper, "measure": c.measure, "rule": c.rule.describe(), "parts_are": c.parts,
                "timed": c.timed,
                "verdict": self.verdict.value, "ours": self.ours(), "note": self.note,
                "estimate": self.estimate.to_dict() if self.estimate is not None else None,
                "parts": {k: {**e.to_dict(), "verdict": self.part_verdicts.get(k, Verdict.UNTESTABLE).value}
                          for k, e in self.parts.items()}}


CLAIMS: dict[str, Claim] = {}


def declare(key: str, chapter: str, section: str, statement: str, paper: str, measure: str, rule: Rule,
            parts: str = "", timed: bool = False) -> Claim:
    """Add a claim to the registry (each key once); ``timed`` for one decided on a measured time."""
    if key in CLAIMS:
        raise ValueError(f"claim {key!r} is declared twice")
    CLAIMS[key] = Claim(key, chapter, section, statement, paper, measure, rule, parts, timed)
    return CLAIMS[key]


def of_chapter(chapter: str) -> list[Claim]:
    """The claims of one chapter (notebook stem), in declaration order."""
    return [c for c in CLAIMS.values() if c.chapter == chapter]


def decide(key: str, estimate: Estimate | Mapping[str, Estimate] | None, note: str = "",
           fmt: str = ".3f") -> Result:
    """Decide claim ``key`` by its rule: on one estimate, or on each part of a mapping (then
    :func:`combine`). ``None`` (nothing measured) gives "cannot be tested here"; say why in ``note``."""
    claim = CLAIMS[key]
    if estimate is None:
        return Result(claim, Verdict.UNTESTABLE, None, note=note, fmt=fmt)
    if isinstance(estimate, Mapping):
        if not estimate:
            return Result(claim, Verdict.UNTESTABLE, None, note=note, fmt=fmt)
        part_verdicts = {name: claim.rule.decide(e) for name, e in estimate.items()}
        return Result(claim, combine(list(part_verdicts.values())), None, dict(estimate), part_verdicts,
                      note, fmt)
    return Result(claim, claim.rule.decide(estimate), estimate, note=note, fmt=fmt)


def untestable(key: str, why: str) -> Result:
    """A claim that this run cannot test, with the reason."""
    return decide(key, None, note=why)


def _label(key: str) -> str:
    return "verdict_" + re.sub(r"[^0-9a-zA-Z_]", "_", key)


def table(results: Sequence[Result]):
    """The claims table of a chapter: claim, paper, ours (mean ± 95% interval, n), verdict, the rule, and
    the note. A Styler, so that the rendered table shows every cell whole."""
    import pandas as pd

    rows = [{"claim": r.claim.statement, "paper": r.claim.paper, "ours": r.ours(), "verdict": r.verdict.value,
             "rule (fixed in advance)": f"{r.claim.measure}: {r.claim.rule.describe()}"
                                        + (f", for every {r.claim.parts}" if r.claim.parts else ""),
             "note": r.note} for r in results]
    colours = {Verdict.HOLDS.value: "#d8f0d8", Verdict.DOES_NOT_HOLD.value: "#f6d5d5",
               Verdict.INCONCLUSIVE.value: "#f7ecc8", Verdict.UNTESTABLE.value: "#e6e6e6"}
    df = pd.DataFrame(rows, columns=["claim", "paper", "ours", "verdict", "rule (fixed in advance)", "note"])
    return (df.set_index("claim").style
            .map(lambda v: f"background-color: {colours.get(v, '')}", subset=["verdict"])
            .set_properties(**{"text-align": "left", "white-space": "normal"}))


def to_json(results: Sequence[Result]) -> str:
    """The results as JSON (NaN allowed), the form glued into executed notebooks."""
    return json.dumps([r.to_dict() for r in results], allow_nan=True)


def publish(results: Sequence[Result]):
    """Glue the chapter's results into the executed notebook (``claims`` as JSON, and each verdict as
    ``verdict_<key>`` for the prose), and return :func:`table` for display."""
    from myst_nb import glue

    keys = [r.claim.key for r in results]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a claim is published twice: {keys}")
    glue("claims", to_json(results), display=False)
    for r in results:
        glue(_label(r.claim.key), r.verdict.value, display=False)
    return table(results)


def read_results(notebook: str | Path) -> list[dict]:
    """The claims glued into an executed notebook (empty if it glued none)."""
    from .glued import read

    text = read(notebook).get("claims")
    return json.loads(text) if text else []


def write_page(executed_dir: str | Path, out: str | Path | None = None) -> Path:
    """The book's claims page, built from the executed chapters in ``executed_dir``: one table per chapter
    (claim, paper, ours, verdict, a link to the chapter's section) and a count of verdicts."""
    executed_dir = Path(executed_dir)
    out = Path(out) if out is not None else executed_dir / "claims.md"
    chapters = sorted(p for p in executed_dir.glob("[0-9][0-9]_*.ipynb"))
    counts = {v.value: 0 for v in Verdict}
    blocks = []
    for nb in chapters:
        results = read_results(nb)
        if not results:
            continue
        title = _title(nb)
        blocks += [f"## {title}", "",
                   "| claim | paper | ours (mean ± 95% interval, n) | verdict | section |", "|---|---|---|---|---|"]
        for r in results:
            counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
            cells = [r["statement"], r["paper"], r["ours"], f"**{r['verdict']}**", f"{{ref}}`{r['section']}`"]
            blocks.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        blocks.append("")
    total = sum(counts.values())
    summary = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    lines = ["(claims-page)=", "# Every claim and its verdict", "",
             "Each chapter decides the claims of its paper over seeds, by a rule written down before the "
             "run (see the chapter's claims section for the rule and a note on each number). A claim "
             "**holds** when the whole 95% interval lies on the paper's side of the rule's threshold, "
             "**does not hold** when it lies wholly on the other side, and is **inconclusive** when the "
             "interval straddles it; some claims **cannot be tested here** (the data or the model the "
             "paper used is out of reach). This page is generated from the executed chapters; nothing on "
             "it is typed by hand.", "",
             f"In this build: {total} claims, {summary or 'none'}.", "", *blocks]
    out.write_text("\n".join(lines) + "\n")
    return out


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _title(nb: Path) -> str:
    nbj = json.loads(nb.read_text())
    for cell in nbj["cells"]:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return nb.stem


# --- chapter 1 (paper 000) ---
# Constants of the rules, fixed before any run. Accuracies on MNIST-5k's 1,000 test digits carry a standard
# error of about 0.01-0.015, so a difference under 0.05 is about what one figure could not tell apart.
DT_TABLE1_TOLERANCE = 0.05  # "reproduces a Table 1 accuracy": the interval within 0.05 of it
DT_MARGIN_BAND = (0.5, 2.0)  # "by about the paper's margin": our gap within a factor of two of the paper's
DT_NO_GAP = 0.05  # Fig. 4 "no improvement" at conv1: mean best-minus-worst gap below 0.05
DT_MARGINAL = 0.5  # Fig. 4 "marginal" at conv2 beside "drastic" at conv3: conv2's gap under half of conv3's
DT_DRASTIC = 0.15  # Fig. 4 "drastic difference" at conv3: mean gap above 0.15
DT_KEPT = 0.75  # "maintains around 0.80" with over 90% of the features removed: the interval above 0.75
DT_LENET5_TOLERANCE = 0.01  # LeNet5 "achieves 0.9907": the interval above 0.9807
DT_NONINFERIOR = 0.02  # gain ranks the CNN's filters "as well as" L1: at most 0.02 lower accuracy


def _declare_decision_trees() -> None:
    from . import reference

    ref = reference.DECISION_TREES
    where = ("01_decision_tree_pruning", "dt-claims")
    single = " / ".join(f"{v:.4g}" for v in ref["single"].values())
    boosted = " / ".join(f"{v:.4g}" for v in ref["xgboost"].values())
    gaps = " / ".join(f"{ref['xgboost'][k] - ref['single'][k]:+.3f}" for k in ref["single"])
    readings = {"xgboost": "one XGBoost round", "cart": "one CART tree"}
    declare("dt-lenet5", *where, "LeNet5 reaches 0.9907 test accuracy (Table 1 caption)",
            f"{ref['lenet5_acc']} (MNIST, 60,000 training digits)", "LeNet5's test accuracy",
            Above(round(ref["lenet5_acc"] - DT_LENET5_TOLERANCE, 4), f"within {DT_LENET5_TOLERANCE} of 0.9907"))
    for r, name in readings.items():
        declare(f"dt-table1-{r}", *where, f"A single tree on mean filter scores reaches Table 1's accuracies "
                f"(single tree read as {name})", f"conv1 / conv2 / conv3: {single}",
                "single-tree test accuracy minus the paper's",
                Between(-DT_TABLE1_TOLERANCE, DT_TABLE1_TOLERANCE, "within 0.05 of the paper"), parts="layer")
    declare("dt-table1-boosted", *where, f"XGBoost ({ref['n_estimators']} rounds) reaches Table 1's accuracies",
            f"conv1 / conv2 / conv3: {boosted}", "XGBoost test accuracy minus the paper's",
            Between(-DT_TABLE1_TOLERANCE, DT_TABLE1_TOLERANCE, "within 0.05 of the paper"), parts="layer")
    for r, name in readings.items():
        declare(f"dt-margin-{r}", *where, "XGBoost beats a single tree at every layer, by about the paper's "
                f"margin (Table 1; single tree read as {name})", f"gaps {gaps}",
                "(XGBoost accuracy - single-tree accuracy) / the paper's gap at that layer",
                Between(*DT_MARGIN_BAND, "within a factor of two of the paper's gap"), parts="layer")
    declare("dt-depth", *where, "Accuracy grows with depth, conv1 < conv2 < conv3, for the single tree and "
            "for XGBoost (Table 1)", f"{single}; {boosted}",
            "accuracy at the deeper layer minus at the shallower one, paired on the test images",
            Above(0.0, "the deeper layer is better"), parts="model and pair of adjacent layers")
    for r, name in readings.items():
        declare(f"dt-fig4-{r}", *where, "Best- and worst-case pruning differ not at all at conv1, marginally at "
                f"conv2 and drastically at conv3 (Fig. 4; single tree read as {name})",
                "no improvement / marginal / drastic (read off Fig. 4)",
                f"margin of the mean best-minus-worst gap to the paper's words: conv1 {DT_NO_GAP} - gap; conv2 "
                f"{DT_MARGINAL} x conv3's gap - conv2's gap; conv3 gap - {DT_DRASTIC}",
                Above(0.0, "on the paper's side of each bound"), parts="layer")
    for r, name in readings.items():
        declare(f"dt-kept-{r}", *where, "At conv3 a single tree keeps about 0.80 accuracy with over 90% of the "
                f"features removed (Fig. 4; single tree read as {name})", f"about {ref['kept_acc']:.2f}",
                "best-case accuracy at the fewest removals above 90% of conv3's features",
                Above(DT_KEPT, "at least about 0.80"))
    declare("dt-aggregation", *where, "The mean loses information that the max or the top-k mean keeps: "
            "another aggregation raises the trees' accuracy at conv1 and conv2 (Sec. 3, future work)",
            "suggested, not measured", "XGBoost accuracy on top-k-mean scores minus on mean scores",
            Above(0.0, "the top-k mean is better"), parts="layer with maps larger than 1x1")
    declare("dt-cnn-random", *where, "Pruning the CNN's filters by tree gain is a promising strategy: it beats "
            "random rankings (Sec. 5, future work)", "proposed, not measured",
            "CNN accuracy after pruning by gain minus by random rankings, mean over the target fractions, paired "
            "on the test images", Above(0.0, "gain is better than chance"), parts="layer and fine-tuning")
    declare("dt-cnn-l1", *where, "Pruning the CNN's filters by tree gain is as good as by the L1 norm of the "
            "weights (Sec. 5, future work; L1 is the standard cheap criterion)", "proposed, not measured",
            "CNN accuracy after pruning by gain minus by L1, mean over the target fractions, paired on the test "
            "images", Above(-DT_NONINFERIOR, f"no more than {DT_NONINFERIOR} below L1"),
            parts="layer and fine-tuning")


_declare_decision_trees()


# --- chapter 2 (paper 001) ---
def _declare_dissection() -> None:
    from . import reference

    ref = reference.DISSECTION
    where = ("02_dissecting_pruned_networks", "dis-claims")
    paired = "interpretable units of each dense trained network minus those of its random-init null (paired by seed)"
    declare("dis-premise-paper", *where, "Premise: dissection finds more interpretable units in a trained network "
            "than in a randomly initialised one of the same shape, at the paper's q and cut-off",
            "assumed (Bau et al. 2017 show it on ImageNet networks)", paired,
            Above(0.0, "more than the null"))
    declare("dis-premise-chosen", *where, "The same premise at the setting chosen on the tuning scenes",
            "assumed", paired + ", on the dissection scenes (not those the setting was chosen on)",
            Above(0.0, "more than the null"))
    declare("dis-hypothesis-a", *where, "Hypothesis A: interpretability does not change while accuracy holds, "
            f"down to {100 * ref['acc_matches_down_to']:.1f}% of the weights (Fig. 2)",
            f"flat down to {100 * ref['acc_matches_down_to']:.1f}%, declining after (3 trials)",
            f"count at the level nearest {100 * ref['acc_matches_down_to']:.1f}% of the weights over the dense "
            "count, minus one, per trial",
            Between(-DIS_FLAT_TOLERANCE, DIS_FLAT_TOLERANCE, f"within {DIS_FLAT_TOLERANCE:.0%} of the dense count"),
            parts="count (interpretable units, distinct concepts)")
    declare("dis-accuracy-flat", *where, "Accuracy matches the dense network down to "
            f"{100 * ref['acc_matches_down_to']:.1f}% of the weights (Fig. 1)", "matches",
            f"test accuracy at the level nearest {100 * ref['acc_matches_down_to']:.1f}% of the weights minus the "
            "dense network's, paired by seed", Above(-DIS_ACC_TOLERANCE, "less than one point lost"))
    declare("dis-accuracy-drop", *where, f"About one point of accuracy is lost at {100 * ref['acc_drop_at']:.0f}% "
            "of the weights (Fig. 1)", f"-{100 * ref['acc_drop_at_10pct']:.0f} point",
            f"test accuracy at the level nearest {100 * ref['acc_drop_at']:.0f}% of the weights minus the dense "
            "network's, paired by seed", Between(*DIS_DROP, "a loss of 0.5 to 2 points"))
    declare("dis-higher-first", *where, "Higher-level concepts (objects, scenes) go first under pruning (Fig. 3)",
            "objects and scenes are the most volatile (no number)",
            "relative loss of interpretable units with an object or scene concept minus that of units with a "
            "colour or texture concept, dense to sparsest level, per trial", Above(0.0, "higher-level lose more"))
    declare("dis-still", *where, "Most originally interpretable units stay interpretable at "
            f"{100 * ref['sparsity_consistency']:.0f}% sparsity (Fig. 4, left)",
            f"nearly {100 * ref['still_interpretable_at_89']:.0f}%",
            "share of the dense network's interpretable units still interpretable at the level nearest "
            f"{100 * (1 - ref['sparsity_consistency']):.0f}% of the weights",
            Above(round(ref["still_interpretable_at_89"] - DIS_SHARE_MARGIN, 2),
                  f"at most {DIS_SHARE_MARGIN:.2f} below the paper"))
    declare("dis-same", *where, "Most of the units interpretable before and after keep their concept (Fig. 4, "
            "right)", f"about {100 * ref['same_concept_at_89']:.0f}%",
            "share of the units interpretable in both with the same best concept, at the same level",
            Above(round(ref["same_concept_at_89"] - DIS_SHARE_MARGIN, 2),
                  f"at most {DIS_SHARE_MARGIN:.2f} below the paper"))


DIS_FLAT_TOLERANCE = 0.2  # claim dis-hypothesis-a: "flat" = a count within 20% of the dense one
DIS_ACC_TOLERANCE = 0.01  # claim dis-accuracy-flat: "matches" = less than one point of accuracy lost
DIS_DROP = (-0.02, -0.005)  # claim dis-accuracy-drop: "about one point" = a loss of 0.5 to 2 points
DIS_SHARE_MARGIN = 0.15  # claims dis-still, dis-same: "most", within 15 points of the paper's share or above
_declare_dissection()


# --- chapter 3 (paper 002) ---
def _declare_class_filters() -> None:
    from . import reference

    ref = reference.CLASS_FILTERS
    r3, r5 = ref["A_d_k2_3"] / ref["A_f"][0], ref["A_d_k5"] / ref["A_f"][1]
    where = ("03_class_specific_filters", "cf-claims")
    declare("cf-1a", *where, "With k1 = k2 = 3 the decomposed layer keeps most of the accuracy (Sec. 5.2.1)",
            f"84.16 of 91.17 (r_A {r3:.3f})", "r_A = A_d / A_f at k1 = k2 = 3",
            Above(round(r3 - CF_R_A_TOLERANCE, 3), f"{CF_R_A_TOLERANCE} below the paper's r_A"))
    declare("cf-1b", *where, "With k1 = k2 = 5 the decomposed layer keeps most of the accuracy (Sec. 5.2.3)",
            f"88.59 of 91.71 (r_A {r5:.3f})", "r_A = A_d / A_f at the chapter's k1, k2",
            Above(round(r5 - CF_R_A_TOLERANCE, 3), f"{CF_R_A_TOLERANCE} below the paper's r_A"))
    declare("cf-2a", *where, "For a given k1 the best k2 is k2 = k1 (Fig. 1)", "always (Fig. 1)",
            "r_A at k2 = k1 minus r_A at the better of the neighbouring k2 of the grid (on both sides, below d)",
            Above(0.0, "k2 = k1 is better"), parts="k1 of the grid")
    declare("cf-2b", *where, "A large k1 hurts at equal k2 (Fig. 1)", "yes (Fig. 1)",
            "r_A at k1 = k2 minus r_A at the largest k1 of the grid below d, at the chapter's k2",
            Above(0.0, "the large k1 is worse"))
    declare("cf-3", *where, "One epoch of retraining with the decomposed layer in place recovers the original "
            "accuracy (Sec. 5.2.3)", "88.59 -> 91.51 against A_f 91.71 (-0.0020)",
            "accuracy after one epoch of whole-network retraining (the public code's recipe) minus A_f",
            Above(-CF_RECOVERY_TOLERANCE, f"within {CF_RECOVERY_TOLERANCE} of A_f"))
    declare("cf-4", *where, "k1 = 5 features cover 90% of the feature mass on CIFAR-10 (Sec. 4.4)",
            f"{ref['k1_mass90']} of {ref['d']}",
            "the smallest k whose top-k features hold the chapter's share (0.9) of an image's l1 norm, on average",
            Below(ref["k1_mass90"] + 0.5, f"at most the paper's {ref['k1_mass90']}"))
    declare("cf-5", *where, "The final layer's cost falls from d x n to k2 x n multiply-adds (Sec. 5.2.3)",
            "64 x 10 = 640 -> 5 x 10 = 50", "multiply-adds per image of the decomposed layer divided by k2 x n",
            Between(1.0, 1.0, "exactly k2 x n"))
    declare("cf-6", *where, "r_A grows with depth within a family of networks (Sec. 5.2.2, Tables 2-6)",
            "ResNet-50/101/152: 0.869 / 0.897 / 0.900 (ImageNet, k1 = k2 = 50)",
            "least-squares slope of r_A against depth (per 10 layers) over every network of the depth study",
            Above(0.0, "r_A grows"))
    declare("cf-7", *where, "Choosing S_y by the weights |W[y, j]| is worse than by the features "
            "(Algorithm 1) (Sec. 4.1, 4.3)", "yes (no number given)",
            "r_A of Algorithm 1 (k1 = k2) minus r_A of the k2 largest |W[y, j]|, paired on the test images",
            Above(0.0, "Algorithm 1 is better"), parts="k2 of the grid below d")
    declare("cf-csg", *where, "Class-specific gates (CSG) keep the standard output's accuracy, and the "
            "unsupervised Algorithm 1 does as well or better (Sec. 5.1, Table 1)",
            "ResNet-20, CIFAR-10: CSG 0.8809, standard 0.8809", "accuracy through CSG against the standard "
            "output and against Algorithm 1", Above(0.0))


CF_R_A_TOLERANCE = 0.03  # claims cf-1a/1b: "keeps most of the accuracy" = r_A at most 0.03 below the paper's
CF_RECOVERY_TOLERANCE = 0.005  # claim cf-3: "very close to the original accuracy" (the paper: 0.002 short)
_declare_class_filters()


# --- chapter 4 (paper 003) ---
# Constants of the rules, fixed before any run. LeNet-300-100's accuracies on Fashion-MNIST's 10,000 test
# images carry a binomial standard error of about 0.003-0.005; training seeds move them more.
NM_BASE_TOLERANCE = 0.01  # "reaches 89.80%": the interval within one point of it
NM_KEPT_TOLERANCE = 0.02  # "merging keeps 80.02% at ratio 0.8": the interval above 0.7802
NM_THRESHOLD_TOLERANCE = 0.01  # "threshold 0.45 / lambda 0.85 suit the network": within a point of the best
NM_EXACT = 1e-3  # "exact": the largest change of any output (logit) below 1e-3
NM_SECTION = ("04_neuron_merging", "nm-claims")


def _declare_neuron_merging() -> None:
    from . import reference

    ref = reference.NEURON_MERGING
    t1 = ref["lenet300100_l1"]
    lo, hi = min(t1), max(t1)
    gains = ", ".join(f"{r:g}: {t1[r]['merge'] - t1[r]['prune']:+.4f}" for r in t1)
    paired = "merge minus prune accuracy without fine-tuning (the same kept neurons, the same test images)"
    declare("nm-baseline", *NM_SECTION, "LeNet-300-100 reaches 89.80% on Fashion-MNIST (Table 1's baseline)",
            f"{ref['lenet300100_acc']:.4f}", "test accuracy of each training seed's network",
            Between(round(ref["lenet300100_acc"] - NM_BASE_TOLERANCE, 4),
                    round(ref["lenet300100_acc"] + NM_BASE_TOLERANCE, 4), f"within {NM_BASE_TOLERANCE} of it"))
    declare("nm-beats-prune", *NM_SECTION, "Without fine-tuning, merging beats pruning at every ratio "
            "(LeNet-300-100, l1; Table 1)", gains, paired + ", paired by training seed",
            Above(0.0, "merging is better"), parts="pruning ratio")
    declare("nm-gain-grows", *NM_SECTION, "The gain of merging grows with the pruning ratio (Table 1)",
            f"{t1[lo]['merge'] - t1[lo]['prune']:+.4f} at {lo:g} to {t1[hi]['merge'] - t1[hi]['prune']:+.4f} "
            f"at {hi:g}", "gain at the largest ratio minus gain at the smallest, per training seed",
            Above(0.0, "larger at the larger ratio"))
    declare("nm-kept-at-08", *NM_SECTION, f"Merging keeps {100 * t1[0.8]['merge']:.2f}% accuracy with 80% of the "
            "hidden neurons removed (Table 1)", f"{t1[0.8]['merge']:.4f} (prune: {t1[0.8]['prune']:.4f})",
            "merged test accuracy at ratio 0.8, l1, per training seed",
            Above(round(t1[0.8]["merge"] - NM_KEPT_TOLERANCE, 4), f"at most {NM_KEPT_TOLERANCE} below it"))
    declare("nm-every-criterion", *NM_SECTION, "Merging beats pruning whichever criterion keeps the neurons "
            "(l1, l2, l2-GM; the paper's tables)", "yes, for each criterion", paired + ", paired by training seed",
            Above(0.0, "merging is better"), parts="criterion and ratio")
    vgg = ref["vgg16_cifar10"]
    declare("nm-bn-beats-prune", *NM_SECTION, "With BatchNorm (Algorithm 3), merging beats pruning",
            f"VGG-16 on CIFAR-10: {vgg['prune']:.4f} pruned, {vgg['merge']:.4f} merged",
            "merge (the reference's BN formula) minus prune accuracy, paired over the test images of one "
            "trained network", Above(0.0, "merging is better"), parts="pruning ratio")
    declare("nm-s-direction", *NM_SECTION, "s has the pruned neuron's norm on top; reversed, accuracy is about "
            "4% lower (the report)", f"{ref['s_reversed_drop']:+.2f} on average",
            "accuracy with s reversed minus with s as in the paper, mean over the ratios (LeNet-300-100: paired "
            "by seed; BN network: paired over test images)", Below(0.0, "reversed is worse"), parts="network")
    declare("nm-threshold", *NM_SECTION, f"Threshold {ref['thresholds']['lenet300100']:g} suits LeNet-300-100 "
            "(the reference script)", f"{ref['thresholds']['lenet300100']:g}",
            "accuracy at the sweep's best threshold minus at the chapter's, mean over ratios, paired by seed",
            Below(NM_THRESHOLD_TOLERANCE, f"within {NM_THRESHOLD_TOLERANCE} of the best"))
    declare("nm-lambda", *NM_SECTION, f"lambda = {ref['lam']['vgg16']:g} suits the BN network (the reference "
            "scripts)", f"{ref['lam']['vgg16']:g}",
            "accuracy at the sweep's best lambda minus at the chapter's, paired over test images",
            Below(NM_THRESHOLD_TOLERANCE, f"within {NM_THRESHOLD_TOLERANCE} of the best"))
    declare("nm-exact-fc", *NM_SECTION, "Merging is exact when every pruned neuron is a positive multiple of a "
            "kept one (Theorem 1), fully connected", "exact",
            "largest output change on 200 test images of a planted LeNet-300-100, per seed",
            Below(NM_EXACT, f"below {NM_EXACT:g}"))
    declare("nm-exact-bn", *NM_SECTION, "Merging is exact for positive multiples with BatchNorm, as the reference code computes the scale "
            "(Theorem 1, Algorithm 3)", "exact",
            "largest output change on 64 test images of the planted BN network, reference BN formula, per plant "
            "seed", Below(NM_EXACT, f"below {NM_EXACT:g}"))
    declare("nm-chains", *NM_SECTION, "The merge-able layers of a branch-free model can be found automatically, "
            "with hooks on a dummy input, instead of being hard-coded (the report, Sec. 4.1)", "proposed",
            "share of the runs in which the chains found in LeNet-300-100 are exactly the reference's "
            "hard-coded ones", Between(1.0, 1.0, "all of them, and nothing else"))
    declare("nm-leaky", *NM_SECTION, "Merging extends to LeakyReLU, which is positively homogeneous too (the "
            "report, Sec. 4.2)", "proposed, not measured",
            "merge minus prune accuracy of the LeakyReLU twin, mean over the ratios, paired by seed",
            Above(0.0, "merging is better"))


_declare_neuron_merging()


# --- chapter 5 (paper 004) ---
CAUSAL_SPEEDUP = 0.1  # claim causal-4a: "wall-clock speed-ups" = latency at least 10% lower at the largest cut
CAUSAL_FOLLOWS = 0.8  # claims causal-4b/c: latency "follows" MACs = its drop at least 0.8 x the MAC drop
CAUSAL_RHO = 0.8  # claim causal-3: DoWhy "recovers" the effects = Spearman's rho with the truth above 0.8
CAUSAL_RIGHT = 0.8  # claim causal-3-refuters: at least 80% of the estimates that pass hold the truth


def _declare_causal() -> None:
    where = ("05_causal_pruning", "causal-claims")
    after = ("test accuracy after fine-tuning, causal minus the other criterion, paired on the same seeds and "
             "test images (interval: seeds and images crossed)")
    declare("causal-1", *where, "Causal (interventional) importance of filters prunes better than the usual "
            "cheap criteria, after the same fine-tuning", "expected (Sec. III), no number", after,
            Above(0.0, "causal is better"), parts="cheap criterion")
    declare("causal-1-noft", *where, "The same, straight after pruning (no fine-tuning)", "expected, no number",
            after.replace("after fine-tuning", "straight after pruning"), Above(0.0, "causal is better"),
            parts="cheap criterion")
    declare("causal-1-null", *where, "Causal importance beats a random ranking (the null), after fine-tuning",
            "implied", after.replace("the other criterion", "random"), Above(0.0, "better than random"))
    declare("causal-2", *where, "A structural causal model over filters (Narendra et al.) ranks them better than "
            "the magnitude of their weights, after fine-tuning", "expected (structural integrity), no number",
            after.replace("causal minus the other criterion", "SCM minus L1"), Above(0.0, "the SCM is better"))
    declare("causal-3", *where, "DoWhy estimates filter effects from observational data", "hoped for; its "
            "efficiency listed as a risk", "Spearman's rho between DoWhy's back-door estimate (parents adjusted) "
            "and the measured effect of removing each filter, bootstrap over filters",
            Above(CAUSAL_RHO, f"rho above {CAUSAL_RHO}"))
    declare("causal-3-refuters", *where, "An estimate that passes DoWhy's refuters is right (Fig. 1's "
            "refute step)", "implied by the workflow", "share of the estimates passing all three refuters whose "
            "95% interval holds the measured effect (Wilson interval)",
            Above(CAUSAL_RIGHT, f"at least {CAUSAL_RIGHT:.0%} right"))
    declare("causal-4a", *where, "Structured pruning gives measured speed-ups on a CPU", "expected (vs "
            "unstructured sparsity), no number", "latency reduction at batch 64 of the most pruned network, "
            "median over timing rounds", Above(CAUSAL_SPEEDUP, f"more than {CAUSAL_SPEEDUP:.0%} faster"),
            timed=True)
    declare("causal-4b", *where, "The speed-up follows the MAC reduction, at batch 64", "implied (FLOPs as "
            "the proxy of cost)", "latency drop / MAC drop at batch 64, the most pruned network",
            Above(CAUSAL_FOLLOWS, f"at least {CAUSAL_FOLLOWS} of the MAC drop"), timed=True)
    declare("causal-4c", *where, "The speed-up follows the MAC reduction, at batch 1", "implied",
            "latency drop / MAC drop at batch 1, the most pruned network",
            Above(CAUSAL_FOLLOWS, f"at least {CAUSAL_FOLLOWS} of the MAC drop"), timed=True)
    declare("causal-5", *where, "Pruning regularises: a lightly pruned network generalises better", "expected "
            "(Sec. II), no number", "test accuracy of lightly pruned and fine-tuned LeNet5 minus the unpruned "
            "one fine-tuned the same way, paired on the same seeds and test images (crossed interval)",
            Above(0.0, "the pruned one is better"))
    declare("causal-6", *where, "The causal view costs more computation than the cheap criteria",
            "listed as a risk (Sec. IV)", "CPU seconds to score the filters by interventions over seconds by "
            "Taylor, per seed", Above(1.0, "more costly"), timed=True)


_declare_causal()


# --- chapter 6 (the criteria compared) ---
CMP_MAGNITUDE_MARGIN = 0.01  # "magnitude is a strong baseline": L1 no more than one point below the best
CMP_SECTION = ("06_comparing_criteria", "cmp-claims")


def _declare_comparison() -> None:
    from . import reference

    lit = reference.COMPARISON
    merge = reference.NEURON_MERGING["lenet300100_l1"][lit["merging"]["ratio"]]
    declare("cmp-finetune-shrinks", *CMP_SECTION, "After fine-tuning, the differences between criteria shrink",
            f"{lit['liu2019']['paper']}: {lit['liu2019']['finetune']}",
            "standard deviation across criteria of their accuracy after the largest fine-tuning budget minus "
            "without fine-tuning, per seed", Below(0.0, "the spread shrinks"),
            parts="whole-network setting, target and allocation")
    declare("cmp-magnitude-strong", *CMP_SECTION, "Magnitude (L1) is a strong baseline: no criterion beats it by "
            "more than a point", f"{lit['blalock2020']['paper']}: {lit['blalock2020']['magnitude']}",
            "accuracy of L1 minus that of the best other criterion of the cell, paired over seeds and test images",
            Above(-CMP_MAGNITUDE_MARGIN, f"at most {CMP_MAGNITUDE_MARGIN} below the best"),
            parts="whole-network setting, target, allocation and fine-tuning budget")
    declare("cmp-beats-random", *CMP_SECTION, "Every criterion beats random at the largest target without "
            "fine-tuning", f"{lit['blalock2020']['paper']}: {lit['blalock2020']['random']}",
            "accuracy of the criterion minus that of random (same seeds, same test images)",
            Above(0.0, "better than random"), parts="criterion and setting (whole networks with uniform allocation; "
            "the ResNet-8's dissected block)")
    declare("cmp-merge-helps", *CMP_SECTION, "Pruning + merging beats pruning alone without fine-tuning",
            f"{lit['merging']['paper']}: {merge['merge']:.4f} vs {merge['prune']:.4f} at ratio "
            f"{lit['merging']['ratio']}", "accuracy after prune + merge minus after pruning alone, no "
            "fine-tuning, averaged over criteria, paired over seeds and test images", Above(0.0, "merge is better"),
            parts="setting where a layer merges, target and allocation")
    declare("cmp-merge-most-without-ft", *CMP_SECTION, "Merging helps most without fine-tuning",
            "paper 003's claim: merging compensates for pruning without fine-tuning",
            "gain of merging without fine-tuning minus its gain after the largest budget, averaged over criteria, "
            "paired over seeds and test images", Above(0.0, "the gain is larger without fine-tuning"),
            parts="setting where a layer merges, target and allocation")


_declare_comparison()
