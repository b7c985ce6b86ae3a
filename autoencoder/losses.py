"""The VAE objective of latent-diffusion's ``LPIPSWithDiscriminator``: reconstruction + LPIPS + beta·KL (+ PatchGAN).

For a batch of B images x of N = 3·H·W pixel values, reconstructions x̂ and posteriors q(z|x)::

    rec(x, x̂) = rec_weight · |x − x̂|  (or (x − x̂)²)  +  lpips_weight · LPIPS(x, x̂)   per pixel value
    nll     = rec(x, x̂) / exp(logvar) + logvar             (learned scalar logvar; else nll = rec)
    L_LD    = Σ nll / B  +  β · Σ KL(q(z|x) ‖ N(0, I)) / B  +  λ · f(step) · g_loss
    loss    = L_LD / N  +  α · mean rec(↓ₛx, D(↓ₛz))         (α = equivariance_weight; 0: no term)

with g_loss = −mean D(x̂), f(step) = disc_factor once step ≥ disc_start (else 0) and the adaptive
weight λ = disc_weight · ‖∇_last Σnll/B‖ / (‖∇_last g_loss‖ + 1e-4) at the decoder's last layer.
The last term is scale equivariance (Skorokhodov et al. 2025; EQ-VAE with a random rot90 of both):
z the posterior sample, ↓ₛ antialiased bilinear downsampling by a factor s drawn per step
(``autoencoder.equivariance``), the same per-pixel-value reconstruction + LPIPS term as the main one.
``L_LD`` is latent-diffusion's generator objective term for term, so ``kl_weight`` (β) means
what it means there and in diffusers' ``train_autoencoderkl.py`` at every resolution.  We
optimise ``L_LD / N`` — the same objective up to the positive constant 1/N — so the loss,
gradient clipping and learning rates do not scale with the image size.

The discriminator (PatchGAN, taming-transformers) sees real and reconstructed images in separate
forward passes, so its BatchNorm statistics never mix the two, and learns from
``f(step) · d_loss(D(x), D(x̂.detach()))`` with the hinge or vanilla loss.
"""

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from .config import LossConfig
from .lpips_weights import build_lpips


def beta_at(step: int, cfg: LossConfig) -> float:
    """KL weight at optimizer step ``step`` under the configured schedule."""
    if cfg.kl_schedule == "constant":
        return cfg.kl_weight
    if cfg.kl_schedule == "linear":
        if cfg.kl_warmup_steps <= 0:
            return cfg.kl_weight
        return cfg.kl_weight * min(1.0, step / cfg.kl_warmup_steps)
    if cfg.kl_schedule == "cyclical":
        # Fu et al. 2019: within each cycle ramp 0 -> beta over `ratio` of it, then hold.
        position = (step % cfg.kl_cycle_steps) / cfg.kl_cycle_steps
        return cfg.kl_weight * min(1.0, position / cfg.kl_cycle_ratio)
    raise AssertionError(cfg.kl_schedule)


def kl_loss(posterior: DiagonalGaussianDistribution, free_bits: float = 0.0) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over latent elements and averaged over the batch (nats per image).

    With ``free_bits > 0`` each latent channel's KL (per image) is floored at ``free_bits`` nats per
    latent element, so channels are not pushed below that budget (Kingma et al. 2016).
    """
    mean, logvar = posterior.mean.float(), posterior.logvar.float()
    if free_bits <= 0:
        return posterior.kl().float().sum() / mean.shape[0]
    kl_elem = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)  # [B, C, h, w]
    per_channel = kl_elem.sum(dim=(2, 3)).mean(dim=0)  # [C], nats per image
    floor = free_bits * mean.shape[2] * mean.shape[3]
    return torch.clamp(per_channel, min=floor).sum()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating (softplus) discriminator loss."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the adversarial loss, −mean D(x̂), for hinge and vanilla alike (latent-diffusion, taming)."""
    return -logits_fake.mean()


