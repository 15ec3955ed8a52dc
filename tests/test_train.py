from dataclasses import replace

import pytest
import torch

from pruning_utils import baselines, data, train
from pruning_utils.params import ParameterError
from pruning_utils.train import Recipe, TrainConfig

TINY = Recipe("lenet5", "mnist5k", TrainConfig(epochs=1, batch_size=64, lr=0.05), pad=2, train_subset=256)


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cache_miss_then_hit(cache):
    net1, rec1 = train.train_cached(TINY, seed=0, progress=False)
    assert rec1["cached"] is False and len(list(cache.glob("*.pt"))) == 1
    net2, rec2 = train.train_cached(TINY, seed=0, progress=False)
    assert rec2["cached"] is True and rec2["test_acc"] == rec1["test_acc"]
    assert same_weights(net1, net2)


def test_key_depends_on_seed_and_settings():
    keys = {TINY.key(0), TINY.key(1), replace(TINY, train_subset=128).key(0),
            train.with_overrides(TINY, lr=0.1).key(0)}
    assert len(keys) == 4
    assert TINY.key(0) == Recipe("lenet5", "mnist5k", TrainConfig(epochs=1, batch_size=64, lr=0.05),
                                 pad=2, train_subset=256).key(0)


def test_training_is_deterministic(tmp_path):
    a, rec_a = train.train_cached(TINY, 0, progress=False, directory=tmp_path / "a")
    b, rec_b = train.train_cached(TINY, 0, progress=False, directory=tmp_path / "b")
    assert rec_a["cached"] is rec_b["cached"] is False
    assert same_weights(a, b) and rec_a["history"]["loss"] == rec_b["history"]["loss"]


def test_corrupt_checkpoint_is_retrained_not_used(cache):
    net, _ = train.train_cached(TINY, seed=0, progress=False)
    path = next(cache.glob("*.pt"))
    path.write_bytes(path.read_bytes()[:100])  # a truncated write
    with pytest.warns(UserWarning, match="unusable"):
        net2, rec = train.train_cached(TINY, seed=0, progress=False)
    assert rec["cached"] is False and same_weights(net, net2)
    assert train.load_checkpoint(path, TINY.key(0)) is not None  # the rewrite is whole again


def test_mismatched_checkpoint_is_retrained(cache):
    train.train_cached(TINY, seed=0, progress=False)
    path = next(cache.glob("*.pt"))
    ckpt = torch.load(path, weights_only=True)
    train.save_atomic({**ckpt, "key": "someone-else"}, path)
    with pytest.warns(UserWarning, match="unusable"):
        _, rec = train.train_cached(TINY, seed=0, progress=False)
    assert rec["cached"] is False


def test_checkpoint_with_wrong_shapes_is_retrained(cache):
    _, rec = train.train_cached(TINY, seed=0, progress=False)
    path = next(cache.glob("*.pt"))
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"]["convnet.c1.weight"] = torch.zeros(3, 1, 5, 5)
    train.save_checkpoint(ckpt, path)  # hashed anew: the file is sound, only its shapes do not fit
    with pytest.warns(UserWarning, match="does not fit the model"):
        _, rec2 = train.train_cached(TINY, seed=0, progress=False)
    assert rec2["cached"] is False and rec2["test_acc"] == rec["test_acc"]


def test_atomic_save_leaves_old_file_and_no_temporary_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    train.save_atomic({"a": torch.ones(2)}, path)

    def broken_save(obj, f):
        f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        train.save_atomic({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == [path]
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))


def test_training_learns_something():
    split = data.load("mnist5k", "test", pad=2)
    recipe = train.with_overrides(TINY, epochs=3, lr=0.1, batch_size=32)
    net = train.build_for(recipe)
    hist = train.fit(net, split, split, recipe.config, progress=False)
    assert len(hist["loss"]) == 3 * 32 and hist["epoch"] == [1, 2, 3]
    assert hist["loss"][-1] < hist["loss"][0]
    assert hist["test_acc"][-1] > 0.6  # 1,000 images, 3 epochs: far above chance (0.10)


def test_bad_config_and_device():
    with pytest.raises(ParameterError, match="optimizer='rmsprop' is not allowed"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ParameterError, match="device='tpu' is not allowed"):
        train.get_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device='cuda' was asked for but torch sees no GPU"):
            train.get_device("cuda")


