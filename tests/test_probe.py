"""The linear probe (eval.probe) and the checkerboard control (eval.diffusability.CheckerboardVAE)."""

import torch

from autoencoder.config import ModelConfig
from autoencoder.models import build_vae
from eval.diffusability import CheckerboardVAE, SpectrumAccumulator, checkerboard, power_spectra
from eval.probe import probe_accuracy


def _blobs(n: int, seed: int, classes: int = 3, dim: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """``classes`` Gaussian blobs (std 1) whose means are 8 apart along their own axis: linearly separable."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.zeros(classes, dim)
    centres[torch.arange(classes), torch.arange(classes)] = 8.0
    return centres[labels] + torch.randn(n, dim, generator=g), labels


def test_the_probe_separates_linearly_separable_classes_and_not_random_labels():
    train, train_labels = _blobs(300, seed=0)
    test, test_labels = _blobs(150, seed=1)
    found = probe_accuracy(train, train_labels, test, test_labels)
    assert found["top1"] == 1.0 and found["classes"] == 3 and found["n_train"] == 300
    shuffled = train_labels[torch.randperm(300, generator=torch.Generator().manual_seed(2))]
    chance = probe_accuracy(train, shuffled, test, test_labels)
    assert chance["top1"] < 0.6  # labels unrelated to the features: near 1/3 on held-out images
    assert probe_accuracy(train, train_labels, test, test_labels) == found  # deterministic: zero start, full batch


def test_the_checkerboard_control_is_invertible_and_reconstructs_as_its_vae():
    torch.manual_seed(0)
    vae = build_vae(ModelConfig(preset="tiny")).eval()
    vae.register_to_config(shift_factor=0.3)
    control = CheckerboardVAE(vae)
    z = torch.randn(2, 4, 8, 8)
    assert torch.allclose(control.flip(control.flip(z)), z, atol=1e-6)  # its own inverse (float32 round-off of ±m)
    board = checkerboard(8, 8)
    assert torch.equal(control.flip(z), 0.3 + board * (z - 0.3)) and board.abs().eq(1).all()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        plain, flipped = vae.encode(x).latent_dist, control.encode(x).latent_dist
        same = torch.allclose(control.decode(flipped.mode()).sample, vae.decode(plain.mode()).sample, atol=1e-5)
    assert same and torch.equal(flipped.logvar, plain.logvar)  # identical reconstructions, the same variances
    smooth, harder = SpectrumAccumulator(), SpectrumAccumulator()
    smooth.update(power_spectra(plain.mode()))
    harder.update(power_spectra(flipped.mode()))
    assert harder.high_frequency_fraction() > max(0.9, smooth.high_frequency_fraction())  # power moved up
