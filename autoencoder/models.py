"""Model presets: diffusers ``AutoencoderKL`` built from constructor kwargs, or loaded for fine-tuning."""

import copy
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from .config import ModelConfig
from .equivariance import Draw, transform
from .errors import UsageError, about, check_model_source, damaged_weights

# Architecture kwargs per preset; everything else is AutoencoderKL's default.  Each level after
# the first halves the resolution, so len(block_out_channels) = 4 gives 8x downsampling.
PRESETS: dict[str, dict] = {
    # ~12k parameters, 2x downsampling: unit tests and smoke runs only.
    "tiny": dict(block_out_channels=[4, 8], layers_per_block=1, latent_channels=4, norm_num_groups=2),
    # ~3.8M parameters, 8x / 4 channels like SD, narrow enough to train on 2 CPU cores.  8 norm
    # groups keep >= 4 channels per group (SD has 4 at its widest level; 32 groups on 32 channels
    # would be instance norm, which trained markedly slower); no mid-block attention (speed).
    "cpu-small": dict(
        block_out_channels=[32, 64, 128, 128],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        mid_block_add_attention=False,
    ),
    # Stable Diffusion 1.x / 2.x / SDXL VAE (83.7M parameters).
    "sd-f8c4": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=512),
    # SD3 / FLUX style: 16 latent channels and no 1x1 quant / post-quant convs.
    "f8c16": dict(
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        latent_channels=16,
        sample_size=1024,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
}


def preset_kwargs(cfg: ModelConfig) -> dict:
    """AutoencoderKL constructor kwargs for the configured preset plus any overrides."""
    if cfg.preset not in PRESETS:
        raise UsageError(f"unknown model preset {cfg.preset!r}", f"choose one of {sorted(PRESETS)}")
    kwargs = dict(PRESETS[cfg.preset])
    for key in ("latent_channels", "block_out_channels", "layers_per_block"):
        if getattr(cfg, key) is not None:
            kwargs[key] = getattr(cfg, key)
    n = len(kwargs["block_out_channels"])
    kwargs["down_block_types"] = ["DownEncoderBlock2D"] * n
    kwargs["up_block_types"] = ["UpDecoderBlock2D"] * n
    # A freshly trained VAE has no measured latent scale yet; 1.0 (not SD's 0.18215) until the
    # latent statistics are computed and written into the config.
    kwargs.setdefault("scaling_factor", 1.0)
    return kwargs


def build_vae(cfg: ModelConfig) -> AutoencoderKL:
    """The VAE to train: a pretrained diffusers VAE or training checkpoint if configured, else a fresh preset."""
    if cfg.pretrained_model_name_or_path:
        source, flag = cfg.pretrained_model_name_or_path, "--pretrained_model_name_or_path"
        vae = load_vae(source, cfg.pretrained_subfolder, cfg.revision, flag)  # a diffusers VAE or a checkpoint
        vae = vae.to(torch.float32)  # train in fp32 whatever the checkpoint's storage dtype
    else:
        vae = AutoencoderKL(**preset_kwargs(cfg))
    if cfg.train_decoder_only:
        freeze_encoder(vae)
    if cfg.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    return vae


def is_training_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a training checkpoint folder (accelerate ``save_state`` + the VAE's config.json)."""
    path = Path(path)
    return (path / "model.safetensors").is_file() and (path / "config.json").is_file()


def load_vae(
    model: str, subfolder: str | None = None, revision: str | None = None, flag: str = "--model"
) -> AutoencoderKL:
    """A diffusers VAE (local folder or Hub id), or the trained weights of a training checkpoint folder.

    A checkpoint (``checkpoints/checkpoint-N``) holds ``VAEForTraining``'s state dict, keys
    ``vae.*``: loaded strictly into an ``AutoencoderKL`` built from the checkpoint's config.json.
    These are the raw trained weights (an EMA, if used, lives in the checkpoint separately).
    """
    if subfolder is None and revision is None and is_training_checkpoint(model):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(model)
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(path))
        try:
            state = load_file(path / "model.safetensors")
        except SafetensorError as exc:
            raise damaged_weights(path / "model.safetensors", exc) from exc
        if not all(k.startswith("vae.") for k in state):
            raise UsageError(
                f"{path / 'model.safetensors'} is not a VAEForTraining state dict (keys vae.*)",
                "give the checkpoint folder of a training run, or an exported vae/ folder",
            )
        vae.load_state_dict({k.removeprefix("vae."): v for k, v in state.items()}, strict=True)
        return vae
    check_model_source(flag, model, subfolder)
    with about(flag, model):
        return AutoencoderKL.from_pretrained(model, subfolder=subfolder, revision=revision)


