"""Execute the book's chapters with papermill: ``python -m pruning_utils.chapters --size default OUT``.

``make book`` runs every chapter at its default size into ``book/chapters/`` and writes there a page of
run times and the claims page (every claim of every executed chapter, :func:`claims.write_page`); the
tests run the smoke size into ``build/smoke/``. Kernels start with the maths libraries' dynamic
threading off (:func:`runtime.fixed_env`); each chapter then fixes its threads from its parameters.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import claims, runtime
from .params import check_choice

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
SIZES = ("smoke", "default", "full")


def chapter_paths(names: list[str] | None = None) -> list[Path]:
    """The chapter notebooks in book order (``notebooks/NN_*.ipynb``), optionally only those named."""
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if names:
        known = {p.stem: p for p in paths}
        for n in names:
            check_choice("chapter", n, known)
        paths = [known[n] for n in names]
    return paths


def run_chapter(path: Path, out_dir: Path, size: str, extra: dict | None = None) -> float:
    """Execute one chapter with papermill at run ``size`` into ``out_dir``; return seconds taken."""
    import papermill as pm

    check_choice("size", size, SIZES)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(runtime.fixed_env())  # the kernel inherits it
    start = time.perf_counter()
    pm.execute_notebook(str(path), str(out_dir / path.name), parameters={"size": size, **(extra or {})},
                        kernel_name="python3", cwd=str(ROOT), progress_bar=False)
    return time.perf_counter() - start


def write_runtimes(out_dir: Path, size: str, seconds: dict[str, float]) -> Path:
    """A Markdown page listing each chapter's run time, for the book's appendix."""
    lines = ["# Run times", "",
             f"Wall-clock time of each chapter in the last `make book` (run size `{size}`), measured by "
             "`python -m pruning_utils.chapters`; a model taken from the checkpoint cache makes a chapter "
             "faster than its first, cold run.", "",
             "| chapter | seconds |", "|---|---|"]
    lines += [f"| {name} | {sec:.1f} |" for name, sec in seconds.items()]
    path = out_dir / "runtimes.md"
    path.write_text("\n".join(lines) + "\n")
    (out_dir / "runtimes.json").write_text(json.dumps(seconds, indent=1))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path, help="where the executed notebooks go")
    parser.add_argument("--size", default="default", choices=SIZES)
    parser.add_argument("--only", nargs="*", help="chapter stems, e.g. 00_baselines (default: all)")
    args = parser.parse_args(argv)
    seconds = {}
    for path in chapter_paths(args.only):
        print(f"running {path.name} at size={args.size} ...", flush=True)
        seconds[path.stem] = run_chapter(path, args.out_dir, args.size)
        print(f"  done in {seconds[path.stem]:.1f} s", flush=True)
    if not args.only:
        write_runtimes(args.out_dir, args.size, seconds)
    print(f"claims page: {claims.write_page(args.out_dir)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
