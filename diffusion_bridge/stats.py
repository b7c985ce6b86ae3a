"""Latent-scaling statistics measured over a whole dataset, streaming and mergeable across processes.

A diffusion model wants unit-variance latents.  latent-diffusion's ``scale_by_std`` takes
``1/std`` of one batch.  diffusers' pipelines read the scaling from the VAE config in one of three
conventions (``LatentScaling``): SD/DiT ``z * s``; SD3/FLUX ``(z - shift) * s``; and, when the config
carries per-channel ``latents_mean``/``latents_std``, SDXL's ``(z - mean_c) / std_c * s``.  We compute all of them
over every latent element with Welford updates and Chan et al.'s pairwise merge (so per-batch and
per-rank partial results combine exactly, in float64), plus a 95% confidence interval on the
std that treats *images* — not correlated latent pixels — as the independent samples.
"""

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL

from autoencoder.errors import UsageError
from autoencoder.folders import swap_in

Convention = Literal["sd", "sd3", "sdxl"]

# What each convention asks of the VAE config, and how its pipelines decode.
DECODE = {
    "sd": "vae.decode(latents / scaling_factor)  (StableDiffusionPipeline, DiTPipeline; SDXL without latents_mean)",
    "sd3": "vae.decode(latents / scaling_factor + shift_factor)  (StableDiffusion3Pipeline, FluxPipeline)",
    "sdxl": "vae.decode(latents * latents_std / scaling_factor + latents_mean)  (StableDiffusionXLPipeline "
    "when the config has latents_mean/latents_std; 4 channels)",
}


@dataclass(frozen=True)
class LatentScaling:
    """How VAE latents z become what a denoiser sees, in one of diffusers' three conventions."""

    convention: Convention
    scaling_factor: float
    shift_factor: float | None = None  # sd3 only
    latents_mean: tuple[float, ...] | None = None  # sdxl only, one per channel
    latents_std: tuple[float, ...] | None = None

    @classmethod
    def from_config(cls, config, convention: Convention) -> "LatentScaling":
        """The scaling a VAE config gives under ``convention``; ValueError if the config lacks its keys."""
        if convention == "sd3":
            if config.shift_factor is None:
                raise UsageError(
                    "the sd3 convention needs shift_factor in the VAE config, and this one has none",
                    "run `python -m diffusion_bridge stats --model DIR --write --convention sd3` first",
                )
            return cls("sd3", config.scaling_factor, shift_factor=config.shift_factor)
        if convention == "sdxl":
            if config.latents_mean is None or config.latents_std is None:
                raise UsageError(
                    "the sdxl convention needs latents_mean/latents_std in the VAE config, and this one has none",
                    "run `python -m diffusion_bridge stats --model DIR --write --convention sdxl` first",
                )
            return cls(
                "sdxl",
                config.scaling_factor,
                latents_mean=tuple(config.latents_mean),
                latents_std=tuple(config.latents_std),
            )
        return cls("sd", config.scaling_factor)

    def _channel_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std shaped [1,C,1,1] like ``z``."""
        assert len(self.latents_mean) == z.shape[1], "one latents_mean per channel"
        mean = torch.tensor(self.latents_mean, dtype=torch.float64).view(1, -1, 1, 1).to(z.device, z.dtype)
        return mean, torch.tensor(self.latents_std, dtype=torch.float64).view(1, -1, 1, 1).to(z.device, z.dtype)

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """Latents z [B,C,h,w] -> what the denoiser is trained on."""
        if self.convention == "sdxl":
            mean, std = self._channel_stats(z)
            return (z - mean) / std * self.scaling_factor
        return (z - (self.shift_factor or 0.0)) * self.scaling_factor

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of ``scale``: what ``vae.decode`` takes (the pipelines' own formula)."""
        if self.convention == "sdxl":
            mean, std = self._channel_stats(latents)
            return latents * std / self.scaling_factor + mean
        return latents / self.scaling_factor + (self.shift_factor or 0.0)

    def scaled_moments(self, stats: "LatentStats") -> tuple[float, float]:
        """(mean, std) of latents with these statistics once scaled (closed form; sdxl: over all channels)."""
        if self.convention == "sdxl":
            z = [
                ((m - cm) / cs * self.scaling_factor, s / cs * self.scaling_factor)
                for m, s, cm, cs in zip(stats.channel_mean, stats.channel_std, self.latents_mean, self.latents_std)
            ]
            mean = sum(m for m, _ in z) / len(z)
            return mean, (sum(s**2 + (m - mean) ** 2 for m, s in z) / len(z)) ** 0.5
        return (stats.mean - (self.shift_factor or 0.0)) * self.scaling_factor, stats.std * self.scaling_factor


