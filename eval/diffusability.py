"""How well a latent space suits diffusion, measured without training a diffusion model.

Three figures per VAE (``python -m eval``: ``models.<m>.diffusability`` in metrics.json):

* **scale equivariance** (Skorokhodov et al. 2025): for s = 2, 4, PSNR and LPIPS of D(↓ₛz) against ↓ₛx,
  z the posterior mode, ↓ₛ the same antialiased bilinear resampling for latent and image
  (``autoencoder.equivariance.downsample``).  LPIPS is taken on both images resized back to the
  evaluation resolution (bilinear): its networks need more pixels than ↓₄ leaves.
* **latent spectrum**: the radial power spectrum of the latents (DC removed per image and channel,
  averaged over channels and images) against that of the images resized to the latent size; the
  summary figure is the fraction of power above half the Nyquist radius (0.25 cycles per position).
* **iFID** (Xu et al. 2026, "Making rFID predictive of diffusion gFID"; their ``evalvae.py``): for each
  evaluation latent z (a posterior sample), its 10 nearest neighbours by cosine similarity among the latents
  of a reference set, one neighbour n drawn with probability softmax(−MSE(z, ·)) over those 10, the
  spherical interpolation slerp(z, n, ½) decoded, and the FID of those decodings against the real
  evaluation images.  Search and draw use the latents normalised per channel with the reference set's
  statistics (their ``--metric-norm bn_channel``, behind the published 22-tokenizer table); slerp and
  decoding use the latents as they are.  The reference set is a split of other images when one is given,
  else the evaluation images themselves with each image's own latent left out.  ``ifid`` on the FID
  Inception, else ``ifd_vgg16`` on VGG16 features (never called FID).
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput

from autoencoder.equivariance import downsample, valid_scales
from autoencoder.models import image_rng

from .engine import gather_rows, split_rows
from .fid import frechet_distance, to_uint8
from .latent import slerp
from .metrics import psnr_per_image

SCALES = (2, 4)
HALF_NYQUIST = 0.25  # cycles per sample: half of the Nyquist frequency 0.5


def radial_frequency(h: int, w: int) -> torch.Tensor:
    """[h, w] radius sqrt(fy² + fx²) of each FFT bin, in cycles per sample (0 at DC, 0.5 at Nyquist on an axis)."""
    fy, fx = torch.fft.fftfreq(h, dtype=torch.float64), torch.fft.fftfreq(w, dtype=torch.float64)
    return (fy[:, None].pow(2) + fx[None, :].pow(2)).sqrt()


def power_spectra(t: torch.Tensor) -> torch.Tensor:
    """[B,C,h,w] -> [B,h,w]: each image's |FFT|² summed over channels, DC removed per image and channel (float64)."""
    t = t.double()
    t = t - t.mean(dim=(-2, -1), keepdim=True)
    return torch.fft.fft2(t).abs().pow(2).sum(dim=1)


class SpectrumAccumulator:
    """Power per radial bin (bins of width 1/n cycles, n = max(h, w)) of many images, summed in float64."""

    def __init__(self) -> None:
        self.power: torch.Tensor | None = None  # [h, w] summed |FFT|², DC removed

    def update(self, spectra: torch.Tensor) -> None:
        """Add per-image spectra [B, h, w] (``power_spectra``)."""
        power = spectra.double().cpu().sum(0)
        self.power = power if self.power is None else self.power + power

    def spectrum(self) -> tuple[list[float], list[float]]:
        """(radius in cycles per sample, mean power per bin normalised to sum 1), DC bin left out."""
        h, w = self.power.shape
        n = max(h, w)
        bins = (radial_frequency(h, w) * n).round().long()  # integer radius
        total = torch.zeros(int(bins.max()) + 1, dtype=torch.float64).index_add_(
            0, bins.flatten(), self.power.flatten()
        )
        counts = torch.bincount(bins.flatten(), minlength=len(total)).double()
        mean = total[1:] / counts[1:]
        return (torch.arange(1, len(total)) / n).tolist(), (mean / mean.sum()).tolist()

    def high_frequency_fraction(self) -> float:
        """Share of the (non-DC) power in bins with radius above half Nyquist."""
        high = radial_frequency(*self.power.shape) > HALF_NYQUIST
        return float(self.power[high].sum() / self.power.sum())


def equivariance_batch(
    decode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, z: torch.Tensor, scale: int, lpips_model
) -> dict[str, torch.Tensor]:
    """Per image: PSNR (dB) and LPIPS of D(↓ₛz) against ↓ₛx; x [B,3,H,W] in [-1, 1], z [B,C,h,w]."""
    target, pred = downsample(x, scale), decode(downsample(z, scale)).clamp(-1, 1)
    psnr = psnr_per_image((pred.float() + 1) / 2, (target.float() + 1) / 2)
    size = tuple(x.shape[-2:])
    up = [F.interpolate(t.float(), size=size, mode="bilinear", align_corners=False) for t in (pred, target)]
    return {"psnr": psnr, "lpips": lpips_model(*up).flatten()}


