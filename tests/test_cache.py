"""The checkpoint cache never serves damaged, foreign or malformed weights, never loses a trained model to
an unwritable folder, and cleans up what an interrupted save left behind."""
import os
import time

import pytest
import torch

from pruning_utils import train
from pruning_utils.train import Recipe, TrainConfig

TINY = Recipe("lenet5", "mnist5k", TrainConfig(epochs=1, batch_size=64, lr=0.05, threads=1), pad=2,
              train_subset=256)


def _trained(cache):
    net, rec = train.train_cached(TINY, seed=0, progress=False)
    return net, rec, next(cache.glob("*.pt"))


def _same(a, b):
    return train.content_hash(a.state_dict()) == train.content_hash(b.state_dict())


def test_a_byte_flipped_inside_a_tensor_is_detected_and_retrained(cache):
    net, rec, path = _trained(cache)
    raw = bytearray(path.read_bytes())
    weights = net.state_dict()["convnet.c1.weight"].numpy().tobytes()
    at = bytes(raw).find(weights[:64])  # the tensor's bytes are stored as they are inside the zip
    assert at > 0
    raw[at + 5] ^= 0xFF
    path.write_bytes(bytes(raw))
    torch.load(path, weights_only=True)  # torch itself does not notice (no CRC check) ...
    with pytest.warns(UserWarning, match="does not match its stored hash"):  # ... the cache does
        net2, rec2 = train.train_cached(TINY, seed=0, progress=False)
    assert rec2["cached"] is False and _same(net, net2)


def test_nan_weights_are_retrained(cache):
    net, _, path = _trained(cache)
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"]["convnet.c1.weight"][0, 0, 0, 0] = float("nan")
    train.save_checkpoint(ckpt, path)  # a correct hash of bad weights
    with pytest.warns(UserWarning, match="NaN or infinity"):
        net2, rec2 = train.train_cached(TINY, seed=0, progress=False)
    assert rec2["cached"] is False and _same(net, net2)


@pytest.mark.parametrize("damage,message", [
    (lambda ck: ck.pop("record"), "missing field"),
    (lambda ck: ck.__setitem__("record", [1, 2]), "'record' is a list"),
    (lambda ck: ck.pop("sha256"), "stored hash"),
])
def test_malformed_entries_are_retrained(cache, damage, message):
    _, _, path = _trained(cache)
    ckpt = torch.load(path, weights_only=True)
    damage(ckpt)
    if "sha256" in ckpt:
        train.save_checkpoint(ckpt, path)
    else:
        train.save_atomic(ckpt, path)
    with pytest.warns(UserWarning, match=message):
        _, rec = train.train_cached(TINY, seed=0, progress=False)
    assert rec["cached"] is False


def test_a_folder_in_the_files_place_is_replaced(cache):
    _, _, path = _trained(cache)
    path.unlink()
    path.mkdir()
    (path / "junk").write_text("x")
    with pytest.warns(UserWarning, match="a folder"):
        _, rec = train.train_cached(TINY, seed=0, progress=False)
    assert rec["cached"] is False and path.is_file()
    assert train.train_cached(TINY, seed=0, progress=False)[1]["cached"] is True


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_a_read_only_cache_fails_before_training_as_user(cache):
    cache.mkdir(parents=True)
    cache.chmod(0o500)
    try:
        with pytest.raises(train.CacheNotWritable, match="PRUNING_BOOK_CACHE"):
            train.train_cached(TINY, seed=0, progress=False)
    finally:
        cache.chmod(0o700)


def test_a_read_only_cache_fails_before_training(cache, monkeypatch):
    """As root (CI) permissions do not stop a write, so the probe write itself is made to fail."""
    calls = []
    monkeypatch.setattr(train, "fit", lambda *a, **k: calls.append(1))

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(train.tempfile, "mkstemp", refuse)
    with pytest.raises(train.CacheNotWritable, match="export PRUNING_BOOK_CACHE="):
        train.train_cached(TINY, seed=0, progress=False)
    assert calls == []  # nothing was trained


def test_stale_temporaries_are_removed(tmp_path):
    dead = tmp_path / "x.pt.999999999.abc.tmp"  # a writer pid that cannot exist
    old = tmp_path / f"y.pt.{os.getpid()}.def.tmp"
    mine = tmp_path / f"z.pt.{os.getpid()}.ghi.tmp"  # a live writer's recent temporary: kept
    for p in (dead, old, mine):
        p.write_bytes(b"half a checkpoint")
    a_day_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (a_day_ago, a_day_ago))
    removed = train.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([dead.name, old.name])
    assert mine.exists() and not dead.exists() and not old.exists()
    train.save_atomic({"a": torch.ones(1)}, tmp_path / "ok.pt")  # saving cleans up as well
    assert [p.name for p in tmp_path.glob("*.tmp")] == [mine.name]
