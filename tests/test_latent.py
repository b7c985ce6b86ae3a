"""The latent report (eval.latent) against closed forms, and on models with known structure."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from autoencoder.config import ModelConfig
from autoencoder.models import build_vae
from eval.latent import (
    SCALES,
    LatentAccumulator,
    LikelihoodAccumulator,
    collapse_warning,
    discretized_laplace_log_prob,
    elbo_and_iwae,
    gaussian_fd_to_standard,
    kl_elements,
    laplace_log_likelihood,
    log_weights,
    normal_log_prob,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _noise(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed))


def test_kl_rate_and_bits_per_pixel_match_closed_forms():
    # KL(N(μ, σ²) || N(0, 1)) = ½(μ² + σ² − 1 − log σ²)
    mean = torch.tensor([1.0, 0.0, -2.0])
    logvar = torch.tensor([0.0, 1.0, math.log(0.25)])
    expected = torch.tensor([0.5, 0.5 * (math.e - 2.0), 0.5 * (4 + 0.25 - 1 - math.log(0.25))])
    assert torch.allclose(kl_elements(mean, logvar), expected)
    # 3 images of 16x16 px with latents [2, 2, 2], every element N(1, 1): 0.5 nats per element
    acc = LatentAccumulator()
    acc.update(torch.ones(3, 2, 2, 2), torch.zeros(3, 2, 2, 2), (16, 16), _noise(3, 2, 2, 2))
    report = acc.compute()
    assert report["kl_per_latent_nats"] == pytest.approx(0.5)
    assert report["kl_per_image_nats"] == pytest.approx(4.0)  # 8 elements x 0.5
    assert report["rate_bpp"] == pytest.approx(4.0 / (16 * 16 * math.log(2)))
    assert report["kl_per_channel_nats"] == pytest.approx([0.5, 0.5])
    assert report["posterior_std_per_channel"] == pytest.approx([1.0, 1.0])


def test_discretised_laplace_is_a_distribution_over_the_256_levels():
    levels = torch.arange(256, dtype=torch.float64)
    for loc in (0.3, 100.0, 127.7, 254.9, -20.0, 300.0):
        for scale in (0.3, 2.0, 40.0):
            logp = discretized_laplace_log_prob(levels, torch.full_like(levels, loc), scale)
            assert torch.isfinite(logp).all()
            assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9), (loc, scale)
            # interior bins against the CDF difference computed directly
            cdf = lambda t, loc=loc, scale=scale: torch.where(
                t < loc, 0.5 * torch.exp((t - loc) / scale), 1 - 0.5 * torch.exp(-(t - loc) / scale)
            )
            direct = cdf(levels[1:-1] + 0.5) - cdf(levels[1:-1] - 0.5)
            keep = direct > 1e-12
            assert torch.allclose(logp[1:-1][keep], direct[keep].log(), atol=1e-6)


def test_prior_fd_is_zero_for_the_prior_and_grows_with_shift_and_scale():
    def fd_of(samples: torch.Tensor) -> float:  # samples [N, C] as point-mass posteriors [N, C, 1, 1]
        acc = LatentAccumulator()
        point_mass = torch.full((*samples.shape, 1, 1), -30.0)
        acc.update(samples[:, :, None, None], point_mass, (8, 8), _noise(*point_mass.shape))
        return acc.compute()["prior_fd"]

    z = torch.randn(40000, 4, generator=_gen(1))
    assert fd_of(z) < 0.01
    assert fd_of(z + 1.0) == pytest.approx(4.0, abs=0.05)  # ||m||² = 4
    assert fd_of(2.0 * z) == pytest.approx(4.0, abs=0.1)  # d (s − 1)² = 4
    assert fd_of(z + 3.0) > fd_of(z + 1.0) > fd_of(z + 0.3) > fd_of(z)
    # the closed form directly
    assert gaussian_fd_to_standard(torch.zeros(3), torch.eye(3) * 9.0) == pytest.approx(3 * (3 - 1) ** 2)


def _photos(n: int, size: int = 32) -> torch.Tensor:
    """n crops of real photographs (scikit-image) in [-1, 1], [n, 3, size, size]."""
    import skimage.data

    images = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    rng = np.random.default_rng(0)
    crops = []
    for i in range(n):
        img = images[i % len(images)]
        y, x = rng.integers(0, img.shape[0] - 4 * size), rng.integers(0, img.shape[1] - 4 * size)
        crop = Image.fromarray(img[y : y + 4 * size, x : x + 4 * size]).resize((size, size), Image.BICUBIC)
        crops.append(torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(crops)


def _report(vae, x: torch.Tensor) -> dict:
    acc = LatentAccumulator()
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
    acc.update(posterior.mean, posterior.logvar, tuple(x.shape[-2:]), _noise(*posterior.mean.shape))
    return acc.compute()


def test_active_units_find_channels_forced_to_collapse_and_spare_a_healthy_model():
    torch.manual_seed(0)
    vae = build_vae(ModelConfig(preset="cpu-small")).eval()
    x = _photos(24)
    healthy = _report(vae, x)
    assert healthy["collapsed_channels"] == [] and healthy["active_channels"] == 4
    assert collapse_warning(healthy) is None
    with torch.no_grad():  # the posterior mean of channels 1 and 3 no longer depends on the image
        for c in (1, 3):
            vae.quant_conv.weight[c].zero_()
    collapsed = _report(vae, x)
    assert collapsed["collapsed_channels"] == [1, 3] and collapsed["active_channels"] == 2
    assert collapsed["active_fraction_per_channel"][1] == 0.0 and collapsed["active_fraction_per_channel"][0] > 0
    warning = collapse_warning(collapsed)
    assert "[1, 3]" in warning and "posterior collapse" in warning


class _KnownLikelihoodVAE(torch.nn.Module):
    """q(z|x) = N(m, s²) per latent element; the decoder ignores z and outputs ``image``.

    So p(x|z) = p(x): the discretised Laplace probability of x around ``image``, in closed form, and
    ELBO = log p(x) − KL(q ‖ N(0, I)) in expectation, IWAE(k) → log p(x) as k grows.
    """

    dtype = torch.float32

    def __init__(self, image: torch.Tensor, m: float, s: float, latent_shape=(2, 1, 1)):
        super().__init__()
        self.image, self.m, self.s, self.latent_shape = image, m, s, latent_shape

    def encode(self, x):
        from types import SimpleNamespace

        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        mean = torch.full((x.shape[0], *self.latent_shape), self.m)
        logvar = torch.full_like(mean, 2 * math.log(self.s))
        return SimpleNamespace(latent_dist=DiagonalGaussianDistribution(torch.cat([mean, logvar], 1)))

    def decode(self, z):
        from types import SimpleNamespace

        return SimpleNamespace(sample=self.image.expand(z.shape[0], *self.image.shape[1:]))


def _laplace_log_px(levels: torch.Tensor, loc: torch.Tensor, scale: float) -> torch.Tensor:
    """log p(x) per image from torch's Laplace CDF: bins [k − ½, k + ½], the end bins open to ±∞."""
    laplace = torch.distributions.Laplace(loc.double(), scale)
    upper = torch.where(levels >= 255, torch.ones_like(loc.double()), laplace.cdf(levels.double() + 0.5))
    lower = torch.where(levels <= 0, torch.zeros_like(loc.double()), laplace.cdf(levels.double() - 0.5))
    return (upper - lower).log().flatten(1).sum(1)


