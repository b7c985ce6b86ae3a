"""The diffusability figures against closed forms (eval.diffusability, autoencoder.equivariance)."""

import math

import pytest
import torch
import torch.nn.functional as F

from autoencoder.config import LossConfig
from autoencoder.equivariance import downsample, draw, valid_scales
from eval.diffusability import (
    HALF_NYQUIST,
    Diffusability,
    SpectrumAccumulator,
    equivariance_batch,
    power_spectra,
    radial_frequency,
)
from eval.engine import Outputs
from eval.fid import FeatureBank
from eval.metrics import psnr_per_image


def _images(n: int = 6, size: int = 32) -> torch.Tensor:
    """Smooth-ish random images in [-1, 1] (noise blurred by an 8x8 box, then stretched)."""
    g = torch.Generator().manual_seed(0)
    x = F.avg_pool2d(torch.rand(n, 3, size + 7, size + 7, generator=g), 8, stride=1)
    return (x - x.amin()) / (x.amax() - x.amin()) * 2 - 1


def _no_lpips(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().mean(dim=(1, 2, 3))


# A pointwise linear autoencoder 3 -> 2 -> 3 channels: D(E(y)) = P y with P = A⁺A a projection.
A = torch.tensor([[0.6, 0.3, 0.1], [-0.2, 0.5, 0.7]])
A_PINV = torch.linalg.pinv(A)


def _encode(x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ck,bkhw->bchw", A, x)


def _decode(z: torch.Tensor) -> torch.Tensor:
    return torch.einsum("kc,bchw->bkhw", A_PINV, z)


@pytest.mark.parametrize("scale", [2, 4])
def test_an_exactly_equivariant_autoencoder_scores_its_reconstruction_psnr_at_matched_resolution(scale):
    x = _images()
    small = downsample(x, scale)
    matched = psnr_per_image((_decode(_encode(small)).clamp(-1, 1) + 1) / 2, (small + 1) / 2)  # recon of ↓x
    got = equivariance_batch(_decode, x, _encode(x), scale, _no_lpips)["psnr"]
    assert torch.allclose(got, matched, atol=1e-4) and bool((matched < 60).all())  # lossy, so finite


def test_a_position_dependent_autoencoder_is_not_equivariant():
    # Encoder adds a fixed checkerboard, decoder removes it: perfect reconstruction at full size only.
    x = _images()
    board = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 2 - 1).float() * 0.5
    encode = lambda t: t + board[: t.shape[-2], : t.shape[-1]]
    decode = lambda z: z - board[: z.shape[-2], : z.shape[-1]]
    full = psnr_per_image((decode(encode(x)).clamp(-1, 1) + 1) / 2, (x + 1) / 2)
    eq = equivariance_batch(decode, x, encode(x), 2, _no_lpips)["psnr"]
    assert bool((full > 90).all()) and bool((eq < 20).all())


def test_white_noise_has_a_flat_spectrum_and_the_bin_share_above_half_nyquist():
    acc, shifted = SpectrumAccumulator(), SpectrumAccumulator()
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        noise = torch.randn(32, 4, 16, 16, generator=g)
        acc.update(power_spectra(noise))
        shifted.update(power_spectra(noise + 5.0))  # a mean offset is DC: removed, it changes nothing
    assert shifted.high_frequency_fraction() == pytest.approx(acc.high_frequency_fraction(), abs=1e-9)
    r = radial_frequency(16, 16)
    share = float((r > HALF_NYQUIST).sum() / (r.numel() - 1))  # of the non-DC bins
    assert acc.high_frequency_fraction() == pytest.approx(share, abs=0.005)
    _, power = acc.spectrum()
    assert max(power) / min(power) < 1.15  # flat: every radial bin has the same mean power


@pytest.mark.parametrize("k,expected", [(2, 0.0), (6, 1.0)])
def test_a_single_frequency_puts_all_power_below_or_above_half_nyquist(k, expected):
    pos = torch.arange(16, dtype=torch.float64)
    wave = torch.cos(2 * math.pi * k * pos / 16)[None, None, None, :].expand(2, 3, 16, 16)  # radius k/16
    acc = SpectrumAccumulator()
    acc.update(power_spectra(wave))
    assert acc.high_frequency_fraction() == pytest.approx(expected, abs=1e-9)


def test_a_smooth_latent_has_a_small_high_frequency_fraction():
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(16, 4, 16, 16, generator=g)
    low_pass = torch.fft.ifft2(torch.fft.fft2(noise) * (radial_frequency(16, 16) <= 0.2)).real  # band-limited
    acc = SpectrumAccumulator()
    acc.update(power_spectra(low_pass))
    assert acc.high_frequency_fraction() < 1e-9
    blurred = SpectrumAccumulator()  # an 8x8 box blur (not periodic: edges leak some power upwards)
    blurred.update(power_spectra(F.avg_pool2d(torch.randn(16, 4, 23, 23, generator=g), 8, stride=1)))
    assert blurred.high_frequency_fraction() < 0.25  # white noise: 0.80 (the bin share)


class _MomentFeatures(torch.nn.Module):
    """Per-channel mean and std of uint8 images: 6 features (a stand-in extractor with a closed form)."""

    num_features = 6

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


class _IdentityVAE:
    """decode(z) = z: latents are the images themselves."""

    @staticmethod
    def decode(z):
        from types import SimpleNamespace

        return SimpleNamespace(sample=z)


def _diffusability(accelerator, images: torch.Tensor, batch: int = 8) -> dict:
    """The engine's Diffusability metric over ``images`` as their own latents (posterior mode = the image)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    bank = FeatureBank(accelerator, {"moments": _MomentFeatures()})
    metric = Diffusability(accelerator, _IdentityVAE(), _no_lpips, bank, "moments", "ifd_moments", batch, seed=0)
    for start in range(0, len(images), batch):
        x = images[start : start + batch]
        posterior = DiagonalGaussianDistribution(torch.cat([x, torch.full_like(x, -30.0)], dim=1))
        out = Outputs(x, torch.arange(start, start + len(x)), posterior, x)
        bank.update(out)
        metric.update(out)
    bank.compute()
    return metric.compute()


def test_interpolation_fd_is_zero_when_every_neighbour_is_a_copy_and_grows_for_distinct_images(fresh_accelerator):
    """iFID's recipe with the identity as encoder and decoder: each of 3 images 11 times over, so an image's 10
    nearest other latents are all its copies, the drawn partner is one, slerp(z, z) = z decodes to the image
    itself, and the FD of the interpolations to the images is 0; distinct images interpolate to new ones."""
    x = _images(n=12)
    copies = x[:3].repeat_interleave(11, dim=0)  # [33, 3, 32, 32]
    report = _diffusability(fresh_accelerator(), copies)
    assert report["ifd_moments"] == pytest.approx(0.0, abs=1e-3) and report["n_images"] == 33
    assert report["equivariance"]["2"]["psnr"] > 90  # identity: D(↓z) is ↓x exactly
    assert _diffusability(fresh_accelerator(), x)["ifd_moments"] > 1.0


def test_the_training_draw_is_a_function_of_seed_and_step_within_the_valid_scales():
    cfg = LossConfig(equivariance_weight=0.5, equivariance_prob=0.5, equivariance_rotate=True)
    valid = valid_scales([2, 4], latent_size=8, image_size=64, lpips=True)
    assert valid == [2, 4] and valid_scales([2, 4], 8, 32, lpips=True) == [2]  # 32/4 = 8 px: too small for LPIPS
    draws = [draw(cfg, valid, seed=0, step=s) for s in range(400)]
    assert draws == [draw(cfg, valid, seed=0, step=s) for s in range(400)]  # replayable after a resume
    taken = [d for d in draws if d is not None]
    assert (
        0.4 < len(taken) / 400 < 0.6 and {d.scale for d in taken} == {2, 4} and {d.turns for d in taken} == {0, 1, 2, 3}
    )
    assert draw(LossConfig(), valid, 0, 0) is None  # weight 0: off


def test_the_per_image_noise_of_a_batch_is_drawn_once_per_seed():
    """LatentReport and Diffusability both take posterior samples with the evaluation seed: one draw serves both."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from autoencoder.models import seeded_noise

    posterior = DiagonalGaussianDistribution(torch.zeros(3, 8, 2, 2))  # [B, 2C, h, w]: mean 0, logvar 0
    out = Outputs(torch.zeros(3, 3, 8, 8), torch.tensor([4, 9, 2]), posterior, torch.zeros(3, 3, 8, 8))
    first = out.noise(7)
    assert out.noise(7) is first and out.noise(8) is not first
    torch.testing.assert_close(first, seeded_noise((4, 2, 2), torch.tensor([4, 9, 2]), 7), rtol=0, atol=0)
