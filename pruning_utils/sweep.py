"""Parameter sweeps of a chapter on Dask distributed: each combination of parameters one papermill run.

``python -m pruning_utils.sweep notebooks/04_neuron_merging.ipynb -p seeds "[0]" "[1]" "[2]"
-p ratios "[0.5]" "[0.8]" --out sweeps/merging [--size default] [--workers 2] [--scheduler ADDRESS]``

- Every ``-p NAME VALUE...`` gives one swept parameter; values are YAML literals (``"[0]"`` is a list,
  ``0.5`` a float, ``true`` a bool, ``None`` or ``null`` None, anything else a string). The runs are the
  product of all of them, each executed with papermill as one task on Dask distributed: a
  ``LocalCluster`` of ``--workers`` processes on this machine by default, or the cluster whose scheduler
  is at ``--scheduler`` (every worker must have this package installed and see the same file system;
  on Slurm, PBS or SGE, start the workers with dask-jobqueue, see the README).
- Every run goes through the execution cache of :mod:`pruning_utils.chapters`, with the same keys as
  ``make book``: a finished run (of this sweep, an earlier one, or the book) is reused, not executed.
- ``OUT/runs/<run>/`` holds each executed notebook; ``OUT/results.csv`` one row per run: its parameters
  (``param:NAME``), status, whether it came from the cache, seconds, the error of a failed run, every
  glued number or text of the run, and each claim's verdict and estimate (``claim:KEY``,
  ``claim:KEY:mean`` ...); ``OUT/figures/`` one figure per numeric result across the swept parameter.
- A run that fails is reported with its parameters and error (its partial notebook kept) and costs the
  others nothing; the command then exits with status 1.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import chapters


def parse_value(text: str):
    """A command-line value as YAML reads it (lists, numbers, booleans), ``None`` for None/null."""
    import yaml

    if text.strip() in ("None", "null", "~"):
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def combinations(grid: dict[str, list]) -> list[dict]:
    """Every combination of the swept values, the first parameter varying slowest."""
    for name, values in grid.items():
        if not values:
            raise ValueError(f"parameter {name!r} has no values to sweep")
        canon = [json.dumps(v, sort_keys=True, default=repr) for v in values]
        if len(set(canon)) != len(canon):
            raise ValueError(f"parameter {name!r} lists a value twice: {values!r}")
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


def _compact(value) -> str:
    text = json.dumps(value, default=repr).replace(" ", "")
    return text[1:-1] if text.startswith("[") else text.strip('"')


def run_name(params: dict) -> str:
    """A folder name for one run: its parameters, made file-system safe, and a short hash of them."""
    readable = "__".join(f"{k}={_compact(v)}" for k, v in params.items())
    readable = re.sub(r"[^A-Za-z0-9._=,-]+", "_", readable)[:80]
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=repr).encode()).hexdigest()[:8]
    return f"{readable}-{digest}"


def _task(notebook: str, out_dir: str, parameters: dict, cache: str | None, force: bool) -> dict:
    """One run on a Dask worker: execute (or restore) the notebook; never raises, so a failed run is
    reported with its error instead of cancelling the sweep."""
    start = time.perf_counter()
    cache_path = Path(cache) if cache else None
    try:
        run = chapters.execute(Path(notebook), Path(out_dir), parameters, cache=cache_path, force=force)
        return {"status": "ok", "cached": run.cached, "seconds": run.seconds, "error": "",
                "output": run.output, "key": run.key}
    except Exception as err:  # noqa: BLE001 - the sweep goes on, the error is reported with the run
        return {"status": "failed", "cached": False, "seconds": time.perf_counter() - start,
                "error": chapters.error_text(err), "output": str(Path(out_dir) / Path(notebook).name),
                "key": ""}


@dataclass
class SweepResult:
    """The table of runs (a pandas DataFrame), where it was written, the figures, and the failed runs."""

    table: object
    csv: Path
    figures: list[Path] = field(default_factory=list)

    @property
    def failed(self):
        return self.table[self.table["status"] != "ok"]


def _client(scheduler: str | None, workers: int):
    from dask.distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler), None
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    return Client(cluster), cluster


def sweep(notebook: str | Path, grid: dict[str, list], out: str | Path, *, size: str | None = "default",
          fixed: dict | None = None, scheduler: str | None = None, workers: int = 2, client=None,
          cache: str | Path | None = None, force: bool = False, figures: bool = True, log=print) -> SweepResult:
    """Run ``notebook`` once per combination of ``grid`` (plus the ``fixed`` parameters and ``size`` where
    the notebook has a ``size`` parameter) on Dask, collect the table and figures into ``out``."""
    import pandas as pd
    import papermill as pm

    notebook, out = Path(notebook).resolve(), Path(out)
    declared = pm.inspect_notebook(str(notebook))
    unknown = [n for n in [*grid, *(fixed or {})] if n not in declared]
    if unknown:
        raise ValueError(f"{notebook.name} has no parameter(s) {', '.join(map(repr, unknown))}; it declares "
                         f"{', '.join(map(repr, declared))}")
    base = dict(fixed or {})
    if size is not None and "size" in declared:
        base["size"] = size
    combos = combinations(grid)
    specs = []
    for params in combos:
        name = run_name(params)
        specs.append((name, params, (str(notebook), str(out / "runs" / name), {**base, **params},
                                     str(cache) if cache else None, force)))
    own = client is None
    if own:
        client, cluster = _client(scheduler, workers)
    log(f"sweep of {notebook.name}: {len(specs)} run(s) on {client.scheduler_info().get('address', 'Dask')}")
    try:
        from dask.distributed import as_completed

        futures = {client.submit(_task, *args, pure=False, key=f"run-{name}"): (name, params)
                   for name, params, args in specs}
        records = {}
        for future in as_completed(futures):
            name, params = futures[future]
            rec = future.result()
            records[name] = {"run": name, **{f"param:{k}": v for k, v in params.items()}, **rec}
            log(f"  {name}: " + (f"FAILED: {rec['error']}" if rec["status"] != "ok" else
                                 ("from the cache" if rec["cached"] else f"executed in {rec['seconds']:.1f} s")))
    finally:
        if own:
            client.close()
            if cluster is not None:
                cluster.close()
    rows = [_collect(records[name]) for name, _, _ in specs]
    table = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "results.csv"
    table.map(_cell_text).to_csv(csv, index=False)
    figs = plot_results(table, list(grid), out / "figures") if figures else []
    return SweepResult(table, csv, figs)


def _cell_text(v):
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def _collect(record: dict) -> dict:
    """A run's row: its record plus the glued values and claims of its executed notebook."""
    from . import claims, glued

    row = dict(record)
    if record["status"] != "ok":
        return row
    nb = Path(record["output"])
    for name, value in glued.read(nb).items():
        if name == "claims" or name.startswith("verdict_"):
            continue
        if isinstance(value, (bool, int, float, str)):
            row[name] = value
    for c in claims.read_results(nb):
        row[f"claim:{c['key']}"] = c["verdict"]
        est = c.get("estimate") or {}
        for part in ("mean", "lo", "hi", "n"):
            if part in est:
                row[f"claim:{c['key']}:{part}"] = est[part]
    return row