@dataclass
class Moments:
    """Count, mean and sum of squared deviations (M2) of vectors, in float64; mergeable (Chan et al.)."""

    n: torch.Tensor  # [] number of observations per coordinate
    mean: torch.Tensor  # [D]
    m2: torch.Tensor  # [D]

    @classmethod
    def empty(cls, dim: int) -> "Moments":
        """No observations yet."""
        z = torch.zeros(dim, dtype=torch.float64)
        return cls(torch.zeros((), dtype=torch.float64), z, z.clone())

    @classmethod
    def of(cls, x: torch.Tensor) -> "Moments":
        """Moments of observations x [N,D] (one batch, two-pass for accuracy)."""
        x = x.detach().double()
        mean = x.mean(0)
        return cls(torch.tensor(float(x.shape[0]), dtype=torch.float64), mean, (x - mean).pow(2).sum(0))

    def merge(self, other: "Moments") -> "Moments":
        """Chan et al.'s parallel combination: exact for any split of the data."""
        n = self.n + other.n
        if n == 0:
            return self
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + delta.pow(2) * (self.n * other.n / n)
        return Moments(n, mean, m2)

    def var(self) -> torch.Tensor:
        """Population variance per coordinate."""
        return self.m2 / self.n

    def flat(self) -> torch.Tensor:
        """[1 + 2D] tensor to gather across processes."""
        return torch.cat([self.n.reshape(1), self.mean, self.m2])

    @classmethod
    def from_flat(cls, t: torch.Tensor) -> "Moments":
        """Inverse of ``flat``."""
        d = (t.numel() - 1) // 2
        return cls(t[0], t[1 : 1 + d], t[1 + d :])


class LatentStatsAccumulator:
    """Streams latents [B,C,h,w] into per-channel moments and per-image (mean, mean-square) moments."""

    def __init__(self, channels: int):
        self.channels = Moments.empty(channels)  # over every latent element, per channel
        # Per image: (mean of z, mean of z^2, their sum) -> the CI on the global std.  The sum's
        # variance gives the covariance of the first two while keeping the merge per coordinate.
        self.images = Moments.empty(3)

    def update(self, latents: torch.Tensor) -> None:
        """Add a batch of latents [B,C,h,w] from any device (the moments live on the CPU, in float64)."""
        z = latents.detach().to("cpu", torch.float64)
        per_channel = z.permute(1, 0, 2, 3).reshape(z.shape[1], -1).T  # [B*h*w, C]
        self.channels = self.channels.merge(Moments.of(per_channel))
        flat = z.reshape(z.shape[0], -1)
        m1, m2 = flat.mean(1), flat.pow(2).mean(1)
        self.images = self.images.merge(Moments.of(torch.stack([m1, m2, m1 + m2], dim=1)))

    def merge(self, other: "LatentStatsAccumulator") -> "LatentStatsAccumulator":
        """Combine with another process's (or batch's) accumulator."""
        out = LatentStatsAccumulator(len(self.channels.mean))
        out.channels = self.channels.merge(other.channels)
        out.images = self.images.merge(other.images)
        return out

    def flat(self) -> torch.Tensor:
        """Everything as one float64 vector (for ``accelerator.gather``)."""
        return torch.cat([self.channels.flat(), self.images.flat()])

    @classmethod
    def from_flat(cls, t: torch.Tensor, channels: int) -> "LatentStatsAccumulator":
        """Inverse of ``flat``."""
        out = cls(channels)
        k = 1 + 2 * channels
        out.channels, out.images = Moments.from_flat(t[:k]), Moments.from_flat(t[k:])
        return out

    def result(self) -> "LatentStats":
        """The statistics and the scaling they imply."""
        c = self.channels
        if c.n == 0:
            raise ValueError("no latents were seen: the dataset is empty")
        # Global moments: every channel has the same count, so merge the channels as equal groups.
        mean = c.mean.mean()
        var = (c.m2.sum() + c.n * (c.mean - mean).pow(2).sum()) / (c.n * len(c.mean))
        std = var.sqrt()
        return LatentStats(
            num_images=int(self.images.n),
            num_latents=int(c.n) * len(c.mean),
            mean=float(mean),
            std=float(std),
            std_ci95=self._std_ci95(std),
            channel_mean=c.mean.tolist(),
            channel_std=c.var().sqrt().tolist(),
        )

    def _std_ci95(self, std: torch.Tensor) -> list[float] | None:
        """95% CI on the global std by the delta method over images: var = E[m2_i] - E[m1_i]^2.

        None (unavailable) below MIN_IMAGES: the delta method's normal approximation needs many images.
        """
        im = self.images
        n = float(im.n)
        if n < MIN_IMAGES:
            return None
        var1, var2, var12 = (im.m2 / (n - 1)).unbind()
        cov = (var12 - var1 - var2) / 2
        g1 = -2 * im.mean[0]  # d var / d E[m1]; d var / d E[m2] = 1
        var_of_var = (g1.pow(2) * var1 + var2 + 2 * g1 * cov) / n
        half = 1.96 * var_of_var.sqrt() / (2 * std)
        return [float(std - half), float(std + half)]


MIN_IMAGES = 16  # fewer images: a warning, and no confidence interval


