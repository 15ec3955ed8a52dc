"""The numbers a chapter glued into its executed notebook (myst-nb ``glue``), read back and compared.

``python -m pruning_utils.glued DIR_A DIR_B`` lists every glued value that differs between two builds of
the book (two folders of executed chapters): the check that the same parameters give the same numbers,
e.g. one build under ``taskset -c 0`` and one on two cores. Figures are compared by their PNG bytes
only with ``--figures``, since a font cache or a library version can move a pixel without any number
moving.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import sys
from pathlib import Path


def _value(text: str):
    """A glued text/plain repr back to a Python value where it is a literal (numbers, strings, NaN)."""
    text = "".join(text) if isinstance(text, list) else text
    if text in ("nan", "inf", "-inf"):
        return float(text)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def read(notebook: str | Path, figures: bool = False) -> dict:
    """``{name: value}`` of every glue in an executed notebook: literals as Python values, other objects
    (tables) by their text; figures as their PNG (base64) when ``figures`` else omitted."""
    nb = json.loads(Path(notebook).read_text())
    out = {}
    for cell in nb.get("cells", []):
        for o in cell.get("outputs", []):
            meta = o.get("metadata", {}).get("scrapbook")
            if not meta:
                continue
            prefix = meta.get("mime_prefix", "")
            data = {k[len(prefix):]: v for k, v in o.get("data", {}).items() if k.startswith(prefix)}
            if "image/png" in data:
                if figures:
                    out[meta["name"]] = "".join(data["image/png"])
                continue
            if "text/plain" in data:
                out[meta["name"]] = _value(data["text/plain"])
            elif "text/html" in data:
                out[meta["name"]] = "".join(data["text/html"])
    return out


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


# names of glued values that measure time, not results (latencies: lat_*, the block scan: scan_*)
TIMING = r"(second|latency|_ms$|_s$|time|speed|(^|_)lat_|^scan_)"
_TIMED_FIELDS = ("ours", "estimate", "parts", "note")  # a timed claim's numbers; its verdict is compared


def _results(value, timings: bool):
    """A glued ``claims`` JSON as comparable data: without ``timings``, the numbers of timed claims (those
    decided on a measured time) are set aside and only their verdicts compared."""
    from .claims import CLAIMS

    if not isinstance(value, str):
        return value
    try:
        rows = json.loads(value, parse_constant=str)  # NaN as the text 'NaN', equal to itself
    except ValueError:
        return value
    if timings or not isinstance(rows, list):
        return rows

    def timed(r) -> bool:  # as declared now where the executed notebook predates the field
        return bool(r.get("timed", getattr(CLAIMS.get(r.get("key")), "timed", False)))

    return [{k: v for k, v in r.items() if not (timed(r) and k in _TIMED_FIELDS)} for r in rows]


def diff(dir_a: str | Path, dir_b: str | Path, figures: bool = False, ignore: str | None = None,
         only: list[str] | None = None) -> list[tuple[str, str, object, object]]:
    """Every (chapter, name, value in A, value in B) that differs, for the chapters executed in both
    folders (or the stems in ``only``); a name glued in one build only shows with ``None`` on the other
    side. Names matching the regular expression ``ignore`` (e.g. :data:`TIMING`) are skipped."""
    import re

    dir_a, dir_b = Path(dir_a), Path(dir_b)
    rows = []
    for nb_a in sorted(dir_a.glob("[0-9][0-9]_*.ipynb")):
        if only is not None and nb_a.stem not in only:
            continue
        nb_b = dir_b / nb_a.name
        if not nb_b.exists():
            rows.append((nb_a.stem, "(whole chapter)", "executed", None))
            continue
        a, b = read(nb_a, figures), read(nb_b, figures)
        for name in sorted(set(a) | set(b)):
            if ignore is not None and re.search(ignore, name):
                continue
            va, vb = a.get(name), b.get(name)
            if name == "claims":
                same = _results(va, ignore is None) == _results(vb, ignore is None)
            else:
                same = _same(va, vb)
            if not same:
                rows.append((nb_a.stem, name, va, vb))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="folder of executed chapters (first build)")
    parser.add_argument("b", type=Path, help="folder of executed chapters (second build)")
    parser.add_argument("--figures", action="store_true", help="also compare glued figures byte for byte")
    parser.add_argument("--all", action="store_true", help="also compare glued timings (latencies, seconds)")
    args = parser.parse_args(argv)
    counts = {nb.stem: len(read(nb, args.figures)) for nb in sorted(args.a.glob("[0-9][0-9]_*.ipynb"))}
    rows = diff(args.a, args.b, args.figures, None if args.all else TIMING)
    for stem, n in counts.items():
        k = sum(1 for r in rows if r[0] == stem)
        print(f"{stem}: {n} glued values, {k} differ")
    for stem, name, va, vb in rows:
        print(f"  {stem} {name}: {str(va)[:60]!r} != {str(vb)[:60]!r}")
    print("identical" if not rows else f"{len(rows)} glued values differ")
    return 0 if not rows else 1


if __name__ == "__main__":
    sys.exit(main())
