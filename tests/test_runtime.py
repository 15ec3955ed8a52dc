"""Same parameters, same numbers: results depend on the thread count a recipe fixes, never on how many
cores the process may use, nor on how many worker processes share the work."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from pruning_utils import runtime

# One short training per model family, each under its recipe's thread count; prints content hashes.
SCRIPT = r"""
import json, sys
import torch
from pruning_utils import data, models, runtime, train
from pruning_utils.train import TrainConfig
x = data.load("mnist5k", "train", pad=2)
small, probe = x.subset(96, 0), x.x[:32]
cases = {  # name: (model kwargs, threads, channels_last)
    "lenet5": (("lenet5", {}), 1, False),
    "lenet300100": (("lenet300100", {"in_features": 1024}), 2, False),
    "resnet": (("resnet", {"depth": 8, "in_channels": 1, "width": 8}), 2, True),
    "vgg": (("vgg", {"depth": 11, "in_channels": 1}), 2, False),
}
out = {}
for name, ((model, kwargs), threads, cl) in cases.items():
    runtime.seed_everything(0)
    net = models.build(model, **kwargs)
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.01, threads=threads, channels_last=cl)
    hist = train.fit(net, small, None, cfg, seed=0, device="cpu", progress=False)
    with runtime.threads(threads):
        logits = train.predict(net, probe)
    out[name] = [train.content_hash(net.state_dict()), hist["loss"], train.content_hash({"p": logits})]
print(json.dumps(out))
"""


def _train_in(tmp_path, cpus):
    cmd = [sys.executable, "-c", SCRIPT]
    if cpus is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", cpus, *cmd]
    # Two threads on one core: idle OpenMP threads must sleep, not spin, or every barrier waits out a time
    # slice (this changes the time taken, never a result).
    env = {**os.environ, **runtime.fixed_env(), "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset")
def test_training_does_not_depend_on_the_cores_the_process_may_use(tmp_path):
    one, two = _train_in(tmp_path, "0"), _train_in(tmp_path, "0,1")
    assert set(one) == {"lenet5", "lenet300100", "resnet", "vgg"}
    assert one == two  # weights (content hash), every step's loss and the outputs, for every family


def test_threads_is_part_of_the_recipe_and_of_the_result(tmp_path):
    from dataclasses import replace

    from pruning_utils import train
    from pruning_utils.train import Recipe, TrainConfig

    r1 = Recipe("lenet5", "mnist5k", TrainConfig(epochs=1, batch_size=64, lr=0.05, threads=1), pad=2,
                train_subset=256)
    r2 = replace(r1, config=replace(r1.config, threads=2))
    assert r1.key(0) != r2.key(0)
    before = torch.get_num_threads()
    m1, _ = train.train_cached(r1, 0, progress=False, directory=tmp_path)
    assert torch.get_num_threads() == before  # fit restores the caller's thread count
    m2, _ = train.train_cached(r2, 0, progress=False, directory=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 2
    # Two threads split the sums differently: the weights need not be equal, but each is reproducible.
    m1b, rec = train.train_cached(r1, 0, progress=False, directory=tmp_path)
    assert rec["cached"] and train.content_hash(m1.state_dict()) == train.content_hash(m1b.state_dict())


def test_imp_results_do_not_depend_on_workers(tmp_path):
    from functools import partial

    from pruning_utils import data, imp, models
    from pruning_utils.train import TrainConfig

    split = data.load("mnist5k", "train").subset(128, 0)
    test = data.load("mnist5k", "test").subset(100, 0)
    cfg = imp.IMPConfig(rounds=1, train=TrainConfig(epochs=1, batch_size=32, lr=0.05, threads=1), rewind_epochs=0)
    jobs = [imp.Job(partial(models.CifarResNet, depth=8, num_classes=10, in_channels=1, width=4), cfg,
                    {"case": "workers"}, seed) for seed in (0, 1)]
    serial = imp.run_many(jobs, split, test, workers=1, progress=False, directory=tmp_path / "a")
    parallel = imp.run_many(jobs, split, test, workers=2, progress=False, directory=tmp_path / "b")
    for s_run, p_run in zip(serial, parallel):
        assert [lv["test_acc"] for lv in s_run] == [lv["test_acc"] for lv in p_run]
        assert all(torch.equal(a["state"][k], b["state"][k]) for a, b in zip(s_run, p_run) for k in a["state"])


def test_seed_and_threads_are_checked():
    with pytest.raises(ValueError, match=r"seed=4294967296 is not allowed; expected an int in \[0, 4294967295\]"):
        runtime.seed_everything(2**32)
    with pytest.raises(ValueError, match="threads=0 is not allowed"):
        runtime.configure(0)
    with pytest.raises(ValueError, match="threads=True is not allowed"):
        with runtime.threads(True):
            pass
    before = torch.get_num_threads()
    with runtime.threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_channels_last_training_avoids_the_onednn_hang():
    """A ResNet-8 of width 4 has a 1x1 stride-2 shortcut with 4 input channels, whose channels_last backward
    pass hangs in oneDNN; fit must notice and train it in the contiguous layout (in a subprocess, so a
    hang fails the test instead of stalling it)."""
    from pruning_utils import models

    assert not runtime.channels_last_safe(models.build("resnet", depth=8, in_channels=1, width=4))
    assert runtime.channels_last_safe(models.build("resnet", depth=8, in_channels=1, width=8))
    code = ("import torch\nfrom pruning_utils import data, models, train\n"
            "from pruning_utils.train import TrainConfig\n"
            "net = models.build('resnet', depth=8, in_channels=1, width=4)\n"
            "split = data.load('mnist5k', 'train', pad=2).subset(64, 0)\n"
            "h = train.fit(net, split, None, TrainConfig(epochs=1, batch_size=32, channels_last=True),"
            " device='cpu', progress=False)\nprint(len(h['loss']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "2", done.stderr[-500:]


@pytest.mark.parametrize("threads", [1, 2])
def test_every_maths_pool_has_the_configured_threads_even_those_loaded_later(threads):
    """scipy's and scikit-learn's own OpenBLAS / OpenMP load when DoWhy or a regression first needs them,
    after the chapter configured its threads; they must not size themselves by the machine's cores (a
    fresh process, since a pool keeps the size it started with)."""
    code = ("from pruning_utils import runtime\n"
            f"runtime.configure({threads})\n"
            "import scipy.linalg, sklearn.linear_model, statsmodels.api, threadpoolctl\n"
            "print(sorted({i['num_threads'] for i in threadpoolctl.threadpool_info()}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.strip().splitlines()[-1] == f"[{threads}]"
