"""The objective: LPIPS gradients, KL closed form, beta schedules, GAN weighting and isolation."""

import math

import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch.distributions import Normal, kl_divergence

from autoencoder.config import LossConfig, ModelConfig
from autoencoder.losses import (
    NLayerDiscriminator,
    VAELoss,
    adaptive_disc_weight,
    beta_at,
    generator_adv_loss,
    hinge_d_loss,
    kl_loss,
    vanilla_d_loss,
)
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
    # and the loss applies beta to it: loss = (0 * rec + beta * KL) / N with N = 3*8*8 pixel values
    cfg = LossConfig(rec_weight=0.0, lpips_weight=0.0, kl_weight=0.25)
    x = torch.zeros(3, 3, 8, 8)
    loss, logs = VAELoss(cfg)(x, x, post, step=0)
    assert torch.allclose(loss, 0.25 * expected / (3 * 8 * 8), rtol=1e-5)
    # rate: nats per latent element (4*5*5 of them) and bits per input pixel (8*8 of them)
    assert torch.allclose(logs["train/kl_per_latent"], expected / 100, rtol=1e-5)
    assert torch.allclose(logs["train/rate_bpp"], expected / (64 * math.log(2)), rtol=1e-5)


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
    d_loss, logs = loss_fn.discriminator_loss(x, recon, disc, step=0)
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
    assert torch.allclose(loss, 0.2 / torch.exp(torch.tensor(0.5)) + 0.5)  # the per-pixel-value NLL, averaged
    loss.backward()
    assert loss_fn.logvar.grad is not None


def test_l2_and_logs_keys():
    loss_fn = VAELoss(LossConfig(rec_loss="l2", lpips_weight=0.0, kl_weight=0.0))
    x, recon = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    loss, logs = loss_fn(x, recon, posterior(2), step=0, split="val")
    assert torch.allclose(loss, torch.tensor(0.25))
    terms = {"rec_loss", "nll_loss", "kl", "kl_per_latent", "rate_bpp", "beta", "logvar", "loss"}
    assert set(logs) == {f"val/{t}" for t in terms}  # every term, under the split it was asked for
    _, train_logs = loss_fn(x, recon, posterior(2), step=0)
    assert set(train_logs) == {f"train/{t}" for t in terms}
    assert float(logs["val/rec_loss"]) == pytest.approx(0.25) and float(logs["val/loss"]) == pytest.approx(0.25)


def latent_diffusion_generator_loss(
    inputs,
    reconstructions,
    posteriors,
    p_loss,
    logvar,
    kl_weight,
    disc_factor,
    discriminator_weight,
    logits_fake,
    last_layer,
):
    """latent-diffusion's LPIPSWithDiscriminator.forward, optimizer_idx 0, transcribed.

    From ldm/modules/losses/contperceptual.py.
    """
    rec_loss = torch.abs(inputs.contiguous() - reconstructions.contiguous())
    rec_loss = rec_loss + 1.0 * p_loss  # perceptual_weight 1.0
    nll_loss = rec_loss / torch.exp(logvar) + logvar
    weighted_nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
    nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
    kl_loss = posteriors.kl()
    kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]
    g_loss = -torch.mean(logits_fake)
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = (
        torch.clamp(torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4), 0.0, 1e4).detach() * discriminator_weight
    )
    return weighted_nll_loss + kl_weight * kl_loss + d_weight * disc_factor * g_loss


class FixedLPIPS(torch.nn.Module):
    """A differentiable stand-in with LPIPS's [B,1,1,1] output, so the formula test needs no weights."""

    def forward(self, a, b):
        return (a - b).pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()


