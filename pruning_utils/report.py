"""Small helpers for the tables that put our numbers beside a paper's."""
from __future__ import annotations

import numpy as np
import pandas as pd
from pandas.io.formats.style import Styler


def std_error(accuracy: float, n: int) -> float:
    """One binomial standard error of an accuracy measured on ``n`` examples, sqrt(a(1-a)/n)."""
    return (accuracy * (1 - accuracy) / n) ** 0.5


def claims_table(rows: list[dict]) -> Styler:
    """A claims table: each row has 'claim', 'paper', 'ours', 'holds' (True, False, or None where our
    data cannot test the claim) and 'why'. A Styler, so that the rendered table shows every cell whole
    (a DataFrame's HTML cuts text at 50 characters)."""
    words = {True: "holds here", False: "does not hold here", None: "cannot be tested here"}
    for row in rows:
        if row["holds"] is not None and not isinstance(row["holds"], (bool, np.bool_)):
            raise ValueError(f"holds={row['holds']!r} is not allowed (claim {row['claim']!r}); "
                             "expected True, False or None")
    df = pd.DataFrame(rows, columns=["claim", "paper", "ours", "holds", "why"])
    df["holds"] = [words[None if row["holds"] is None else bool(row["holds"])] for row in rows]
    return df.set_index("claim").style.set_properties(**{"text-align": "left", "white-space": "normal"})