NEIGHBOURS = 10  # iFID's k: the draw is among this many nearest reference latents


def channel_normalised(z: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """[N,C,h,w] -> [N, C·h·w]: flattened, each channel standardised with the reference set's mean and std."""
    mean = reference.double().mean(dim=(0, 2, 3), keepdim=True)
    std = reference.double().var(dim=(0, 2, 3), keepdim=True, unbiased=False).clamp_min(1e-6).sqrt()
    return ((z.double() - mean) / std).flatten(1)


def interpolation_partners(
    z: torch.Tensor, index: torch.Tensor, seed: int, reference: torch.Tensor | None = None, rows=None
) -> torch.Tensor:
    """For the latents ``z[rows]`` ([N,C,h,w], all N by default), iFID's partners among the ``reference`` latents
    [M,C,h,w] (module docstring): [len(rows),C,h,w].

    ``reference`` None: the latents ``z`` themselves, each one's own left out.  The draw of latent i comes from
    a generator seeded by (seed, its image index ``index[i]``): the same whatever the batch, process or ``rows``.
    """
    self_excluded = reference is None
    ref = z if self_excluded else reference
    rows = torch.arange(len(z)) if rows is None else torch.as_tensor(rows)
    zn, rn = channel_normalised(z[rows], ref), channel_normalised(ref, ref)
    zu, ru = F.normalize(zn, dim=1), F.normalize(rn, dim=1)
    k = min(NEIGHBOURS, len(ref) - self_excluded)
    chosen = torch.empty(len(rows), dtype=torch.long)
    step = max(1, 2**24 // (k * zn.shape[1]))  # rows per chunk: [step, k, D] float64 stays under 128 MiB
    for start in range(0, len(rows), step):
        part = torch.arange(start, min(start + step, len(rows)))  # positions in rows
        cosine = zu[part] @ ru.T  # [r, M]
        if self_excluded:
            cosine[torch.arange(len(part)), rows[part]] = -math.inf
        top = cosine.topk(k, dim=1).indices  # [r, k]
        probs = torch.softmax(-(zn[part, None] - rn[top]).pow(2).mean(-1), dim=1)  # softmax(−MSE) over the k
        for r, i in enumerate(part.tolist()):
            chosen[i] = top[r, image_rng(seed, index[rows[i]]).choice(k, p=probs[r].numpy())]
    return ref[chosen]


class Diffusability:
    """The report for one model: an ``eval.engine`` metric over the engine's batches, on every rank.

    Per batch the equivariance figures (a decode of the downsampled mode per scale), the spectra and the
    latents are gathered; ``compute`` decodes the interpolation midpoints, each rank its share, and takes
    their Fréchet distance to the real images on ``bank``'s extractor ``features``, reported as ``name``
    (``ifid`` on the FID Inception, ``ifd_vgg16`` on VGG16 features).
    """

    def __init__(self, accelerator, vae, lpips_model, bank, features: str, name: str, batch_size: int, seed: int):
        self.accelerator, self.vae, self.lpips_model = accelerator, vae, lpips_model
        self.bank, self.features, self.name, self.batch_size = bank, features, name, batch_size
        self.seed = seed
        self.reference: torch.Tensor | None = None  # iFID's reference latents; None: the evaluation latents
        self.sums: dict[int, dict[str, float]] = {}  # per scale: summed PSNR and LPIPS
        self.latent_spec, self.image_spec = SpectrumAccumulator(), SpectrumAccumulator()
        self.samples: list[torch.Tensor] = []  # posterior samples [B,C,h,w] (iFID's latents)
        self.indices: list[torch.Tensor] = []
        self.n = 0

    @torch.no_grad()
    def update(self, out) -> None:
        x, z = out.x, out.posterior.mode()
        gather = self.accelerator.gather_for_metrics
        decode = lambda latents: self.vae.decode(latents).sample  # noqa: E731
        for s in valid_scales(list(SCALES), z.shape[-1], x.shape[-1], lpips=False):  # square: centre crops
            acc = self.sums.setdefault(s, {"psnr": 0.0, "lpips": 0.0})
            for key, values in gather(equivariance_batch(decode, x, z, s, self.lpips_model)).items():
                acc[key] += float(values.double().sum())
        small = F.interpolate(x, size=tuple(z.shape[-2:]), mode="bilinear", antialias=True)
        sample = out.posterior.mean + out.posterior.std * out.noise(self.seed)  # the sample iFID interpolates
        index = out.index.to(x.device)
        latent_power, image_power, sample, index = gather((power_spectra(z), power_spectra(small), sample, index))
        self.latent_spec.update(latent_power)
        self.image_spec.update(image_power)
        self.samples.append(sample.float().cpu())
        self.indices.append(index.cpu())
        self.n += len(sample)

    @torch.no_grad()
    def interpolation_fd(self) -> float:
        """Decode the interpolations and take their FD to the real images: each rank searches the neighbours of
        its share of the latents and decodes them; the features are gathered."""
        z, index = torch.cat(self.samples), torch.cat(self.indices)
        rows = split_rows(self.accelerator, torch.arange(len(z)))  # this rank's share (padded: the last repeated)
        mid = slerp(z[rows], interpolation_partners(z, index, self.seed + 1, self.reference, rows), 0.5)
        extractor, device = self.bank.extractors[self.features], self.accelerator.device
        features = [
            extractor(to_uint8(self.vae.decode(chunk.to(device)).sample.clamp(-1, 1)))
            for chunk in mid.split(self.batch_size)
        ]
        fake = gather_rows(self.accelerator, torch.cat(features), len(z))
        return frechet_distance(self.bank.real(self.features), fake.double().cpu())

    def compute(self) -> dict:
        radius, latent_power = self.latent_spec.spectrum()
        image_radius, image_power = self.image_spec.spectrum()
        return {
            "n_images": self.n,
            "equivariance": {str(s): {k: v / self.n for k, v in acc.items()} for s, acc in self.sums.items()},
            "equivariance_scales_skipped": [s for s in SCALES if s not in self.sums],  # latent too small for them
            "hf_fraction": self.latent_spec.high_frequency_fraction(),
            "image_hf_fraction": self.image_spec.high_frequency_fraction(),
            self.name: self.interpolation_fd(),
            "ifid_reference": "the evaluation images, each one's own latent left out"
            if self.reference is None
            else f"{len(self.reference)} other images",
            "spectrum": {"radius": radius, "latent": latent_power, "image_radius": image_radius, "image": image_power},
        }


def checkerboard(h: int, w: int) -> torch.Tensor:
    """[h, w] of (−1)^(i+j): +1 and −1 in alternation, the highest spatial frequency on both axes."""
    return 1.0 - 2.0 * ((torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2)


def latent_shift(config) -> torch.Tensor:
    """The VAE's latent mean as its config records it: [C,1,1] latents_mean (sdxl), or shift_factor, or 0."""
    if config.get("latents_mean") is not None:
        return torch.tensor(config["latents_mean"], dtype=torch.float32).view(-1, 1, 1)
    return torch.tensor(float(config.get("shift_factor") or 0.0))


class CheckerboardVAE(torch.nn.Module):
    """A control for diffusability: the VAE's latents multiplied by a ±1 checkerboard around their mean m,
    z' = m + c ⊙ (z − m) with c = (−1)^(i+j), undone before decoding (c ⊙ c = 1: exactly invertible).

    It reconstructs exactly as the VAE does and holds the same information, but the latents' power moves to the
    highest spatial frequencies: a latent space that should be harder to diffuse at equal reconstruction.
    In the normalised latents (z − m)·s a diffusion model sees, it is the plain sign pattern c ⊙ u.
    """

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.register_buffer("shift", latent_shift(vae.config), persistent=False)

    def flip(self, z: torch.Tensor) -> torch.Tensor:
        """m + c ⊙ (z − m) on [..., h, w] latents: its own inverse."""
        board = checkerboard(*z.shape[-2:]).to(z)
        shift = self.shift.to(z)
        return shift + board * (z - shift)

    def encode(self, x: torch.Tensor) -> AutoencoderKLOutput:
        """The VAE's posterior with its mean flipped: q(z'|x) = N(m + c ⊙ (μ − m), σ²), the variance unchanged."""
        posterior = self.vae.encode(x).latent_dist
        flipped = torch.cat([self.flip(posterior.mean), posterior.logvar], 1)  # [B, 2C, h, w]: mean, log-variance
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(flipped))

    def decode(self, z: torch.Tensor):
        """The VAE's decoding of the unflipped latents."""
        return self.vae.decode(self.flip(z))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # config, dtype, device, tiling: the VAE's own
            return getattr(super().__getattr__("vae"), name)


def save_spectrum_figure(report: dict, path, title: str) -> None:
    """Both radial spectra on log axes, with the half-Nyquist line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = report["spectrum"]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.loglog(spec["radius"], spec["latent"], "o-", label=f"latent (HF fraction {report['hf_fraction']:.3f})")
    ax.loglog(
        spec["image_radius"], spec["image"], "s--", label=f"image at latent size ({report['image_hf_fraction']:.3f})"
    )
    ax.axvline(HALF_NYQUIST, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("radial frequency (cycles per latent position)")
    ax.set_ylabel("normalised power")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
