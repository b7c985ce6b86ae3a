"""The latent space of a VAE, measured on held-out images: rate, active units, prior gap, likelihood, pictures.

Definitions (each stated in ``report.md`` next to its numbers):

- **rate**: KL(q(z|x) || N(0, I)) in nats per latent element, and per image in bits per input pixel
  (KL / (H·W·ln 2)); per channel, the mean KL of that channel's elements.
- **active units** (Burda et al. 2016): a latent unit u = (channel, row, column) is active when
  Cov_x(E_q[z_u|x]) = Var over images of its posterior mean exceeds 0.01.  A channel whose units are
  active in under 1 % of positions carries almost nothing and is named **collapsed**.
- **prior gap**: the Gaussian Fréchet distance between the aggregate posterior and the prior N(0, I)
  on the C-dimensional latent vector at one position (every image and position is one sample of
  z ~ q(z|x)): ||m||² + tr(S + I − 2 S^½).  0 when the aggregate matches the prior's first two moments.
- **likelihood**: −ELBO and an importance-weighted bound (IWAE, Burda et al. 2016) with k posterior
  samples, in bits per dimension (3·H·W 8-bit values), under a discretised Laplace decoder
  p(x|z) over the 256 levels with location the decoded mean and one scale b per model: the
  maximum-likelihood Laplace scale of its posterior-mode reconstructions (mean |x − x̂| in levels), the
  fixed-scale decoder that matches an L1 reconstruction loss.
"""

import math
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL

from autoencoder.losses import rate_bits_per_pixel

ACTIVE_THRESHOLD = 0.01  # Burda et al. 2016: Var_x E_q[z_u] above this is an active unit
COLLAPSED_FRACTION = 0.01  # a channel with fewer active positions than this fraction is collapsed
LEVELS = 255.0  # 8-bit images: pixel values in [-1, 1] map to 0..255


