"""``python -m diffusion_bridge``: how a trained VAE meets diffusion models.

Today: ``info`` reports what a diffusion pipeline needs from a VAE's config (latent channels,
downsampling, scaling/shift factors, per-channel latent statistics).  Latent statistics,
latent caching and Hub publishing are added as further subcommands.
"""

import argparse
import json
from typing import Optional

from diffusers import AutoencoderKL

from autoencoder.models import count_parameters, downsampling_factor


def vae_info(vae: AutoencoderKL) -> dict:
    """The latent-space facts a diffusion pipeline relies on, read from the VAE's config."""
    c = vae.config
    return {
        "latent_channels": c.latent_channels,
        "downsampling_factor": downsampling_factor(vae),
        "scaling_factor": c.scaling_factor,
        "shift_factor": c.shift_factor,
        "latents_mean": c.latents_mean,
        "latents_std": c.latents_std,
        "force_upcast": c.force_upcast,
        "parameters": count_parameters(vae),
    }


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``python -m diffusion_bridge``."""
    parser = argparse.ArgumentParser(prog="python -m diffusion_bridge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print the latent-space facts of a diffusers VAE")
    info.add_argument("--model", required=True, help="diffusers VAE folder or Hub id")
    info.add_argument("--subfolder", default=None)
    args = parser.parse_args(argv)
    if args.command == "info":
        vae = AutoencoderKL.from_pretrained(args.model, subfolder=args.subfolder)
        print(json.dumps(vae_info(vae), indent=2))
    return 0