def load_vae_config(model: str, subfolder: str | None = None, flag: str = "--model") -> dict:
    """The config of a VAE (folder, Hub id or training checkpoint), without its weights: a check of seconds."""
    check_model_source(flag, model, subfolder)
    with about(flag, model):
        config = AutoencoderKL.load_config(model, subfolder=subfolder)
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL" or "block_out_channels" not in config:
        raise UsageError(
            f"{flag} {model!r} is a {config.get('_class_name', 'non-diffusers')} config, not an AutoencoderKL",
            "give an AutoencoderKL folder, or add --subfolder vae for a pipeline repository",
        )
    return config


def check_resolution(resolution: int, factor: int, whose: str = "the VAE's") -> None:
    """Refuse a --resolution the encoder cannot downsample by ``factor`` exactly, suggesting the nearest one below."""
    if resolution % factor:
        raise UsageError(
            f"--resolution {resolution} is not a multiple of {whose} downsampling {factor}",
            f"use e.g. --resolution {max(factor, resolution // factor * factor)}",
        )


def freeze_encoder(vae: AutoencoderKL) -> None:
    """Freeze the encoder side (encoder + quant_conv) for decoder-only fine-tuning."""
    vae.encoder.requires_grad_(False)
    if vae.quant_conv is not None:
        vae.quant_conv.requires_grad_(False)


def downsampling_factor(vae: AutoencoderKL) -> int:
    """Spatial downsampling of the encoder (8 for SD-style VAEs)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class Scaled(NamedTuple):
    """The equivariance pair of a step: ↓ₛx (the target) and D(↓ₛz), both [B,3,H/s,W/s]."""

    target: torch.Tensor
    reconstruction: torch.Tensor


class VAEForTraining(nn.Module):
    """Wraps an ``AutoencoderKL`` so one ``forward`` returns reconstruction *and* posterior.

    diffusers' ``AutoencoderKL.forward`` returns only the reconstruction, which tempts training
    code to call ``vae.encode``/``vae.decode`` on the unwrapped model and so bypass DDP's gradient
    synchronisation.  Preparing this wrapper with ``accelerator.prepare`` keeps the whole
    encode -> sample -> decode inside the DDP/FSDP forward.
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(
        self,
        pixel_values: torch.Tensor,
        sample_posterior: bool = True,
        generator: torch.Generator | None = None,
        equivariance: Draw | None = None,
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution] | tuple[torch.Tensor, DiagonalGaussianDistribution, Scaled]:
        """pixel_values [B,3,H,W] in [-1,1] -> (reconstruction [B,3,H,W], posterior over [B,C,H/f,W/f]).

        With ``equivariance`` (a scale s and quarter turns) a third item: ↓ₛx and D(↓ₛz), both
        [B,3,H/s,W/s], decoded in the same forward so DDP sees one graph (autoencoder/equivariance.py).
        """
        if self.vae.encoder.conv_in.weight.requires_grad:
            posterior = self.vae.encode(pixel_values).latent_dist
        else:  # decoder-only fine-tuning: no graph through the frozen encoder
            with torch.no_grad():
                posterior = self.vae.encode(pixel_values).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        reconstruction = self.vae.decode(z).sample
        if equivariance is None:
            return reconstruction, posterior
        small = self.vae.decode(transform(z, equivariance)).sample
        return reconstruction, posterior, Scaled(transform(pixel_values, equivariance), small)

    def last_layer(self) -> nn.Parameter:
        """The decoder's output conv weight, where the adaptive GAN weight is measured."""
        return self.vae.decoder.conv_out.weight


def compile_regions(vae: AutoencoderKL, **compile_kwargs) -> None:
    """``torch.compile`` the VAE in place, block by block, leaving the decoder's output conv eager.

    Why not one graph: the adaptive GAN weight differentiates the loss w.r.t. ``decoder.conv_out``'s
    weight with ``retain_graph`` (latent-diffusion).  Through a whole-model graph that reaches
    AOTAutograd's single backward node, which refuses ``retain_graph`` (it donates its buffers) and
    would otherwise rerun the whole VAE backward twice per step; with ``conv_out`` eager that gradient
    needs only conv_out's own backward.  In place (``nn.Module.compile``): parameter names,
    checkpoints and the export are unchanged.
    """
    for region in (vae.encoder, vae.decoder.mid_block, *vae.decoder.up_blocks):
        # static shapes: the up blocks share their code but not their shapes; without this the second
        # one would recompile the first's graph with symbolic sizes for all of them
        region.compile(**{"dynamic": False, **compile_kwargs})