def kl_elements(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per element, in nats: ½(μ² + σ² − 1 − log σ²)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


def gaussian_fd_to_standard(mean: torch.Tensor, cov: torch.Tensor) -> float:
    """Fréchet distance between N(mean, cov) and N(0, I): ||m||² + tr(S) + d − 2 tr(S^½) (S symmetric PSD)."""
    eig = torch.linalg.eigvalsh(cov.double()).clamp_min(0.0)
    return float(mean.double().pow(2).sum() + eig.sum() + cov.shape[0] - 2.0 * eig.sqrt().sum())


class LatentAccumulator:
    """Streams posterior moments [B, C, h, w] of many images into the rate, active-unit and prior-gap figures."""

    def __init__(self) -> None:
        self.n = 0  # images
        self.kl_sum: torch.Tensor | None = None  # [C] Σ KL over images and positions
        self.mu_sum = self.mu_sq_sum = None  # [C, h, w] Σ μ and Σ μ² over images (active units)
        self.std_sum: torch.Tensor | None = None  # [C] Σ posterior σ
        self.z_sum = self.z_outer = None  # [C], [C, C] Σ z and Σ z zᵀ of posterior samples (aggregate)
        self.positions = 0  # samples in the aggregate: images × h × w
        self.image_hw: tuple[int, int] | None = None

    def update(
        self, mean: torch.Tensor, logvar: torch.Tensor, image_hw: tuple[int, int], generator: torch.Generator
    ) -> None:
        """Add a batch of posterior means and log-variances [B, C, h, w] of images of size ``image_hw``.

        ``generator`` (a CPU generator) draws the posterior samples of the aggregate: never the global RNG,
        which training replays exactly after a resume.
        """
        mean, logvar = mean.detach().double().cpu(), logvar.detach().double().cpu()
        b, c = mean.shape[:2]
        if self.kl_sum is None:
            self.kl_sum, self.std_sum = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
            self.mu_sum = torch.zeros(mean.shape[1:], dtype=torch.float64)
            self.mu_sq_sum = torch.zeros_like(self.mu_sum)
            self.z_sum, self.z_outer = torch.zeros(c, dtype=torch.float64), torch.zeros(c, c, dtype=torch.float64)
            self.image_hw = tuple(image_hw)
        assert mean.shape[1:] == self.mu_sum.shape, "one latent shape per report (one resolution)"
        self.n += b
        self.kl_sum += kl_elements(mean, logvar).sum(dim=(0, 2, 3))
        self.std_sum += (0.5 * logvar).exp().sum(dim=(0, 2, 3))
        self.mu_sum += mean.sum(0)
        self.mu_sq_sum += mean.pow(2).sum(0)
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float64)
        z = (mean + (0.5 * logvar).exp() * noise).permute(0, 2, 3, 1).reshape(-1, c)  # [B·h·w, C] samples
        self.z_sum += z.sum(0)
        self.z_outer += z.T @ z
        self.positions += z.shape[0]

    def compute(self) -> dict:
        """The report's latent figures (plain floats and lists, JSON-ready)."""
        assert self.n > 1, "active units need at least two images"
        c, h, w = self.mu_sum.shape
        per_position = h * w * self.n
        kl_channel = self.kl_sum / per_position  # [C] nats per element
        kl_image = float(self.kl_sum.sum()) / self.n  # nats per image
        mu_mean = self.mu_sum / self.n
        unit_var = (self.mu_sq_sum / self.n - mu_mean.pow(2)).clamp_min(0.0) * self.n / (self.n - 1)  # [C, h, w]
        active = unit_var > ACTIVE_THRESHOLD
        active_fraction = active.double().mean(dim=(1, 2))  # [C]
        agg_mean = self.z_sum / self.positions
        agg_cov = self.z_outer / self.positions - torch.outer(agg_mean, agg_mean)
        collapsed = [i for i in range(c) if active_fraction[i] < COLLAPSED_FRACTION]
        return {
            "n_images": self.n,
            "latent_shape": [c, h, w],
            "kl_per_latent_nats": float(kl_channel.mean()),
            "kl_per_image_nats": kl_image,
            "rate_bpp": float(rate_bits_per_pixel(torch.tensor(kl_image), *self.image_hw)),
            "kl_per_channel_nats": kl_channel.tolist(),
            "active_units": int(active.sum()),
            "units": c * h * w,
            "active_fraction_per_channel": active_fraction.tolist(),
            "unit_variance_per_channel": unit_var.mean(dim=(1, 2)).tolist(),
            "active_channels": c - len(collapsed),
            "collapsed_channels": collapsed,
            "posterior_std_per_channel": (self.std_sum / per_position).tolist(),
            "aggregate_mean_per_channel": agg_mean.tolist(),
            "aggregate_std_per_channel": agg_cov.diagonal().clamp_min(0).sqrt().tolist(),
            "prior_fd": gaussian_fd_to_standard(agg_mean, agg_cov),
        }


def collapse_warning(latent: dict) -> str | None:
    """A warning naming the collapsed channels, or None."""
    bad = latent["collapsed_channels"]
    if not bad:
        return None
    return (
        f"posterior collapse: latent channel(s) {bad} of {latent['latent_shape'][0]} carry almost nothing "
        f"(active in < {COLLAPSED_FRACTION:.0%} of positions: Var_x E[z|x] <= {ACTIVE_THRESHOLD}); "
        "lower kl_weight or use fewer latent channels"
    )


# ---- likelihood ---------------------------------------------------------------------------------


