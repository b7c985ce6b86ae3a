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
  p(x|z) over the 256 levels with location the decoded mean and one scale b per model: the fixed-scale
  decoder that matches an L1 reconstruction loss.  b is the maximum-likelihood Laplace scale of the
  posterior-mode reconstructions (mean |x − x̂| in levels), rounded to the nearest point of a fixed grid
  (``SCALES``, steps of 2^¼): the pass computes the bounds at every grid scale at once, so both are
  known in the same single pass over the images, and the bound reported is exact at the scale it names.
"""

import math

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from autoencoder.losses import rate_bits_per_pixel
from autoencoder.models import seeded_noise

ACTIVE_THRESHOLD = 0.01  # Burda et al. 2016: Var_x E_q[z_u] above this is an active unit
COLLAPSED_FRACTION = 0.01  # a channel with fewer active positions than this fraction is collapsed
LEVELS = 255.0  # 8-bit images: pixel values in [-1, 1] map to 0..255
SCALES = 2.0 ** (torch.arange(-12, 33, dtype=torch.float64) / 4)  # 0.125 ... 256 levels: the decoder scales b


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

    def update(self, mean: torch.Tensor, logvar: torch.Tensor, image_hw: tuple[int, int], noise: torch.Tensor) -> None:
        """Add a batch of posterior means and log-variances [B, C, h, w] of images of size ``image_hw``.

        ``noise`` [B, C, h, w] (standard normal, e.g. ``seeded_noise``) makes the posterior samples of the
        aggregate: never the global RNG, which training replays exactly after a resume.
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
        z = (mean + (0.5 * logvar).exp() * noise.double().cpu()).permute(0, 2, 3, 1).reshape(-1, c)  # [B·h·w, C]
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


