"""Checks of one model beside the figures: half-precision decoding, tiled decoding, throughput and memory."""

import contextlib
import resource
from collections.abc import Iterator

import torch
from diffusers import AutoencoderKL

from autoencoder.models import downsampling_factor, half_check_latents, half_precision_decode_check

from .metrics import psnr_per_image, quantize_01


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory and what it measures: CUDA max allocated, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"


@contextlib.contextmanager
def tiles_of(vae: AutoencoderKL, tile: int) -> Iterator[None]:
    """``enable_tiling()`` with ``tile``-pixel tiles (the config's ``sample_size`` may exceed the test image)."""
    saved = vae.tile_sample_min_size, vae.tile_latent_min_size
    vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // downsampling_factor(vae)
    vae.enable_tiling()
    try:
        yield
    finally:
        vae.disable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size = saved


@torch.no_grad()
def tiling_check(vae: AutoencoderKL, image: torch.Tensor) -> dict:
    """PSNR (dB, 8-bit) between tiled and untiled decoding — and full round trips — of one image [1,3,H,W].

    The tiles are half the image's side (the VAE's own tile size when that is smaller), so the
    image is always cut into several overlapping tiles and the figure measures real seams.
    """
    tile = min(vae.tile_sample_min_size, min(image.shape[-2:]) // 2)
    assert tile < min(image.shape[-2:]), "the tiling check must tile"
    z = vae.encode(image).latent_dist.mode()
    plain = vae.decode(z).sample
    with tiles_of(vae, tile):
        tiled = vae.decode(z).sample
        tiled_roundtrip = vae.decode(vae.encode(image).latent_dist.mode()).sample
    q = quantize_01
    return {
        "image_size": list(image.shape[-2:]),
        "tile_size": tile,
        "decode_psnr": psnr_per_image(q(tiled), q(plain)).item(),
        "roundtrip_psnr": psnr_per_image(q(tiled_roundtrip), q(plain)).item(),
    }


def model_checks(vae: AutoencoderKL, latents: torch.Tensor, large_image: torch.Tensor | None, half: bool) -> dict:
    """Whether fp16/bf16 decoding of real latents stays finite (the SDXL-VAE problem, with ``half``), and the
    seams of tiled decoding (of ``large_image``, when given)."""
    checks = {}
    if half:
        checks["half_precision_decode"] = {
            str(dtype).removeprefix("torch."): half_precision_decode_check(vae, half_check_latents(latents), dtype)
            for dtype in (torch.float16, torch.bfloat16)
        }
    if large_image is not None:
        checks["tiling"] = tiling_check(vae, large_image)
    return checks