def discretized_laplace_log_prob(x: torch.Tensor, loc: torch.Tensor, scale: float) -> torch.Tensor:
    """log P(x) per value for 8-bit x (levels 0..255, as floats) under a Laplace(loc, scale) binned to the levels.

    Bin k is [k − ½, k + ½], the end bins extend to ±∞, so the 256 probabilities sum to 1.
    """
    lo, hi = x - 0.5, x + 0.5
    # Laplace CDF F(t) = ½ exp((t−μ)/b) for t < μ, 1 − ½ exp(−(t−μ)/b) otherwise; differences in log space.
    log_half = math.log(0.5)
    right = log_half - (lo - loc) / scale + math.log(-math.expm1(-1.0 / scale))  # bin entirely above μ
    left = log_half + (hi - loc) / scale + math.log(-math.expm1(-1.0 / scale))  # bin entirely below μ
    inside = torch.log1p(
        -0.5 * torch.exp(-(loc - lo).clamp_min(0) / scale) - 0.5 * torch.exp(-(hi - loc).clamp_min(0) / scale)
    )
    logp = torch.where(lo >= loc, right, torch.where(hi <= loc, left, inside))
    # end bins: P(x = 0) = F(½), P(x = 255) = 1 − F(254.5)
    cdf_lo_edge = torch.where(
        hi < loc, log_half + (hi - loc) / scale, torch.log1p(-0.5 * torch.exp(-(hi - loc).clamp_min(0) / scale))
    )
    cdf_hi_edge = torch.where(
        lo > loc, log_half - (lo - loc) / scale, torch.log1p(-0.5 * torch.exp(-(loc - lo).clamp_min(0) / scale))
    )
    logp = torch.where(x <= 0, cdf_lo_edge, logp)
    return torch.where(x >= LEVELS, cdf_hi_edge, logp)