@pytest.mark.parametrize("size", [16, 32])
def test_objective_equals_latent_diffusion_up_to_one_constant(size):
    """ours * N == latent-diffusion's generator loss (KL, learned logvar, LPIPS broadcast, adaptive GAN weight)."""
    torch.manual_seed(size)
    model, disc = tiny_model(), NLayerDiscriminator(channels=8, n_layers=2)
    cfg = LossConfig(
        lpips_weight=1.0,
        kl_weight=1e-3,
        learn_logvar=True,
        logvar_init=0.3,
        disc_enabled=True,
        disc_start=0,
        disc_weight=0.5,
        disc_factor=0.7,
    )
    loss_fn = VAELoss(cfg, lpips_model=FixedLPIPS())
    x = torch.rand(3, 3, size, size) * 2 - 1
    recon, post = model(x)
    ours, _ = loss_fn(x, recon, post, step=0, discriminator=disc, last_layer=model.last_layer())
    theirs = latent_diffusion_generator_loss(
        x, recon, post, FixedLPIPS()(recon, x), loss_fn.logvar, 1e-3, 0.7, 0.5, disc(recon), model.last_layer()
    )
    n = 3 * size * size
    assert torch.allclose(ours * n, theirs, rtol=1e-4)
    # and the gradients agree up to the same constant
    g_ours = torch.autograd.grad(ours * n, model.last_layer(), retain_graph=True)[0]
    g_theirs = torch.autograd.grad(theirs, model.last_layer())[0]
    assert torch.allclose(g_ours, g_theirs, rtol=1e-3, atol=1e-6)


def test_effective_beta_is_the_same_at_every_resolution():
    """KL's weight relative to the summed NLL is kl_weight at 16 and 64 px (it was kl_weight * 3HW before)."""
    beta = 1e-2
    found = []
    for size in (16, 64):
        x = torch.rand(2, 3, size, size) * 2 - 1
        recon = x + 0.1 * torch.randn_like(x)
        post = posterior(batch=2, channels=4, size=size // 8)
        cfg = LossConfig(lpips_weight=0.0, kl_weight=beta)
        with_kl, _ = VAELoss(cfg)(x, recon, post, step=0)
        without, _ = VAELoss(LossConfig(lpips_weight=0.0, kl_weight=0.0))(x, recon, post, step=0)
        nll_sum_per_image = (recon - x).abs().sum() / 2
        kl_per_image = kl_loss(post)
        # loss = c * (nll_sum/B) + c * beta_eff * (kl/B): c from the KL-free loss, beta_eff from the difference
        c = without / nll_sum_per_image
        found.append(((with_kl - without) / (c * kl_per_image)).item())
    assert found == pytest.approx([beta, beta], rel=1e-4)


def test_discriminator_losses_match_closed_forms():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 3.0])
    # hinge: 0.5 * (mean relu(1 - real) + mean relu(1 + fake)) = 0.5 * ((0 + .5 + 2)/3 + (0 + 1 + 4)/3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 5.0 / 3))
    # vanilla: 0.5 * (mean softplus(-real) + mean softplus(fake)), softplus(t) = log(1 + e^t)
    sp = lambda t: math.log1p(math.exp(t))  # noqa: E731
    expected = 0.5 * (sum(sp(-r) for r in (2.0, 0.5, -1.0)) / 3 + sum(sp(f) for f in (-2.0, 0.0, 3.0)) / 3)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    # the generator's loss is -mean D(fake) for both, as in latent-diffusion and taming
    assert generator_adv_loss(fake).item() == pytest.approx(-1.0 / 3)


def test_discriminator_sees_real_and_fake_in_separate_passes():
    """BatchNorm in training mode: two separate passes differ from one pass over the concatenation."""
    disc = NLayerDiscriminator(channels=8, n_layers=2).train()
    real, fake = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32) * 0.1
    lr, lf = disc(real, fake)
    assert torch.allclose(lr, disc(real)) and torch.allclose(lf, disc(fake))  # each pass normalises its own batch
    joint_real, _ = disc(torch.cat([real, fake])).chunk(2)
    assert not torch.allclose(lr, joint_real, atol=1e-4)


def test_disc_factor_gates_both_gan_losses():
    model, disc = tiny_model(), NLayerDiscriminator(channels=8, n_layers=2)
    loss_fn = VAELoss(LossConfig(lpips_weight=0.0, disc_enabled=True, disc_start=3, disc_factor=0.5))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, _ = model(x)
    before, _ = loss_fn.discriminator_loss(x, recon, disc, step=2)
    assert before.item() == 0.0  # adopt_weight: 0 before disc_start
    after, _ = loss_fn.discriminator_loss(x, recon, disc, step=3)
    lr, lf = disc(x.detach(), recon.detach())
    assert torch.allclose(after, 0.5 * hinge_d_loss(lr, lf))