_RESERVED = {"run", "status", "cached", "seconds", "error", "output", "key"}


def numeric_results(table) -> list[str]:
    """The columns holding a number for at least one finished run (glued numbers, claim estimates)."""
    ok = table[table["status"] == "ok"]
    cols = []
    for c in ok.columns:
        if c in _RESERVED or c.startswith("param:"):
            continue
        vals = [v for v in ok[c] if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if vals and any(math.isfinite(float(v)) for v in vals):
            cols.append(c)
    return cols


def plot_results(table, swept: list[str], folder: Path) -> list[Path]:
    """One figure per numeric result: the value against the first swept parameter (its values as
    categories on the x axis), one line per combination of the other swept parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = table[table["status"] == "ok"]
    if ok.empty or not swept:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    x_name, others = swept[0], swept[1:]
    x_labels = list(dict.fromkeys(_compact(v) for v in table[f"param:{x_name}"]))
    paths = []
    for col in numeric_results(table):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        groups = {}
        for _, row in ok.iterrows():
            label = ", ".join(f"{o}={_compact(row[f'param:{o}'])}" for o in others) or col
            groups.setdefault(label, []).append((x_labels.index(_compact(row[f"param:{x_name}"])), row[col]))
        for label, pts in groups.items():
            pts = sorted((x, float(y)) for x, y in pts if isinstance(y, (int, float)) and not isinstance(y, bool))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xticks(range(len(x_labels)), x_labels)
        ax.set_xlabel(x_name)
        ax.set_ylabel(col)
        ax.set_title(f"{col} across {x_name}", fontsize=10)
        if others:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / (re.sub(r"[^A-Za-z0-9._=-]+", "_", col) + ".png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("-p", "--parameter", nargs="+", action="append", metavar=("NAME", "VALUE"),
                        default=[], help="a swept parameter and its values (repeat -p for more)")
    parser.add_argument("--out", type=Path, required=True, help="folder of the runs, table and figures")
    parser.add_argument("--size", default="default", choices=chapters.SIZES,
                        help="run size, for notebooks that have a size parameter")
    parser.add_argument("--scheduler", default=None, help="address of a Dask scheduler (default: a LocalCluster)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the LocalCluster")
    parser.add_argument("--force", action="store_true", help="execute every run, cached or not")
    args = parser.parse_args(argv)
    grid = {}
    for entry in args.parameter:
        if len(entry) < 2:
            parser.error(f"-p {entry[0]} needs at least one value")
        if entry[0] in grid:
            parser.error(f"-p {entry[0]} is given twice")
        grid[entry[0]] = [parse_value(v) for v in entry[1:]]
    if not grid:
        parser.error("nothing to sweep: give at least one -p NAME VALUE...")
    result = sweep(args.notebook, grid, args.out, size=args.size, scheduler=args.scheduler,
                   workers=args.workers, force=args.force, log=lambda m: print(m, flush=True))
    t = result.table
    print(f"{len(t)} run(s): {int((t['status'] == 'ok').sum())} finished "
          f"({int(t['cached'].sum())} from the cache), {len(result.failed)} failed; table {result.csv}; "
          f"{len(result.figures)} figure(s) in {args.out / 'figures'}", flush=True)
    for _, row in result.failed.iterrows():
        params = {c[6:]: row[c] for c in t.columns if c.startswith("param:")}
        print(f"FAILED {params}: {row['error']} (notebook: {row['output']})", file=sys.stderr, flush=True)
    return 1 if len(result.failed) else 0


if __name__ == "__main__":
    sys.exit(main())
