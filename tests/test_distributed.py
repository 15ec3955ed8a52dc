"""Training under torchrun (DistributedDataParallel, gloo, 2 CPU processes) against one process."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pruning_utils import distributed, train

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
import ddp_probe  # noqa: E402


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run the probe on 2 ranks with torchrun; return the per-rank results and the cache folder."""
    out, cache = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("ddp_cache")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HELPERS / "ddp_probe.py"), str(out), str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return ranks, cache


def test_loss_curve_matches_one_process_with_the_same_global_batch(two_ranks):
    ranks, _ = two_ranks
    one = train.fit(ddp_probe.mlp(), ddp_probe.synthetic(0), ddp_probe.synthetic(1), ddp_probe.CFG, seed=3,
                    progress=False)
    assert [r["world"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    assert len(ranks[0]["loss"]) == len(one["loss"]) == 14  # 7 global batches per epoch, the last ragged
    for r in ranks:  # every rank logs the global batch's loss, as one process does
        assert r["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-5)
        assert r["train_acc"] == pytest.approx(one["train_acc"], abs=1e-9)
    assert one["loss"][-1] < one["loss"][0]  # it learns: the comparison is not between two flat lines


def test_rank_0_writes_one_cache_entry_and_the_others_load_it(two_ranks):
    ranks, cache = two_ranks
    entries = sorted(p.name for p in cache.glob("*.pt"))
    # one baseline checkpoint, one IMP run and the dense network it starts from: not one per rank
    assert len(entries) == 3, entries
    assert sum(e.startswith("imp-dense-") for e in entries) == 1 and sum(e.startswith("imp-") for e in entries) == 2
    assert list(cache.glob("*.tmp")) == []
    assert ranks[0]["baseline_hash"] == ranks[1]["baseline_hash"]
    assert ranks[0]["imp_hash"] == ranks[1]["imp_hash"]
    assert not any(r["baseline_cached"] or r["imp_cached"] for r in ranks)
    # what rank 0 wrote is what every rank holds, and a later (one-process) run takes it from the cache
    model, record = train.train_cached(ddp_probe.RECIPE, 0, progress=False, directory=cache)
    assert record["cached"] and train.content_hash(model.state_dict()) == ranks[0]["baseline_hash"]
    assert all(r["device"] == "cpu" for r in ranks)


def test_shard_and_sum_are_identities_in_one_process():
    batch = torch.arange(10)
    assert not distributed.is_active() and distributed.world_size() == 1 and distributed.rank() == 0
    assert torch.equal(distributed.shard(batch), batch)
    assert distributed.all_sum([1.5, 2.0]) == [1.5, 2.0]
    calls = []
    entry, hit = distributed.cached(lambda: None, lambda: calls.append(1) or {"x": 1}, calls.append)
    assert entry == {"x": 1} and not hit and calls == [1, {"x": 1}]
    entry, hit = distributed.cached(lambda: {"x": 2}, lambda: pytest.fail("computed a cached entry"),
                                    lambda e: pytest.fail("saved a cached entry"))
    assert entry == {"x": 2} and hit


def _train_tiny(cache: str) -> bool:
    """In a separate process: train (or load) the probe's tiny recipe; return whether it was cached."""
    return bool(train.train_cached(ddp_probe.RECIPE, 0, progress=False, directory=Path(cache))[1]["cached"])


def test_two_processes_wanting_one_model_train_it_once(tmp_path):
    """The per-entry lock: chapters executed side by side that need the same model do not both train it."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        cached = sorted(pool.map(_train_tiny, [str(tmp_path)] * 2))
    assert cached == [False, True]
    assert len(list(tmp_path.glob("*.pt"))) == 1