def too_few_images(n: int) -> str | None:
    """The warning for statistics measured on ``n`` images, or None when there are enough."""
    if n >= MIN_IMAGES:
        return None
    return (
        f"latent statistics from only {n} image(s) (fewer than {MIN_IMAGES}): scaling_factor/shift_factor are rough "
        "and their 95% CI is unavailable; measure them on more images with `python -m diffusion_bridge stats "
        "--model DIR --train_data_dir IMAGES --write`"
    )


@dataclass
class LatentStats:
    """Dataset latent statistics and the diffusers config values they give."""

    num_images: int
    num_latents: int
    mean: float
    std: float
    std_ci95: list[float] | None  # None: too few images (MIN_IMAGES) for the interval
    channel_mean: list[float]
    channel_std: list[float]

    def config_values(self, convention: Convention = "sd3") -> dict:
        """The ``AutoencoderKL.config`` keys for ``convention``; the others are cleared (None).

        Clearing matters: ``StableDiffusionXLPipeline`` switches to per-channel decoding whenever
        ``latents_mean``/``latents_std`` are present, so they are written for sdxl only.
        """
        values = {"scaling_factor": 1.0 / self.std, "shift_factor": None, "latents_mean": None, "latents_std": None}
        if convention == "sd3":
            values["shift_factor"] = self.mean
        elif convention == "sdxl":  # (z - mean_c) / std_c is already unit-variance per channel
            values.update(scaling_factor=1.0, latents_mean=self.channel_mean, latents_std=self.channel_std)
        return values

    def to_json(self, convention: Convention = "sd3") -> dict:
        """latent_stats.json content: the statistics, the config values written and every convention's decode."""
        return {**asdict(self), "convention": convention, **self.config_values(convention), "conventions": DECODE}


@torch.no_grad()
def collect_latent_stats(
    vae: AutoencoderKL, loader, accelerator, sample_posterior: bool = True, seed: int = 0
) -> LatentStats:
    """Latent statistics of ``vae`` over every batch of ``loader`` on every process (a collective call).

    Each process passes a loader over its own ``process_shard`` (no padding: no image counted
    twice); the per-process moments are gathered and merged.  Posterior samples (latent-diffusion's
    choice, seeded per process) or the posterior mode.
    """
    channels = vae.config.latent_channels
    acc = LatentStatsAccumulator(channels)
    generator = torch.Generator(device=accelerator.device).manual_seed(seed + accelerator.process_index)
    for batch in loader:
        dist = vae.encode(batch["pixel_values"].to(accelerator.device)).latent_dist
        acc.update(dist.sample(generator=generator) if sample_posterior else dist.mode())
    gathered = accelerator.gather(acc.flat().to(accelerator.device)[None]).cpu()  # [world, K]
    total = LatentStatsAccumulator(channels)
    for row in gathered:
        total = total.merge(LatentStatsAccumulator.from_flat(row, channels))
    return total.result()


def write_stats(
    model_dir: Path, stats: LatentStats, vae: AutoencoderKL | None = None, convention: Convention = "sd3"
) -> None:
    """Store the scaling of ``convention`` in the model's config (save_pretrained) and latent_stats.json."""
    model_dir = Path(model_dir)
    vae = vae if vae is not None else AutoencoderKL.from_pretrained(model_dir)
    if convention == "sdxl" and vae.config.latent_channels != 4:
        raise UsageError(
            f"the sdxl convention is for StableDiffusionXLPipeline, which assumes 4 latent channels; "
            f"this VAE has {vae.config.latent_channels}",
            "use --convention sd3 or sd",
        )
    vae.register_to_config(**stats.config_values(convention))
    tmp = model_dir.with_name(f".tmp-{model_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)  # keep everything else in the folder (training config, ...)
    vae.save_pretrained(tmp, safe_serialization=True)
    (tmp / "latent_stats.json").write_text(json.dumps(stats.to_json(convention), indent=2))
    swap_in(tmp, model_dir)  # a crash in between leaves one of the two intact


def describe(stats: LatentStats) -> str:
    """A short human-readable summary."""
    cv = stats.config_values("sd3")
    return (
        f"{stats.num_latents:,} latent values from {stats.num_images} images: mean {stats.mean:.4f}, "
        f"std {stats.std:.4f} ({ci_text(stats.std_ci95, stats.num_images)})\n"
        f"scaling_factor = 1/std = {cv['scaling_factor']:.5f}; shift_factor = mean = {cv['shift_factor']:.5f}\n"
        f"per-channel mean {[round(v, 4) for v in stats.channel_mean]}\n"
        f"per-channel std  {[round(v, 4) for v in stats.channel_std]}"
    )


def ci_text(ci: list[float] | None, n: int) -> str:
    """'95% CI 0.91–0.95', or why it is unavailable."""
    if ci is None:
        return f"95% CI unavailable: {n} image(s), fewer than {MIN_IMAGES}"
    return f"95% CI {ci[0]:.4f}–{ci[1]:.4f}"


def process_shard(dataset, process_index: int, num_processes: int) -> torch.utils.data.Subset:
    """Every ``num_processes``-th item from ``process_index``: disjoint, complete, no padding duplicates."""
    return torch.utils.data.Subset(dataset, range(process_index, len(dataset), num_processes))
