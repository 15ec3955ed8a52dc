import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty checkpoint cache for one test."""
    d = tmp_path / "cache"
    monkeypatch.setenv("PRUNING_BOOK_CACHE", str(d))
    return d