def test_baseline_recipes_follow_overrides():
    r = baselines.recipe("resnet20", "default", dataset="cifar10", depth=8, epochs=2)
    assert r.model_kwargs == {"depth": 8, "in_channels": 3} and r.config.epochs == 2 and r.dataset == "cifar10"
    assert baselines.recipe("lenet5", "full").dataset == "mnist"
    with pytest.raises(ParameterError, match="name='vgg' is not allowed"):
        baselines.recipe("vgg")


def test_input_shape_of_a_recipe_is_its_data_sets_padded_image():
    assert baselines.input_shape(baselines.recipe("lenet5", "default")) == (1, 32, 32)  # MNIST padded by 2
    assert baselines.input_shape(baselines.recipe("resnet20", "default")) == (1, 28, 28)  # Fashion-MNIST
    assert baselines.input_shape(baselines.recipe("resnet20", "full")) == (3, 32, 32)  # CIFAR-10


@pytest.mark.parametrize("start", ["contiguous", "channels_last", "mixed, pruned"])
def test_predict_runs_images_in_channels_last_and_gives_the_model_back_as_it_was(start):
    from torch.nn.utils import prune as torch_prune

    from pruning_utils import models

    torch.manual_seed(0)
    net = models.CifarResNet(8, num_classes=3, in_channels=1, width=8)
    if start == "channels_last":
        net = net.to(memory_format=torch.channels_last)
    if start == "mixed, pruned":  # one stage in channels_last, masks (4-D buffers) on two convolutions
        for conv in (net.layer1[0].conv1, net.layer2[0].conv2):
            torch_prune.l1_unstructured(conv, "weight", amount=0.5)
        net.layer2.to(memory_format=torch.channels_last)
    strides = {k: v.stride() for k, v in [*net.named_parameters(), *net.named_buffers()]}
    x = torch.randn(40, 1, 16, 16)
    with torch.no_grad():
        expected = net.eval()(x.contiguous())
    out = train.predict(net, x, batch_size=16)
    assert torch.allclose(out, expected, atol=1e-5)
    assert {k: v.stride() for k, v in [*net.named_parameters(), *net.named_buffers()]} == strides
    if start == "mixed, pruned":  # the masked weight torch's pruning keeps as an attribute, in its layout
        assert net.layer1[0].conv1.weight.is_contiguous()
        net.layer1[0].conv1.weight = net.layer1[0].conv1.weight.contiguous(memory_format=torch.channels_last)
        net.layer1.to(memory_format=torch.contiguous_format)  # as `fit` leaves it: the attribute is stale
        train.predict(net, x, batch_size=16)
        assert net.layer1[0].conv1.weight.is_contiguous()
        torch_prune.global_unstructured([(net.layer1[0].conv1, "weight")], torch_prune.L1Unstructured, amount=2)
    assert not net.conv1.weight.is_inference()  # still trainable after an inference-mode pass
    net.train()(x[:4]).sum().backward()
    assert net.conv1.weight.grad is not None


def test_fit_leaves_pruned_weights_that_torch_pruning_can_prune_again():
    """Training in channels_last leaves torch pruning's masked `weight` attribute in that layout; `fit`
    recomputes it, so the next global pruning (which flattens it with `view`) works with no
    evaluation in between, as chapter 2's IMP rounds need."""
    from torch.nn.utils import prune as torch_prune

    from pruning_utils import models

    torch.manual_seed(0)
    net = models.CifarResNet(8, num_classes=3, in_channels=1, width=8)
    convs = [(m, "weight") for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    torch_prune.global_unstructured(convs, torch_prune.L1Unstructured, amount=0.3)
    split = data.Split(torch.rand(32, 1, 16, 16), torch.randint(0, 3, (32,)), ("a", "b", "c"), "noise")
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.01, channels_last=True, threads=1)
    train.fit(net, split, None, cfg, progress=False)
    for m, _ in convs:
        assert m.weight.is_contiguous()
        assert torch.equal(m.weight, m.weight_orig * m.weight_mask)
    torch_prune.global_unstructured(convs, torch_prune.L1Unstructured, amount=0.5)
    assert sum(int(m.weight_mask.eq(0).sum()) for m, _ in convs) >= 0.5 * sum(m.weight.numel()
                                                                               for m, _ in convs)