def laplace_log_likelihood(target: torch.Tensor, loc: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Σ over each image's values of log P(x) under a discretised Laplace(loc, b), for every b in ``scales``: [B, G].

    ``target``: 8-bit levels [B, ...]; ``loc``: the decoder's mean on the level scale.  A value whose bin lies
    wholly on one side of ``loc`` (|x − loc| ≥ ½, not an end level) has log P = log ½ + log(1 − e^(−1/b)) −
    (|x − loc| − ½)/b, so those need only their count and Σ(|x − loc| − ½) per image; the others (within half a
    level of ``loc``, or at level 0 or 255) go through ``discretized_laplace_log_prob`` once per scale.  Exact.
    """
    x, mu = target.flatten(1).double(), loc.flatten(1).double()
    d = (x - mu).abs()
    plain = (d >= 0.5) & (x > 0) & (x < LEVELS)  # [B, N]
    count = plain.sum(1, keepdim=True).double()  # [B, 1]
    excess = torch.where(plain, d - 0.5, 0.0).sum(1, keepdim=True)  # [B, 1]
    b = scales.to(x.device, torch.float64)[None]  # [1, G]
    out = count * (math.log(0.5) + torch.log(-torch.expm1(-1.0 / b))) - excess / b  # [B, G]
    rows = torch.nonzero(~plain)[:, 0]  # image of each other value
    rest_x, rest_mu = x[~plain], mu[~plain]
    for g, scale in enumerate(scales.tolist()):
        logp = discretized_laplace_log_prob(rest_x, rest_mu, scale)
        out[:, g] += torch.zeros(len(x), dtype=torch.float64, device=x.device).index_add_(0, rows, logp)
    return out


@torch.no_grad()
def log_weights(
    vae: AutoencoderKL, x: torch.Tensor, posterior, scales: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """[k, B, G] importance log-weights log p(x|z_i) + log p(z_i) − log q(z_i|x), z_i ~ q(z|x), in nats, at each
    decoder scale of ``scales`` [G]; ``posterior`` is q(z|x) of the images ``x``, and ``noise`` [k, B, C, h, w]
    (standard normal) draws the k posterior samples."""
    mean, logvar = posterior.mean.float(), posterior.logvar.float()
    k = noise.shape[0]
    target = to_levels(x.float())
    out = []
    for i in range(k):
        z = mean + (0.5 * logvar).exp() * noise[i].to(mean)
        decoded = vae.decode(z.to(vae.dtype)).sample.float()
        loc = (decoded + 1) * (LEVELS / 2)  # the decoder's mean on the level scale, not rounded
        log_px = laplace_log_likelihood(target, loc, scales)  # [B, G]
        log_pz = normal_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
        log_qz = normal_log_prob(z, mean, logvar)
        out.append(log_px + (log_pz - log_qz).double()[:, None])
    return torch.stack(out)


def elbo_and_iwae(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: the ELBO (mean of the log-weights) and the IWAE bound (log of their mean), from [k, B, ...] weights.

    Same samples for both, so IWAE ≥ ELBO (Jensen), with equality at k = 1.
    """
    k = weights.shape[0]
    return weights.mean(0), torch.logsumexp(weights, 0) - math.log(k)


class LikelihoodAccumulator:
    """Sums over images of −ELBO and −IWAE in nats at each decoder scale of ``SCALES``, and of |x − x̂|."""

    def __init__(self) -> None:
        self.neg_elbo = torch.zeros(len(SCALES), dtype=torch.float64)
        self.neg_iwae = torch.zeros(len(SCALES), dtype=torch.float64)
        self.abs_error = 0.0  # Σ over images of the mean |x − x̂| (levels) of the mode reconstruction
        self.n = 0

    def update(self, weights: torch.Tensor, abs_error: torch.Tensor) -> None:
        """Add a batch's [k, B, G] log-weights and [B] mean absolute errors of its mode reconstructions."""
        elbo, iwae = elbo_and_iwae(weights.double().cpu())  # [B, G] each
        self.neg_elbo -= elbo.sum(0)
        self.neg_iwae -= iwae.sum(0)
        self.abs_error += float(abs_error.double().sum())
        self.n += weights.shape[1]

    def compute(self, image_hw: tuple[int, int], k: int) -> dict:
        """Bits per dimension (3·H·W values per image) of both bounds at the grid scale nearest the ML scale."""
        dims = 3 * image_hw[0] * image_hw[1] * math.log(2.0)
        ml = max(self.abs_error / self.n, float(SCALES[0]))
        g = int((SCALES.log() - math.log(ml)).abs().argmin())
        scale = float(SCALES[g])
        return {
            "neg_elbo_bpd": float(self.neg_elbo[g]) / self.n / dims,
            "iwae_nll_bpd": float(self.neg_iwae[g]) / self.n / dims,
            "iwae_samples": k,
            "laplace_scale_levels": scale,
            "laplace_ml_scale_levels": ml,
            "likelihood": f"discretised Laplace over 256 levels, scale {scale:.3g} levels (the grid point nearest "
            f"the ML fit {ml:.3g} to the mode reconstructions); prior N(0, I)",
        }


class LatentReport:
    """Rate, active units and prior gap of the posteriors (``LatentAccumulator``), gathered: an ``eval.engine``
    metric.  Also keeps the first two posterior means, for the pictures."""

    def __init__(self, accelerator, seed: int):
        self.accelerator, self.seed = accelerator, seed
        self.acc = LatentAccumulator()
        self.first_means: list[torch.Tensor] = []

    def update(self, out) -> None:
        moments = (out.posterior.mean.float(), out.posterior.logvar.float(), out.noise(self.seed).float())
        mean, logvar, noise = self.accelerator.gather_for_metrics(moments)
        self.acc.update(mean, logvar, tuple(out.x.shape[-2:]), noise)
        self.first_means += list(mean[: max(0, 2 - len(self.first_means))].cpu())

    def compute(self) -> dict:
        return self.acc.compute() if self.acc.n > 1 else {}


class Likelihood:
    """−ELBO and the IWAE bound with ``k`` posterior samples per image (seeded per image): an ``eval.engine`` metric.

    Costs k decodes per batch; the decoder scale is chosen at ``compute`` from the same pass (module docstring).
    """

    def __init__(self, accelerator, vae: AutoencoderKL, k: int, seed: int):
        self.accelerator, self.vae, self.k, self.seed = accelerator, vae, k, seed
        self.acc = LikelihoodAccumulator()
        self.image_hw: tuple[int, int] | None = None

    def update(self, out) -> None:
        shape = tuple(out.posterior.mean.shape[1:])
        noise = seeded_noise(shape, out.index, self.seed + 1, samples=self.k)  # [k, B, C, h, w]
        weights = log_weights(self.vae, out.x, out.posterior, SCALES, noise)  # [k, B, G]
        abs_error = (to_levels(out.x.float()) - (out.recon.float() + 1) * (LEVELS / 2)).abs().flatten(1).mean(1)
        weights, abs_error = self.accelerator.gather_for_metrics((weights.transpose(0, 1).contiguous(), abs_error))
        self.acc.update(weights.transpose(0, 1), abs_error)
        self.image_hw = tuple(out.x.shape[-2:])

    def compute(self) -> dict:
        return self.acc.compute(self.image_hw, self.k)


# ---- pictures -----------------------------------------------------------------------------------


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation of each pair of latents a[i], b[i] [N, ...] by the angle of the flattened latents,
    linear where they are parallel (iFID's formula: the weights multiply the latents as they are)."""
    af, bf = a.flatten(1), b.flatten(1)
    cos = (F.normalize(af, dim=1, eps=eps) * F.normalize(bf, dim=1, eps=eps)).sum(1).clamp(-1, 1)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    w_a, w_b = torch.sin((1 - t) * theta) / (sin + eps), torch.sin(t * theta) / (sin + eps)
    out = w_a[:, None] * af + w_b[:, None] * bf
    parallel = sin < 1e-6
    out[parallel] = (1 - t) * af[parallel] + t * bf[parallel]
    return out.view_as(a)


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
    spherical = torch.cat([slerp(z_a[None], z_b[None], float(f)) for f in fractions])
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
