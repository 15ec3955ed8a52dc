"""Small helpers for the tables that put our numbers beside a paper's."""
from __future__ import annotations

import pandas as pd


def std_error(accuracy: float, n: int) -> float:
    """One binomial standard error of an accuracy measured on ``n`` examples, sqrt(a(1-a)/n)."""
    return (accuracy * (1 - accuracy) / n) ** 0.5


def claims_table(rows: list[dict]) -> pd.DataFrame:
    """A claims table: each row has 'claim', 'paper', 'ours', 'holds' (bool) and 'why'."""
    df = pd.DataFrame(rows, columns=["claim", "paper", "ours", "holds", "why"])
    df["holds"] = df["holds"].map({True: "holds here", False: "does not hold here"})
    return df.set_index("claim")
