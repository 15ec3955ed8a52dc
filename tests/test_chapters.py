"""The execution cache of pruning_utils.chapters: a chapter is executed again only when something it
depends on changed, and a reused copy is byte for byte what a fresh run gives.

A tiny deterministic notebook (tests/notebooks/probe.ipynb) stands in for a chapter, so that each
execution takes seconds.
"""
import json
import os
import shutil
from pathlib import Path

import papermill as pm
import pytest
import torch

from pruning_utils import chapters, glued, train

PROBE = Path(__file__).parent / "notebooks" / "probe.ipynb"
PARAMS = {"size": "smoke", "seeds": [0, 1]}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("executed")


@pytest.fixture(scope="module")
def first(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return chapters.execute(PROBE, out, PARAMS, cache=cache), out


def test_second_run_comes_from_the_cache_byte_for_byte(first, cache, tmp_path):
    run, out = first
    assert not run.cached and run.error == ""
    again = chapters.execute(PROBE, tmp_path, PARAMS, cache=cache)
    assert again.cached and again.key == run.key and again.seconds == run.seconds
    assert (tmp_path / PROBE.name).read_bytes() == (out / PROBE.name).read_bytes()
    assert glued.read(tmp_path / PROBE.name)["value"] == 1.5


def test_a_reused_copy_equals_a_fresh_run(first, cache, tmp_path):
    run, out = first
    fresh = chapters.execute(PROBE, tmp_path, PARAMS, cache=cache, force=True)
    assert not fresh.cached and fresh.key == run.key
    assert (tmp_path / PROBE.name).read_bytes() == (out / PROBE.name).read_bytes()
    nb = json.loads((tmp_path / PROBE.name).read_text())
    assert "start_time" not in nb["metadata"]["papermill"] and "output_path" not in nb["metadata"]["papermill"]
    assert all("execution" not in c["metadata"] for c in nb["cells"])


def test_the_key_covers_notebook_parameters_package_environment_and_data(tmp_path, monkeypatch):
    key, parts = chapters.chapter_key(PROBE, PARAMS)
    assert set(parts) >= {"notebook", "parameters", "package", "environment", "data"}
    assert chapters.chapter_key(PROBE, dict(reversed(list(PARAMS.items()))))[0] == key  # order of names
    assert chapters.chapter_key(PROBE, {**PARAMS, "seeds": [0, 2]})[0] != key
    edited = tmp_path / PROBE.name
    edited.write_text(PROBE.read_text().replace("scale = 1.0", "scale = 2.0"))
    assert chapters.chapter_key(edited, PARAMS)[0] != key
    monkeypatch.setattr(chapters, "package_hash", lambda package=None: "edited")
    assert chapters.chapter_key(PROBE, PARAMS)[0] != key
    monkeypatch.undo()
    monkeypatch.setattr(chapters, "data_fingerprint", lambda: {"fashion": "other bytes"})
    assert chapters.chapter_key(PROBE, PARAMS)[0] != key
    monkeypatch.undo()
    monkeypatch.setattr(chapters, "environment_fingerprint", lambda: {"torch": "another version"})
    assert chapters.chapter_key(PROBE, PARAMS)[0] != key


def test_package_hash_sees_every_source_file(tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(chapters.PACKAGE, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    before = chapters.package_hash(pkg)
    assert before == chapters.package_hash(chapters.PACKAGE)
    (pkg / "claims.py").write_text((pkg / "claims.py").read_text() + "\n# an edit\n")
    assert chapters.package_hash(pkg) != before


def test_a_checkpoint_the_chapter_read_is_part_of_its_key(cache, tmp_path):
    ckpt = tmp_path / "ckpts" / "probe.pt"
    train.save_checkpoint({"key": "probe", "state_dict": {"w": torch.ones(3)}}, ckpt)
    params = {**PARAMS, "checkpoint": str(ckpt)}
    run = chapters.execute(PROBE, tmp_path / "out", params, cache=cache)
    assert not run.cached and glued.read(tmp_path / "out" / PROBE.name)["checkpoint_sum"] == 3.0
    meta = json.loads((cache / "probe" / run.key / "meta.json").read_text())
    assert [d["path"] for d in meta["checkpoints"]] == [str(ckpt.resolve())]
    assert chapters.lookup("probe", run.key, cache).state == "hit"
    train.save_checkpoint({"key": "probe", "state_dict": {"w": torch.ones(3)}}, ckpt)  # rewritten, same content
    assert chapters.lookup("probe", run.key, cache).state == "hit"
    train.save_checkpoint({"key": "probe", "state_dict": {"w": torch.zeros(3)}}, ckpt)  # retrained: other weights
    assert chapters.lookup("probe", run.key, cache).state == "stale"
    ckpt.unlink()  # cleared: another chapter may write it again before this one is looked at once more
    assert chapters.lookup("probe", run.key, cache).state == "missing"


def test_a_failed_run_is_reported_and_not_stored(cache, tmp_path):
    params = {**PARAMS, "scale": -1.0}
    with pytest.raises(pm.PapermillExecutionError, match="scale=-1.0 is not allowed"):
        chapters.execute(PROBE, tmp_path, params, cache=cache)
    key = chapters.chapter_key(PROBE, params)[0]
    assert chapters.lookup("probe", key, cache).state == "none"
    assert "not allowed" in chapters.error_text(pytest.raises(Exception, chapters.execute, PROBE, tmp_path,
                                                              params, cache=cache).value)


def test_runtimes_page_says_which_chapters_came_from_the_cache(tmp_path):
    runs = [chapters.Run("00_baselines", "x", 250.0, True), chapters.Run("01_trees", "y", 90.5, False),
            chapters.Run("02_x", "z", 3.0, False, error="ValueError: bad")]
    page = chapters.write_runtimes(tmp_path, "default", runs, wall=95.0, jobs=2).read_text()
    assert "| 00_baselines | 250.0 | from the cache |" in page
    assert "| 01_trees | 90.5 | executed |" in page and "| 02_x | 3.0 | failed |" in page
    assert "executed 1 of 3 chapters in 95 s of wall-clock time (2 processes side by side); 1 failed." in page
    mtime = (tmp_path / "runtimes.md").stat().st_mtime_ns
    chapters.write_runtimes(tmp_path, "default", runs, wall=95.0, jobs=2)
    assert (tmp_path / "runtimes.md").stat().st_mtime_ns == mtime  # unchanged text: the file is not touched


def test_cell_profile_lists_the_slowest_code_cells_and_the_page_shows_them(tmp_path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    cells = [new_markdown_cell("# t"), new_code_cell("# a comment\nx = train(P)"), new_code_cell("y = 1"),
             new_code_cell("z = sweep(x) | 2")]
    for cell, secs in zip(cells, (9.0, 120.04, 0.5, 30.0)):
        cell.metadata["papermill"] = {"duration": secs}
    nb_path = tmp_path / "nb.ipynb"
    nbformat.write(new_notebook(cells=cells), nb_path)
    slowest = chapters.cell_profile(nb_path, most=2)
    assert slowest == [{"cell": 1, "seconds": 120.0, "code": "x = train(P)"},
                       {"cell": 3, "seconds": 30.0, "code": "z = sweep(x) | 2"}]  # markdown never counts
    runs = [chapters.Run("03_x", "x", 300.0, False, slowest=slowest)]
    page = chapters.write_runtimes(tmp_path, "default", runs, wall=300.0).read_text()
    assert "| 03_x | 1 | 120.0 | `x = train(P)` |" in page
    assert "| 03_x | 3 | 30.0 | `z = sweep(x) \\| 2` |" in page  # a pipe would split the table's row


def test_next_chapter_starts_the_longest_one_whose_producers_are_done():
    reads = {"c": ("a",), "d": ("a", "b"), "e": ("a",)}
    # a cold build: "c" is longest but reads "a", so "a" starts, then "b", which reads nothing
    assert chapters.next_chapter(["c", "a", "b", "d"], {"a", "b", "c", "d"}, reads) == "a"
    assert chapters.next_chapter(["c", "b", "d"], {"a", "b", "c", "d"}, reads) == "b"
    # "a" done: "c" is free; "d" still waits for "b"
    assert chapters.next_chapter(["d", "c"], {"b", "c", "d"}, reads) == "c"
    # nothing free: the longest starts anyway and waits for what it reads
    assert chapters.next_chapter(["d", "e"], {"a", "d", "e"}, reads) == "d"
    # producers outside the build (cached, or not asked for) hold nothing up
    assert chapters.next_chapter(["c"], {"c"}, reads) == "c"
    with pytest.raises(ValueError, match="waiting"):
        chapters.next_chapter([], set(), reads)


def test_the_declared_reads_and_times_name_the_book_s_chapters():
    stems = [p.stem for p in chapters.chapter_paths()]
    assert set(chapters.EXPECTED_SECONDS) == set(stems)
    for reader, producers in chapters.READS.items():
        assert reader in stems and all(stems.index(p) < stems.index(reader) for p in producers)


def test_build_runs_chapters_side_by_side_then_takes_them_from_the_cache(tmp_path):
    books = tmp_path / "notebooks"
    books.mkdir()
    paths = [books / "00_probe.ipynb", books / "01_probe.ipynb"]
    for p in paths:
        shutil.copyfile(PROBE, p)
    cache, log = tmp_path / "executed", []
    runs = chapters.build(paths, tmp_path / "a", "smoke", jobs=2, cache=cache, log=log.append)
    assert [(r.stem, r.cached, r.error) for r in runs] == [("00_probe", False, ""), ("01_probe", False, "")]
    again = chapters.build(paths, tmp_path / "b", "smoke", jobs=2, cache=cache, log=log.append)
    assert all(r.cached for r in again) and "01_probe: from the cache" in log[-1]
    for p in paths:  # the copies from the cache are the files the parallel build wrote
        assert (tmp_path / "a" / p.name).read_bytes() == (tmp_path / "b" / p.name).read_bytes()


def test_normalise_drops_what_differs_between_runs_and_keeps_results(tmp_path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

    def notebook(uuid, rate, address):
        nb = new_notebook(cells=[new_markdown_cell("# t"), new_code_cell("x", outputs=[
            new_output("stream", name="stderr", text=f"train:  50%|#  | 5/10 [00:0{rate}<00:01, {rate}.1it/s]\r"
                                                     "UserWarning: a warning the reader may need\n"),
            new_output("execute_result", data={
                "text/html": f'<style>#T_{uuid}_row0_col0 {{color: red}}</style><table id="T_{uuid}">',
                "text/plain": f"<pandas.io.formats.style.Styler at 0x{address}>"}, execution_count=1)])])
        nb.metadata["papermill"] = {"start_time": f"2026-01-0{rate}", "duration": rate, "parameters": {"a": 1}}
        nb.cells[0]["id"], nb.cells[1]["id"] = "md", "code"  # nbformat draws random ids; a chapter's are fixed
        nb.cells[1].metadata["execution"] = {"iopub.status.busy": f"2026-01-0{rate}"}
        return nb

    paths = []
    for i, (uuid, rate, address) in enumerate([("ab12f", 1, "7fa44d948190"), ("0c9e3", 2, "7ffa48bdfd10")]):
        paths.append(tmp_path / f"{i}.ipynb")
        nbformat.write(notebook(uuid, rate, address), paths[-1])
        chapters.normalise(paths[-1])
    assert paths[0].read_bytes() == paths[1].read_bytes()
    nb = nbformat.read(paths[0], as_version=4)
    nbformat.validate(nb)
    outs = nb.cells[1].outputs
    assert outs[0].text.strip() == "UserWarning: a warning the reader may need"  # the bar went, the warning stayed
    assert 'id="T_t0000"' in outs[1].data["text/html"] and "#T_t0000_row0_col0" in outs[1].data["text/html"]
    assert nb.metadata.papermill == {"parameters": {"a": 1}}


def test_data_fingerprint_does_not_change_when_the_data_folder_is_created_empty(tmp_path, monkeypatch):
    """A cold build creates the data folder (chapter 2's scenes) while it runs: chapters keyed before and
    after must get the same key, or the next build re-executes them."""
    from pruning_utils import data as data_mod

    root = tmp_path / "data"
    monkeypatch.setattr(data_mod, "data_root", lambda: root)
    before = chapters.data_fingerprint()
    (root / "synthetic_broden" / "scenes").mkdir(parents=True)
    (root / "synthetic_broden" / "scenes" / "x.npz").write_bytes(b"generated")
    assert chapters.data_fingerprint() == before
    (root / "MNIST").mkdir()
    (root / "MNIST" / "train.gz").write_bytes(b"downloaded")
    assert chapters.data_fingerprint() != before  # a download is data


@pytest.mark.parametrize("shared", [True, False])
def test_idle_openmp_threads_sleep_only_when_processes_share_the_cores(tmp_path, monkeypatch, shared):
    seen = {}

    def fake_execute(src, out, **kw):
        seen["policy"] = os.environ.get("OMP_WAIT_POLICY")
        seen["dynamic"] = os.environ.get("OMP_DYNAMIC")
        Path(out).write_text(Path(src).read_text())

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(pm, "execute_notebook", fake_execute)
    chapters._execute(PROBE, tmp_path / "x.ipynb", {}, None, shared_cores=shared)
    assert seen == {"policy": "PASSIVE" if shared else None, "dynamic": "FALSE"}
    assert "OMP_WAIT_POLICY" not in os.environ  # restored after the run


def test_a_build_of_one_chapter_at_a_time_keeps_openmp_spinning(tmp_path, monkeypatch):
    calls = []
    def record(p, *args, shared_cores=True):
        calls.append(shared_cores)
        return chapters.Run(p.stem, "", 1.0, False)

    monkeypatch.setattr(chapters, "_execute_or_error", record)
    paths = chapters.chapter_paths()[:2]
    list(chapters._run_all(paths, tmp_path, {"size": "smoke"}, tmp_path, False, 1, lambda _: None))
    assert calls == [False, False]
