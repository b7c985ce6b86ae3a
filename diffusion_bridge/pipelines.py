"""Putting a trained VAE into diffusers pipelines, with the latent-channel check they do not make.

Three latent conventions live in diffusers today:

- ``sd`` — ``StableDiffusionPipeline``, ``DiTPipeline``, and SDXL when the VAE config has no
  ``latents_mean``/``latents_std``: the denoiser sees ``z * scaling_factor``; decoding is
  ``vae.decode(latents / scaling_factor)``; ``shift_factor`` is ignored.
- ``sd3`` — ``StableDiffusion3Pipeline``, FLUX: the denoiser sees ``(z - shift_factor) * scaling_factor``;
  decoding is ``vae.decode(latents / scaling_factor + shift_factor)``.
- ``sdxl`` — ``StableDiffusionXLPipeline`` when the config has ``latents_mean``/``latents_std``
  (Playground-v2.5 style; 4 channels): the denoiser sees ``(z - mean_c) / std_c * scaling_factor``;
  decoding is ``vae.decode(latents * std_c / scaling_factor + mean_c)``.

``convention(pipeline)`` says which one a pipeline uses with its current VAE;
``diffusion_bridge.stats.LatentScaling`` implements all three.
"""

from typing import Literal

from diffusers import AutoencoderKL, DiffusionPipeline

from autoencoder.errors import UsageError


def denoiser(pipeline: DiffusionPipeline):
    """The pipeline's UNet or transformer."""
    for name in ("transformer", "unet"):
        module = getattr(pipeline, name, None)
        if module is not None:
            return module
    raise ValueError(f"{type(pipeline).__name__} has neither a 'transformer' nor a 'unet' component")


def _is_flux(module) -> bool:
    """FLUX transformers take 2x2-packed latents: in_channels = 4 * latent channels."""
    from diffusers import FluxTransformer2DModel

    return isinstance(module, FluxTransformer2DModel)


def _is_sd3(module) -> bool:
    """SD3 transformers use the shifted convention."""
    from diffusers import SD3Transformer2DModel

    return isinstance(module, SD3Transformer2DModel)


def expected_latent_channels(pipeline: DiffusionPipeline) -> int:
    """Latent channels the pipeline's denoiser consumes."""
    module = denoiser(pipeline)
    channels = module.config.in_channels
    return channels // 4 if _is_flux(module) else channels


def convention(pipeline: DiffusionPipeline) -> Literal["sd", "sd3", "sdxl"]:
    """The latent convention ``pipeline`` decodes with, given its current VAE's config."""
    from diffusers import StableDiffusionXLPipeline

    module = denoiser(pipeline)
    if _is_sd3(module) or _is_flux(module):
        return "sd3"
    c = pipeline.vae.config
    if isinstance(pipeline, StableDiffusionXLPipeline) and c.latents_mean is not None and c.latents_std is not None:
        return "sdxl"
    return "sd"


def check_vae_fits(vae: AutoencoderKL, pipeline: DiffusionPipeline) -> None:
    """A UsageError (a ValueError) naming both numbers when the VAE's latents cannot feed the pipeline's denoiser."""
    want, have = expected_latent_channels(pipeline), vae.config.latent_channels
    if want != have:
        raise UsageError(
            f"this VAE has {have} latent channels but {type(pipeline).__name__}'s {type(denoiser(pipeline)).__name__} "
            f"takes {want}",
            f"train a VAE with --latent_channels={want} (e.g. preset {'f8c16' if want == 16 else 'sd-f8c4'}) or use "
            f"a denoiser with in_channels={have}",
        )
    from diffusers import StableDiffusionXLPipeline

    if isinstance(pipeline, StableDiffusionXLPipeline) and vae.config.latents_mean is not None and have != 4:
        raise UsageError(
            f"StableDiffusionXLPipeline decodes per-channel latents_mean/latents_std for exactly 4 "
            f"channels; this VAE has {have}",
            "use StableDiffusion3Pipeline-style shift/scale (--convention sd3) for other channel counts",
        )
    if convention(pipeline) == "sd3" and vae.config.shift_factor is None:
        raise UsageError(
            f"{type(pipeline).__name__} decodes latents / scaling_factor + shift_factor, but this VAE's config has "
            "no shift_factor",
            "run `python -m diffusion_bridge stats --model DIR --write` first",
        )


def with_vae(pipeline: DiffusionPipeline, vae: AutoencoderKL) -> DiffusionPipeline:
    """The same pipeline rebuilt around ``vae`` (so its VAE scale factor and image processor follow it)."""
    check_vae_fits(vae, pipeline)
    return type(pipeline)(**{**pipeline.components, "vae": vae})
