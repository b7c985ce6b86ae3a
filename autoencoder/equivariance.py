"""Scale equivariance of the latent space: the downsampling both sides share, and the per-step draw.

A decoder is scale-equivariant when a downsampled latent decodes to the downsampled image,
D(↓ₛz) ≈ ↓ₛx (Skorokhodov et al. 2025, "Improving the diffusability of autoencoders"; EQ-VAE,
Kouzelis et al. 2025, adds a random rot90).  Such latents carry no more high-frequency content
than the image, and diffusion models are reported to learn on them faster.  ``eval.diffusability``
measures it; the training objective can ask for it (``--equivariance_weight``, autoencoder/losses.py).
"""

import random
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .config import LossConfig

MIN_LATENT = 2  # a downsampled latent must keep at least 2x2 positions
MIN_LPIPS_IMAGE = 16  # LPIPS-VGG's deepest layer needs 16 px (4 poolings)


def downsample(t: torch.Tensor, scale: int) -> torch.Tensor:
    """[B,C,H,W] -> [B,C,H/s,W/s] by antialiased bilinear resampling, the same for latents and images.

    In float32 whatever the input's dtype (under bf16/fp16 autocast the latent is half precision, for
    which torch has no antialiased kernel on CPU), returned in the input's dtype.
    """
    h, w = t.shape[-2:]
    small = F.interpolate(
        t.float(), size=(h // scale, w // scale), mode="bilinear", antialias=True, align_corners=False
    )
    return small.to(t.dtype)


def valid_scales(scales: list[int], latent_size: int, image_size: int, lpips: bool) -> list[int]:
    """The scales that divide the latent, leave it at least 2x2 and (with an LPIPS term) the image at 16 px."""
    return [
        s
        for s in scales
        if latent_size % s == 0 and latent_size // s >= MIN_LATENT and (not lpips or image_size // s >= MIN_LPIPS_IMAGE)
    ]


class Draw(NamedTuple):
    """This step's equivariance transform: downsampling factor and number of quarter turns."""

    scale: int
    turns: int


def draw(cfg: LossConfig, valid: list[int], seed: int, step: int) -> Draw | None:
    """The transform of optimizer step ``step`` (None: no equivariance term this step).

    Drawn on the host from (seed, step) alone, so it costs no device sync, is the same on every
    rank and micro-batch of the step, and replays exactly after a resume.
    """
    if cfg.equivariance_weight <= 0 or not valid:
        return None
    rng = random.Random(seed * 1_000_003 + step)
    if rng.random() >= cfg.equivariance_prob:
        return None
    return Draw(scale=rng.choice(valid), turns=rng.randrange(4) if cfg.equivariance_rotate else 0)


def transform(t: torch.Tensor, d: Draw) -> torch.Tensor:
    """↓ₛ then rot90^turns of a [B,C,H,W] batch (latent or image)."""
    small = downsample(t, d.scale)
    return torch.rot90(small, d.turns, dims=(2, 3)) if d.turns else small