def to_levels(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> 8-bit levels 0..255 (rounded, as floats)."""
    return ((images.clamp(-1, 1) + 1) * (LEVELS / 2)).round()


def normal_log_prob(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, exp(logvar)) summed over all but the batch dimension."""
    elem = -0.5 * (math.log(2 * math.pi) + logvar + (z - mean).pow(2) / logvar.exp())
    return elem.flatten(1).sum(1)


@torch.no_grad()
def log_weights(vae: AutoencoderKL, x: torch.Tensor, k: int, scale: float, generator: torch.Generator) -> torch.Tensor:
    """[k, B] importance log-weights log p(x|z_i) + log p(z_i) − log q(z_i|x), z_i ~ q(z|x), in nats."""
    posterior = vae.encode(x).latent_dist
    mean, logvar = posterior.mean.float(), posterior.logvar.float()
    target = to_levels(x.float())
    out = []
    for _ in range(k):
        noise = torch.randn(mean.shape, generator=generator, device="cpu").to(mean.device)
        z = mean + (0.5 * logvar).exp() * noise
        decoded = vae.decode(z.to(vae.dtype)).sample.float()
        loc = (decoded + 1) * (LEVELS / 2)  # the decoder's mean on the level scale, not rounded
        log_px = discretized_laplace_log_prob(target, loc, scale).flatten(1).sum(1)
        log_pz = normal_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
        log_qz = normal_log_prob(z, mean, logvar)
        out.append(log_px + log_pz - log_qz)
    return torch.stack(out)


def elbo_and_iwae(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: the ELBO (mean of the log-weights) and the IWAE bound (log of their mean), from [k, B] weights.

    Same samples for both, so IWAE ≥ ELBO (Jensen), with equality at k = 1.
    """
    k = weights.shape[0]
    return weights.mean(0), torch.logsumexp(weights, 0) - math.log(k)


@dataclass
class LikelihoodAccumulator:
    """Sums of −ELBO and −IWAE in nats over images, for bits per dimension."""

    neg_elbo: float = 0.0
    neg_iwae: float = 0.0
    n: int = 0

    def update(self, weights: torch.Tensor) -> None:
        """Add a batch's [k, B] log-weights."""
        elbo, iwae = elbo_and_iwae(weights.double().cpu())
        self.neg_elbo -= float(elbo.sum())
        self.neg_iwae -= float(iwae.sum())
        self.n += weights.shape[1]

    def compute(self, image_hw: tuple[int, int], k: int, scale: float) -> dict:
        """Bits per dimension (3·H·W values per image) of both bounds, with the likelihood stated."""
        dims = 3 * image_hw[0] * image_hw[1] * math.log(2.0)
        return {
            "neg_elbo_bpd": self.neg_elbo / self.n / dims,
            "iwae_nll_bpd": self.neg_iwae / self.n / dims,
            "iwae_samples": k,
            "laplace_scale_levels": scale,
            "likelihood": f"discretised Laplace over 256 levels, scale {scale:.3g} levels (ML fit to the mode "
            "reconstructions); prior N(0, I)",
        }


# ---- pictures -----------------------------------------------------------------------------------


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between two latents (flattened angle), linear when they are parallel."""
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).clamp(-1, 1)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-4:
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


@torch.no_grad()
def picture_rows(
    vae: AutoencoderKL, z_a: torch.Tensor, z_b: torch.Tensor, latent: dict, steps: int = 7, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Decoded pictures in [-1, 1]: traversals [C·steps], interpolations [2·steps] and prior samples [steps].

    ``z_a``, ``z_b``: posterior means [C, h, w] of two held-out images.  Traversal row c moves channel c
    of ``z_a`` by t·σ_c, t in [−2, 2], σ_c the aggregate posterior's std of that channel.
    """
    decode = lambda z: vae.decode(z.to(vae.device, vae.dtype)).sample.float().clamp(-1, 1).cpu()  # noqa: E731
    ts = torch.linspace(-2, 2, steps)
    agg_std = torch.tensor(latent["aggregate_std_per_channel"], dtype=z_a.dtype)
    agg_mean = torch.tensor(latent["aggregate_mean_per_channel"], dtype=z_a.dtype)
    traversal = []
    for c in range(z_a.shape[0]):
        zs = z_a.expand(steps, *z_a.shape).clone()
        zs[:, c] += ts.view(-1, 1, 1) * agg_std[c]
        traversal.append(decode(zs))
    fractions = torch.linspace(0, 1, steps)
    linear = torch.stack([(1 - f) * z_a + f * z_b for f in fractions])
    spherical = torch.stack([slerp(z_a, z_b, float(f)) for f in fractions])
    g = torch.Generator().manual_seed(seed)
    prior = agg_mean.view(1, -1, 1, 1) + agg_std.view(1, -1, 1, 1) * torch.randn(
        steps, *z_a.shape, generator=g, dtype=z_a.dtype
    )
    return {
        "traversals": torch.cat(traversal),
        "interpolations": torch.cat([decode(linear), decode(spherical)]),
        "samples": decode(prior),
    }


def save_latent_figure(rows: dict[str, torch.Tensor], latent: dict, path, title: str, steps: int = 7) -> None:
    """One labelled PNG (matplotlib): traversals per channel, linear/spherical interpolations, prior samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    def grid(images: torch.Tensor) -> "torch.Tensor":
        return make_grid((images + 1) / 2, nrow=steps, padding=1, pad_value=1.0).permute(1, 2, 0).numpy()

    channels = latent["latent_shape"][0]
    heights = [channels, 2, 1]
    fig, axes = plt.subplots(
        3, 1, figsize=(steps * 0.9 + 1.6, sum(heights) * 0.9 + 1.6), gridspec_kw={"height_ratios": heights}
    )
    panels = [
        (
            "traversals",
            f"traversal: channel c moved by −2σ … +2σ (rows c = 0…{channels - 1})",
            [
                f"c{c} (KL {kl:.2g})" + (" collapsed" if c in latent["collapsed_channels"] else "")
                for c, kl in enumerate(latent["kl_per_channel_nats"])
            ],
        ),
        ("interpolations", "interpolation between two held-out images", ["linear", "spherical"]),
        ("samples", "samples from the aggregate-matched prior N(m_c, s_c²)", [""]),
    ]
    for ax, (key, heading, labels) in zip(axes, panels):
        image = grid(rows[key])
        ax.imshow(image)
        ax.set_title(heading, fontsize=8)
        ax.set_xticks([])
        row_h = image.shape[0] / len(labels)
        ax.set_yticks([row_h * (i + 0.5) for i in range(len(labels))], labels, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