def test_elbo_and_iwae_match_a_model_whose_likelihood_is_known_in_closed_form():
    """ELBO = log p(x) − KL(q‖p) (closed form); IWAE(k) rises with k and reaches log p(x).

    A wrong log p(z), log q(z|x) or log p(x|z) term moves the ELBO off its closed form; the old
    checks (IWAE ≥ ELBO, equality at k = 1) held for any log-weights.
    """
    torch.manual_seed(0)
    m, s, scale, dims = 0.3, 0.8, 40.0, 2  # a scale at which the CDF differences keep their digits
    decoded = torch.rand(1, 3, 4, 4) * 2 - 1  # the decoder's output, in [-1, 1]
    vae = _KnownLikelihoodVAE(decoded, m, s)
    x = torch.rand(64, 3, 4, 4) * 2 - 1  # 64 images: independent estimates of each bound
    x[:, 0, 0, 0], x[:, 0, 0, 1] = -1.0, 1.0  # the open end bins are used too
    log_px = _laplace_log_px(((x + 1) * 127.5).round(), (decoded + 1) * 127.5, scale)  # [64]
    kl = dims * (0.5 * (s**2 + m**2 - 1) - math.log(s))

    def weights(k: int, seed: int) -> torch.Tensor:  # [k, 64] at the one decoder scale
        noise = _noise(k, 64, 2, 1, 1, seed=seed)
        return log_weights(vae, x, vae.encode(x).latent_dist, torch.tensor([scale]), noise)[..., 0].double()

    big = weights(4000, 1)
    elbo, iwae = elbo_and_iwae(big)
    assert elbo.mean().item() == pytest.approx((log_px - kl).mean().item(), abs=0.01)
    assert torch.allclose(iwae, log_px, atol=0.1)  # each image's estimate, k = 4000
    assert iwae.mean().item() == pytest.approx(log_px.mean().item(), abs=0.01)
    iwae_by_k = [elbo_and_iwae(weights(k, k))[1].mean().item() for k in (1, 8, 64)]
    assert iwae_by_k[0] < iwae_by_k[1] < iwae_by_k[2] < log_px.mean().item()
    assert iwae_by_k[0] == pytest.approx((log_px - kl).mean().item(), abs=0.1)  # k = 1 is one ELBO sample