def main(argv: list[str] | None = None) -> int:
    """Print each preset's parameter count, downsampling and latent channels; ``--config-reference``: docs/config.md."""
    argv = sys.argv[1:] if argv is None else argv
    if "--config-reference" in argv:
        from autoencoder.config import reference_markdown

        print(reference_markdown(), end="")
        return 0
    print("| preset | parameters | downsampling | latent channels | quant convs |\n|---|---|---|---|---|")
    for name in PRESETS:
        vae = build_vae(ModelConfig(preset=name))
        quant = "yes" if vae.quant_conv is not None else "no"
        cells = [name, f"{count_parameters(vae):,}", downsampling_factor(vae), vae.config.latent_channels, quant]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    return 0


def image_rng(seed: int, index: int) -> np.random.Generator:
    """A random generator for one image: numpy's PCG64 seeded with the pair (seed, index) through its SeedSequence.

    (torch's CPU generator keeps only the low 32 bits of a seed, so ``seed * 2**32 + index`` would ignore the seed.)
    """
    return np.random.default_rng([int(seed), int(index)])


def seeded_noise(shape: tuple[int, ...], indices: torch.Tensor, seed: int, samples: int | None = None) -> torch.Tensor:
    """Standard normal noise per image from ``image_rng(seed, index)``: [B, *shape], or [samples, B, *shape].
    A figure drawn from it does not depend on the batch size or the number of processes."""
    size = shape if samples is None else (samples, *shape)
    draws = [torch.from_numpy(image_rng(seed, i).standard_normal(size, dtype=np.float32)) for i in indices]
    return torch.stack(draws, dim=0 if samples is None else 1)


def cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model``'s floating-point tensors in ``dtype`` (fp16, bf16 or fp32), in place.

    Through ``half`` / ``bfloat16`` / ``float``: diffusers' ``to(dtype)`` warns that modules "should be kept in
    float32" even for a model that has none (AutoencoderKL's list is empty), a line a user cannot act on.
    """
    return {torch.float16: model.half, torch.bfloat16: model.bfloat16, torch.float32: model.float}[dtype]()


def half_check_latents(latents: torch.Tensor) -> torch.Tensor:
    """The latents to test half-precision decoding on: all of them on GPU; one 8x8 crop on CPU.

    CPUs emulate fp16 convolutions very slowly (about a minute for two 32x32 latents of cpu-small).
    """
    return latents[:1, :, :8, :8] if latents.device.type == "cpu" else latents


@torch.no_grad()
def half_precision_decode_check(vae: AutoencoderKL, latents: torch.Tensor, dtype: torch.dtype = torch.float16) -> dict:
    """Decode ``latents`` in fp32 and in ``dtype``: is the half-precision output finite and how close (PSNR, dB)?

    This is what ``force_upcast`` is about: SDXL's VAE overflows in fp16 and pipelines must upcast it.
    """
    reference = vae.decode(latents.float()).sample.clamp(-1, 1)
    half = cast(copy.deepcopy(vae), dtype)  # a copy: casting the trained weights back and forth would round them
    try:
        out = half.decode(latents.to(dtype)).sample.float()
    except (RuntimeError, NotImplementedError) as exc:  # e.g. a kernel missing for this dtype on CPU
        return {"finite": None, "psnr_vs_fp32": None, "error": f"{type(exc).__name__}: {exc}"[:200]}
    finite = bool(torch.isfinite(out).all())
    mse = (out.clamp(-1, 1) - reference).pow(2).mean().item() / 4  # on a [0,1] scale
    psnr = float("inf") if mse == 0 else -10 * torch.log10(torch.tensor(mse)).item()
    return {"finite": finite, "psnr_vs_fp32": psnr if finite else None, "latent_shape": list(latents.shape)}


def needs_force_upcast(check: dict, min_psnr: float = 40.0) -> bool:
    """Upcast unless fp16 decoding was verified finite and within ``min_psnr`` dB of fp32."""
    return not (check.get("finite") and check["psnr_vs_fp32"] is not None and check["psnr_vs_fp32"] >= min_psnr)
