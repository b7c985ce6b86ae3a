"""The objective: LPIPS gradients, KL closed form, beta schedules, GAN weighting and isolation."""

import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch.distributions import Normal, kl_divergence

from autoencoder.config import LossConfig, ModelConfig
from autoencoder.losses import NLayerDiscriminator, VAELoss, adaptive_disc_weight, beta_at, kl_loss
from autoencoder.lpips_weights import build_lpips
from autoencoder.models import VAEForTraining, build_vae


@pytest.fixture(scope="module")
def vgg_lpips():
    from conftest import SHARED

    return build_lpips("vgg", str(SHARED / "weights" / "lpips"))


def tiny_model() -> VAEForTraining:
    return VAEForTraining(build_vae(ModelConfig(preset="tiny")))


def posterior(batch=3, channels=4, size=5) -> DiagonalGaussianDistribution:
    params = torch.randn(batch, 2 * channels, size, size)
    return DiagonalGaussianDistribution(params)


def test_lpips_term_alone_gives_decoder_gradient(vgg_lpips):
    cfg = LossConfig(rec_weight=0.0, kl_weight=0.0, lpips_weight=1.0)
    loss_fn = VAELoss(cfg, lpips_model=vgg_lpips)
    model = tiny_model()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, post = model(x)
    loss, logs = loss_fn(x, recon, post, step=0)
    assert torch.allclose(loss, logs["train/p_loss"])  # nothing else contributes
    loss.backward()
    decoder_grad = sum(p.grad.abs().sum() for p in model.vae.decoder.parameters() if p.grad is not None)
    assert decoder_grad > 0
    assert all(p.grad is None for p in vgg_lpips.parameters())  # LPIPS itself stays frozen


def test_kl_matches_closed_form():
    post = posterior()
    q = Normal(post.mean, post.std)
    expected = kl_divergence(q, Normal(torch.zeros_like(post.mean), torch.ones_like(post.std))).sum() / 3
    assert torch.allclose(kl_loss(post), expected, rtol=1e-5)
    # and the loss applies beta to it: loss = 0 * rec + beta * KL
    cfg = LossConfig(rec_weight=0.0, lpips_weight=0.0, kl_weight=0.25)
    x = torch.zeros(3, 3, 8, 8)
    loss, _ = VAELoss(cfg)(x, x, post, step=0)
    assert torch.allclose(loss, 0.25 * expected, rtol=1e-5)


def test_free_bits_floor_per_channel():
    mean = torch.zeros(2, 3, 4, 4)
    logvar = torch.zeros(2, 3, 4, 4)
    mean[:, 0] = 2.0  # channel 0: KL 2 nats per element; channels 1-2: exactly 0
    post = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    assert torch.allclose(kl_loss(post), torch.tensor(2.0 * 16))
    # floor of 0.5 nats/element = 8 nats per channel lifts the two empty channels only
    assert torch.allclose(kl_loss(post, free_bits=0.5), torch.tensor(2.0 * 16 + 2 * 8))
    # below the floor there is no gradient pushing KL further down
    mean.requires_grad_(True)
    post = DiagonalGaussianDistribution(torch.cat([mean * 0.1, logvar], dim=1))
    kl_loss(post, free_bits=1.0).backward()
    assert mean.grad.abs().sum() == 0


@pytest.mark.parametrize(
    "schedule, kwargs, steps, expected",
    [
        ("constant", {}, [0, 10, 1000], [1e-3, 1e-3, 1e-3]),
        ("linear", {"kl_warmup_steps": 100}, [0, 25, 100, 500], [0.0, 2.5e-4, 1e-3, 1e-3]),
        ("linear", {"kl_warmup_steps": 0}, [0], [1e-3]),
        (
            "cyclical",
            {"kl_cycle_steps": 100, "kl_cycle_ratio": 0.5},
            [0, 25, 50, 99, 100, 125],
            [0.0, 5e-4, 1e-3, 1e-3, 0.0, 5e-4],
        ),
    ],
)
def test_beta_schedules(schedule, kwargs, steps, expected):
    cfg = LossConfig(kl_weight=1e-3, kl_schedule=schedule, **kwargs)
    assert [beta_at(s, cfg) for s in steps] == pytest.approx(expected)


def test_adaptive_weight_matches_formula_on_toy_model():
    torch.manual_seed(1)
    x, target, a = torch.randn(6), torch.randn(6), torch.randn(6)
    w = torch.randn(6, requires_grad=True)  # the "last layer"
    recon = w * x
    nll = (recon - target).abs().mean()  # d/dw = sign(wx - t) * x / 6
    g_loss = -(a * recon).sum()  # linear "discriminator": d/dw = -a * x
    got = adaptive_disc_weight(nll, g_loss, w)
    expected = (torch.sign(w * x - target) * x / 6).norm() / ((a * x).norm() + 1e-4)
    assert torch.allclose(got, expected.detach(), rtol=1e-6)
    assert not got.requires_grad
    # a vanishing GAN gradient is clamped rather than exploding
    nll_norm = (torch.sign(w * x - target) * x / 6).norm().item()
    assert adaptive_disc_weight(nll, (w * 0).sum(), w).item() == pytest.approx(min(1e4, nll_norm / 1e-4))
    assert adaptive_disc_weight(nll * 1e3, (w * 0).sum(), w).item() == 1e4


def test_discriminator_step_leaves_no_gradient_on_vae():
    model, disc = tiny_model(), NLayerDiscriminator(channels=8, n_layers=2)
    loss_fn = VAELoss(LossConfig(lpips_weight=0.0, disc_enabled=True))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, _ = model(x)
    d_loss, logs = loss_fn.discriminator_loss(x, recon, disc)
    d_loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in disc.parameters())
    assert {"train/d_loss", "train/logits_real", "train/logits_fake"} <= set(logs)


def test_generator_step_leaves_no_gradient_on_discriminator():
    model, disc = tiny_model(), NLayerDiscriminator(channels=8, n_layers=2)
    loss_fn = VAELoss(LossConfig(lpips_weight=0.0, disc_enabled=True, disc_start=5))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, post = model(x)
    # before disc_start the adversarial term is absent
    _, early = loss_fn(x, recon, post, step=4, discriminator=disc, last_layer=model.last_layer())
    assert "train/g_loss" not in early
    loss, logs = loss_fn(x, recon, post, step=5, discriminator=disc, last_layer=model.last_layer())
    loss.backward()
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.parameters())  # unfrozen again afterwards
    assert model.last_layer().grad.abs().sum() > 0
    assert logs["train/d_weight"] > 0 and torch.isfinite(logs["train/d_weight"])


def test_learned_logvar_nll():
    cfg = LossConfig(lpips_weight=0.0, kl_weight=0.0, learn_logvar=True, logvar_init=0.5)
    loss_fn = VAELoss(cfg)
    x, recon = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.2)
    loss, _ = loss_fn(x, recon, posterior(1), step=0)
    assert torch.allclose(loss, 0.2 / torch.exp(torch.tensor(0.5)) + 0.5)
    loss.backward()
    assert loss_fn.logvar.grad is not None


def test_l2_and_logs_keys():
    loss_fn = VAELoss(LossConfig(rec_loss="l2", lpips_weight=0.0, kl_weight=0.0))
    x, recon = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    loss, logs = loss_fn(x, recon, posterior(2), step=0, split="val")
    assert torch.allclose(loss, torch.tensor(0.25))
    assert all(k.startswith("val/") for k in logs)
