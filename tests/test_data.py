import gzip

import numpy as np
import pytest
import torch

from pruning_utils import data
from pruning_utils.params import ParameterError


def test_mnist5k_split_is_deterministic_stratified_and_disjoint():
    a_train, a_test = data.load("mnist5k", "train"), data.load("mnist5k", "test")
    b_train = data.load("mnist5k", "train")
    assert (len(a_train), len(a_test)) == (4000, 1000)
    assert torch.equal(a_train.x, b_train.x) and torch.equal(a_train.y, b_train.y)
    assert torch.bincount(a_test.y).tolist() == [100] * 10  # 500 per class, 20% held out
    assert torch.bincount(a_train.y).tolist() == [400] * 10
    flat_train = {bytes(row) for row in (a_train.x.flatten(1) * 255).round().byte().numpy()}
    assert not any(bytes(row) in flat_train for row in (a_test.x.flatten(1) * 255).round().byte().numpy())
    other = data.load("mnist5k", "test", seed=1)
    assert not torch.equal(other.y, a_test.y) or not torch.equal(other.x, a_test.x)


def test_images_are_scaled_and_padded():
    split = data.load("mnist5k", "test", pad=2)
    assert split.x.shape == (1000, 1, 32, 32)
    assert split.x.dtype == torch.float32 and 0.0 <= split.x.min() and split.x.max() <= 1.0
    assert split.x[:, :, :2].abs().sum() == 0 and split.x[:, :, :, -2:].abs().sum() == 0


def test_stratified_subset():
    split = data.load("mnist5k", "train")
    sub = split.subset(200, seed=0)
    assert torch.bincount(sub.y).tolist() == [20] * 10
    assert torch.equal(sub.x, split.subset(200, seed=0).x)
    assert split.subset(None) is split


def test_fashion_mnist_from_debian_files():
    train, test = data.load("fashion-mnist", "train"), data.load("fashion-mnist", "test")
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert torch.bincount(test.y).tolist() == [1000] * 10
    assert train.classes[0] == "T-shirt/top"


def test_read_idx_on_a_hand_made_file(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())
    np.testing.assert_array_equal(data.read_idx(path), arr)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_dataset_says_how_to_get_it_and_does_not_download(name, tmp_path):
    with pytest.raises(data.DatasetUnavailable, match=rf"dataset='{name}' is not in .* pass download=True"):
        data.load(name, "test", root=tmp_path)
    assert not any(tmp_path.rglob("*.gz")) and not any(tmp_path.rglob("*.tar.gz"))


def test_bad_names():
    with pytest.raises(ParameterError, match="dataset='imagenet' is not allowed; choose one of 'mnist5k'"):
        data.load("imagenet")
    with pytest.raises(ParameterError, match="split='val' is not allowed"):
        data.load("mnist5k", "val")


def test_a_failed_download_says_the_download_failed_not_pass_download(tmp_path, monkeypatch):
    import time
    import urllib.error

    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets.utils, "urlopen", offline, raising=False)
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive",
                        lambda *a, **k: offline(), raising=False)
    start = time.perf_counter()
    with pytest.raises(data.DatasetUnavailable, match=r"dataset='mnist' with download=True: the download from "
                                                      r"torchvision's mirrors failed .* no internet") as err:
        data.load("mnist", "test", root=tmp_path, download=True)
    assert "pass download=True" not in str(err.value)
    assert time.perf_counter() - start < 30
