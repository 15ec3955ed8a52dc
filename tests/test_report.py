import pytest

from pruning_utils import report


def test_claims_table_words_each_verdict_and_rejects_other_values():
    rows = [{"claim": c, "paper": "p", "ours": "o", "holds": h, "why": "w"}
            for c, h in (("a", True), ("b", False), ("c", None))]
    table = report.claims_table(rows)
    assert table.data["holds"].to_dict() == {"a": "holds here", "b": "does not hold here", "c": "cannot be tested here"}
    long = "a claim of more than fifty characters, which a DataFrame's HTML would cut"
    assert long in report.claims_table([{**rows[0], "ours": long}])._repr_html_()  # what a notebook shows
    with pytest.raises(ValueError, match="holds='yes' is not allowed .claim 'a'.; expected True, False or None"):
        report.claims_table([{**rows[0], "holds": "yes"}])
    with pytest.raises(ValueError, match="holds=1 is not allowed"):
        report.claims_table([{**rows[0], "holds": 1}])  # 1 == True, but a count is not a verdict