def test_sampled_kl_term_matches_the_closed_form():
    g = _gen(7)
    mean, logvar = torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([[0.0, -1.0, 0.7]])
    z = mean + (0.5 * logvar).exp() * torch.randn(200000, 3, generator=g)
    log_q = normal_log_prob(z, mean.expand_as(z), logvar.expand_as(z))
    log_p = normal_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
    assert (log_q - log_p).mean().item() == pytest.approx(kl_elements(mean, logvar).sum().item(), rel=0.01)


def test_the_likelihood_at_every_grid_scale_equals_the_discretised_laplace_summed_value_by_value():
    """``laplace_log_likelihood`` (values whose bin lies on one side of the mean summed in closed form) equals
    ``discretized_laplace_log_prob`` summed value by value at every scale, for values inside, straddling and at the
    ends; and torch's Laplace CDF differences where those keep their digits (a wide scale)."""
    g = _gen(3)
    target = torch.randint(0, 256, (4, 3, 8, 8), generator=g).double()
    target[0, 0, 0, :4] = torch.tensor([0.0, 255.0, 0.0, 255.0])  # the open end bins
    loc = target + torch.randn(target.shape, generator=g, dtype=torch.float64) * 6  # most values off by > ½
    loc[1] = target[1] + torch.rand(target[1].shape, generator=g, dtype=torch.float64) - 0.5  # within ½: straddle
    scales = torch.tensor([0.5, 2.0, 7.3, 40.0], dtype=torch.float64)
    got = laplace_log_likelihood(target, loc, scales)  # [4, 4]
    for g_i, b in enumerate(scales.tolist()):
        by_value = discretized_laplace_log_prob(target, loc, b).flatten(1).sum(1)
        assert torch.allclose(got[:, g_i], by_value, rtol=1e-12, atol=1e-9), b
    assert torch.allclose(got[:, -1], _laplace_log_px(target, loc, 40.0), rtol=1e-9)


def test_the_bound_is_reported_at_the_grid_scale_nearest_the_ml_scale():
    acc = LikelihoodAccumulator()
    weights = torch.arange(len(SCALES), dtype=torch.float64).expand(1, 2, -1) * -1.0  # [k=1, B=2, G]
    acc.update(weights, torch.tensor([3.0, 3.4]))  # ML scale: mean |x − x̂| = 3.2 levels
    report = acc.compute((2, 2), k=1)
    g = int((SCALES - 3.2).abs().argmin())
    assert report["laplace_ml_scale_levels"] == pytest.approx(3.2)
    assert report["laplace_scale_levels"] == pytest.approx(float(SCALES[g])) == pytest.approx(2 ** (7 / 4))
    assert report["neg_elbo_bpd"] == pytest.approx(g / (3 * 4 * math.log(2)))  # −(−g) nats per image