def disc_factor_at(step: int, cfg: LossConfig) -> float:
    """latent-diffusion's ``adopt_weight``: ``disc_factor`` from ``disc_start`` on, 0 before."""
    return cfg.disc_factor if step >= cfg.disc_start else 0.0


def rate_bits_per_pixel(kl_per_image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """KL in nats per image -> bits per pixel of the input (per pixel location, not per colour value)."""
    return kl_per_image / (height * width * math.log(2.0))


def adaptive_disc_weight(
    nll_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """||d nll / d last|| / (||d g / d last|| + 1e-4), clamped to [0, max_weight] and detached (taming).

    ``grad_scale`` multiplies both losses before differentiating (the fp16 GradScaler's scale, so
    small gradients do not underflow in half precision) and is divided out again: the ratio is
    the unscaled one.  A non-finite ratio (an fp16 overflow) gives weight 0 for this step.
    """
    nll_grad = torch.autograd.grad(nll_loss * grad_scale, last_layer, retain_graph=True)[0].float() / grad_scale
    g_grad = torch.autograd.grad(g_loss * grad_scale, last_layer, retain_graph=True)[0].float() / grad_scale
    weight = (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()
    return torch.where(torch.isfinite(weight), weight, torch.zeros_like(weight))


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Temporarily stop gradients into ``module``'s parameters (they still flow to its inputs)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator of pix2pix / taming-transformers (no maintained package ships it).

    [B,3,H,W] -> logits [B,1,H',W'], one per overlapping patch (70x70 receptive field for n_layers=3).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """DCGAN initialisation, as in pix2pix."""
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, *images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Logits per batch of images; each batch is its own pass, so BatchNorm never mixes real and fake."""
        logits = tuple(self.main(x) for x in images)
        return logits[0] if len(logits) == 1 else logits


def build_discriminator(cfg: LossConfig) -> NLayerDiscriminator | None:
    """The PatchGAN discriminator if enabled, else None."""
    if not cfg.disc_enabled:
        return None
    return NLayerDiscriminator(channels=cfg.disc_channels, n_layers=cfg.disc_num_layers)


class VAELoss(nn.Module):
    """Generator-side objective returning ``(loss, logs)`` (the module docstring's ``L_LD / N``).

    ``discriminator_loss`` gives the D step.  Inputs and reconstructions are [B,3,H,W] in [-1, 1].
    LPIPS is frozen (eval mode, no gradient into its weights) but differentiable w.r.t. the
    reconstruction.
    """

    def __init__(self, cfg: LossConfig, lpips_model: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        if lpips_model is None and cfg.lpips_weight > 0:
            lpips_model = build_lpips(cfg.lpips_net, cfg.lpips_weights)
        self.lpips = lpips_model
        if self.lpips is not None:
            self.lpips.eval().requires_grad_(False)
        # Learned scalar log-variance of the pixel likelihood (latent-diffusion); a buffer-like
        # constant when disabled so checkpoints have the same keys.
        self.logvar = nn.Parameter(torch.tensor(float(cfg.logvar_init)), requires_grad=cfg.learn_logvar)

    def train(self, mode: bool = True) -> "VAELoss":
        """Keep LPIPS in eval mode whatever the loss module's mode."""
        super().train(mode)
        if self.lpips is not None:
            self.lpips.eval()
        return self

    def forward(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posterior: DiagonalGaussianDistribution,
        step: int,
        discriminator: nn.Module | None = None,
        last_layer: torch.Tensor | None = None,
        split: str = "train",
        grad_scale: float = 1.0,
        scaled=None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total generator loss (the module docstring's ``loss``) and detached log scalars keyed ``{split}/...``.

        ``grad_scale``: the fp16 GradScaler's scale, used only inside the adaptive GAN weight.
        ``scaled``: this step's ``autoencoder.models.Scaled`` pair (↓ₛx, D(↓ₛz)), or None (no equivariance term).
        """
        cfg = self.cfg
        inputs, reconstructions = inputs.float(), reconstructions.float()
        n_values = inputs[0].numel()  # N = 3·H·W pixel values per image
        rec, pixel, p_loss = self.rec(inputs, reconstructions)
        logs: dict[str, torch.Tensor] = {f"{split}/rec_loss": pixel.mean().detach()}
        if p_loss is not None:
            logs[f"{split}/p_loss"] = p_loss.mean().detach()  # the perceptual *loss*; "lpips" is the metric
        nll = rec / torch.exp(self.logvar) + self.logvar if cfg.learn_logvar else rec  # [B,3,H,W]
        nll_loss = nll.mean()  # Σ nll / B / N
        kl = kl_loss(posterior, cfg.free_bits)  # Σ KL / B, nats per image
        beta = beta_at(step, cfg)
        loss = nll_loss + beta * kl / n_values
        latent_elems = posterior.mean[0].numel()
        logs.update(
            {
                f"{split}/nll_loss": nll_loss.detach(),
                f"{split}/kl": kl.detach(),
                f"{split}/kl_per_latent": kl.detach() / latent_elems,  # nats per latent element
                f"{split}/rate_bpp": rate_bits_per_pixel(kl.detach(), *inputs.shape[2:]),
                f"{split}/beta": torch.tensor(beta),
                f"{split}/logvar": self.logvar.detach(),
            }
        )
        factor = disc_factor_at(step, cfg)
        if discriminator is not None and factor > 0:
            with frozen(discriminator):  # G step: gradients reach the VAE, never D's weights
                g_loss = generator_adv_loss(discriminator(reconstructions))
            if cfg.disc_adaptive_weight and torch.is_grad_enabled() and last_layer is not None:
                d_weight = adaptive_disc_weight(nll_loss, g_loss, last_layer, grad_scale=grad_scale) * cfg.disc_weight
            else:
                d_weight = torch.tensor(cfg.disc_weight, device=g_loss.device)
            loss = loss + d_weight * factor * g_loss
            logs[f"{split}/g_loss"] = g_loss.detach()
            logs[f"{split}/d_weight"] = d_weight.detach()
        if scaled is not None:  # α · mean rec(↓ₛx, D(↓ₛz)); not in nll_loss, so the adaptive GAN weight is unchanged
            equivariance = self.rec(scaled.target.float(), scaled.reconstruction.float())[0].mean()
            loss = loss + cfg.equivariance_weight * equivariance
            logs[f"{split}/equivariance"] = equivariance.detach()
        logs[f"{split}/loss"] = loss.detach()
        return loss, logs

    def rec(self, inputs: torch.Tensor, reconstructions: torch.Tensor):
        """(rec [B,3,H,W], the pixel term [B,3,H,W], LPIPS [B,1,1,1] or None) of the module docstring."""
        diff = reconstructions - inputs
        pixel = diff.abs() if self.cfg.rec_loss == "l1" else diff.pow(2)
        rec = self.cfg.rec_weight * pixel
        p_loss = None
        if self.lpips is not None and self.cfg.lpips_weight > 0:
            p_loss = self.lpips(reconstructions, inputs)  # [B,1,1,1], broadcast over all N pixel values
            rec = rec + self.cfg.lpips_weight * p_loss
        return rec, pixel, p_loss

    def discriminator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        discriminator: nn.Module,
        step: int,
        split: str = "train",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """D step ``f(step) · d_loss`` on real inputs vs *detached* reconstructions (no gradient reaches the VAE)."""
        real, fake = inputs.detach().float(), reconstructions.detach().float()
        # One (DDP) forward call, two passes inside it: BatchNorm statistics are not mixed.
        logits_real, logits_fake = discriminator(real, fake)
        d_fn = hinge_d_loss if self.cfg.disc_loss == "hinge" else vanilla_d_loss
        d_loss = disc_factor_at(step, self.cfg) * d_fn(logits_real, logits_fake)
        logs = {
            f"{split}/d_loss": d_loss.detach(),
            f"{split}/logits_real": logits_real.mean().detach(),
            f"{split}/logits_fake": logits_fake.mean().detach(),
        }
        return d_loss, logs
