"""Our VAE inside real diffusers pipelines: DiT generation, and the three latent conventions round-trip."""

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from autoencoder.config import ModelConfig
from autoencoder.models import build_vae
from diffusion_bridge.pipelines import check_vae_fits, convention, with_vae
from diffusion_bridge.stats import LatentScaling

SCALE, SHIFT = 2.5, 0.3


def _vae(latent_channels: int = 4) -> AutoencoderKL:
    torch.manual_seed(0)
    vae = build_vae(ModelConfig(preset="tiny", latent_channels=latent_channels)).eval()
    vae.register_to_config(scaling_factor=SCALE, shift_factor=SHIFT)
    return vae


def _images(n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _dit(in_channels: int = 4, zero: bool = False) -> DiTTransformer2DModel:
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(
        in_channels=in_channels,
        out_channels=2 * in_channels,
        sample_size=8,
        patch_size=2,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=8,
        num_embeds_ada_norm=10,
    )
    if zero:  # predicts eps = 0: an Euler step then leaves the latents unchanged
        torch.nn.init.zeros_(dit.proj_out_2.weight)
        torch.nn.init.zeros_(dit.proj_out_2.bias)
    return dit.eval()


def _expected_images(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """Our direct decode, in the pipelines' [0,1] output range."""
    with torch.no_grad():
        return (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)


def test_dit_decodes_z_over_scaling_factor_and_ignores_shift():
    """DiT decodes latents / scaling_factor: with a zero denoiser it outputs our decode of its final latents / scale."""
    vae = _vae()
    pipe = DiTPipeline(
        transformer=_dit(zero=True), vae=vae, scheduler=DDIMScheduler(set_alpha_to_one=True, clip_sample=False)
    )
    out = pipe(
        class_labels=[1, 2],
        guidance_scale=1.0,
        num_inference_steps=2,
        output_type="pt",
        generator=torch.Generator().manual_seed(5),
    ).images
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))  # the pipeline's initial latents
    # DDIM with eps = 0 multiplies by sqrt(abar_prev / abar_t) per step: telescopes to 1 / sqrt(abar_t0).
    final = eps / pipe.scheduler.alphas_cumprod[pipe.scheduler.timesteps[0]].sqrt()
    assert torch.allclose(out, _expected_images(vae, final / SCALE), atol=1e-5)
    assert not torch.allclose(out, _expected_images(vae, final / SCALE + SHIFT), atol=1e-3)


def _sd_pipeline(vae: AutoencoderKL) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,
    )
    torch.nn.init.zeros_(unet.conv_out.weight)  # predicts eps = 0: Euler steps leave the latents unchanged
    torch.nn.init.zeros_(unet.conv_out.bias)
    return StableDiffusionPipeline(
        vae=vae,
        unet=unet.eval(),
        scheduler=EulerDiscreteScheduler(),
        text_encoder=None,
        tokenizer=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def test_sd_convention_round_trip_through_stable_diffusion_pipeline():
    vae = _vae()
    pipe = _sd_pipeline(vae)
    assert convention(pipe) == "sd"
    with torch.no_grad():
        z = vae.encode(_images()).latent_dist.mode()
    latents = LatentScaling.from_config(vae.config, "sd").scale(z)  # SD convention: z * scale, no shift
    pipe.scheduler.set_timesteps(2)
    out = pipe(
        prompt_embeds=torch.zeros(2, 4, 16),
        latents=latents / pipe.scheduler.init_noise_sigma,
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="pt",
    ).images
    assert torch.allclose(out, _expected_images(vae, z), atol=1e-5)


def test_with_vae_rebuilds_the_pipeline_around_our_vae():
    """A pipeline made with another VAE (4x downsampling) decodes through ours after ``with_vae``, at our 2x."""
    torch.manual_seed(1)
    foreign = build_vae(ModelConfig(preset="tiny", block_out_channels=[4, 8, 8])).eval()
    pipe, ours = _sd_pipeline(foreign), _vae()
    swapped = with_vae(pipe, ours)
    assert type(swapped) is type(pipe) and swapped.unet is pipe.unet and swapped.scheduler is pipe.scheduler
    assert swapped.vae is ours and pipe.vae is foreign  # a new pipeline: the one given is unchanged
    assert (pipe.vae_scale_factor, swapped.vae_scale_factor) == (4, 2)  # its image processor follows our VAE
    with torch.no_grad():
        z = ours.encode(_images()).latent_dist.mode()
    latents = LatentScaling.from_config(ours.config, "sd").scale(z)
    swapped.scheduler.set_timesteps(1)
    out = swapped(
        prompt_embeds=torch.zeros(2, 4, 16),
        latents=latents / swapped.scheduler.init_noise_sigma,
        num_inference_steps=1,
        guidance_scale=1.0,
        output_type="pt",
    ).images
    assert torch.allclose(out, _expected_images(ours, z), atol=1e-5)


def _sd3_pipeline(vae: AutoencoderKL) -> StableDiffusion3Pipeline:
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        pos_embed_max_size=16,
    )
    torch.nn.init.zeros_(transformer.proj_out.weight)  # velocity 0: flow-matching steps leave the latents unchanged
    torch.nn.init.zeros_(transformer.proj_out.bias)
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def test_sd3_convention_round_trip_through_sd3_pipeline():
    vae = _vae(latent_channels=16)
    pipe = _sd3_pipeline(vae)
    assert convention(pipe) == "sd3"
    with torch.no_grad():
        z = vae.encode(_images()).latent_dist.mode()
    latents = LatentScaling.from_config(vae.config, "sd3").scale(z)  # (z - shift) * scale
    out = pipe(
        prompt_embeds=torch.zeros(2, 4, 32),
        pooled_prompt_embeds=torch.zeros(2, 32),
        latents=latents,
        height=16,
        width=16,
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="pt",
    ).images
    assert torch.allclose(out, _expected_images(vae, z), atol=1e-5)
    # the SD convention's latents would decode to something else: the conventions are not interchangeable
    assert not torch.allclose(out, _expected_images(vae, z + SHIFT), atol=1e-3)


def test_channel_mismatch_is_a_clear_error():
    pipe = DiTPipeline(transformer=_dit(in_channels=16), vae=_vae(16), scheduler=EulerDiscreteScheduler())
    with pytest.raises(ValueError, match=r"4 latent channels but DiTPipeline's DiTTransformer2DModel takes 16"):
        with_vae(pipe, _vae(4))
    swapped = with_vae(pipe, _vae(16))
    assert swapped.vae is not pipe.vae and swapped.transformer is pipe.transformer


def test_shifted_pipeline_needs_a_shift_factor():
    vae = _vae(16)
    pipe = _sd3_pipeline(vae)
    vae.register_to_config(shift_factor=None)
    with pytest.raises(ValueError, match="no shift_factor.*stats --model DIR --write"):
        check_vae_fits(vae, pipe)


def _sdxl_pipeline(vae: AutoencoderKL) -> StableDiffusionXLPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )  # 6 time ids x 8 + pooled 32
    torch.nn.init.zeros_(unet.conv_out.weight)  # predicts eps = 0: Euler steps leave the latents unchanged
    torch.nn.init.zeros_(unet.conv_out.bias)
    return StableDiffusionXLPipeline(
        vae=vae,
        unet=unet.eval(),
        scheduler=EulerDiscreteScheduler(),
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        add_watermarker=False,
    )


def _run_sdxl(pipe: StableDiffusionXLPipeline, latents: torch.Tensor) -> torch.Tensor:
    pipe.scheduler.set_timesteps(2)
    return pipe(
        prompt_embeds=torch.zeros(2, 4, 16),
        pooled_prompt_embeds=torch.zeros(2, 32),
        latents=latents / pipe.scheduler.init_noise_sigma,
        height=16,
        width=16,
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="pt",
    ).images


def test_sdxl_convention_round_trip_through_sdxl_pipeline():
    """Latents cached as (z - mean_c) / std_c * s decode in StableDiffusionXLPipeline's code to our vae.decode(z)."""
    vae = _vae()
    stats_mean, stats_std = [0.3, -0.2, 0.1, 0.05], [1.5, 0.5, 2.0, 1.0]
    vae.register_to_config(scaling_factor=0.8, shift_factor=None, latents_mean=stats_mean, latents_std=stats_std)
    pipe = _sdxl_pipeline(vae)
    assert convention(pipe) == "sdxl"
    with torch.no_grad():
        z = vae.encode(_images()).latent_dist.mode()
    sdxl = LatentScaling.from_config(vae.config, "sdxl")
    out = _run_sdxl(pipe, sdxl.scale(z))
    assert torch.allclose(out, _expected_images(vae, z), atol=1e-5)
    # the SD convention's z * s with latents_mean/std in the config decodes wrongly there (the bug this guards)
    wrong = _run_sdxl(pipe, LatentScaling.from_config(vae.config, "sd").scale(z))
    assert not torch.allclose(wrong, _expected_images(vae, z), atol=1e-3)
    # without per-channel statistics in the config, SDXL decodes the sd convention
    vae.register_to_config(latents_mean=None, latents_std=None)
    assert convention(pipe) == "sd"
    out = _run_sdxl(pipe, LatentScaling.from_config(vae.config, "sd").scale(z))
    assert torch.allclose(out, _expected_images(vae, z), atol=1e-5)


def test_sdxl_convention_needs_four_channels(tmp_path):
    from diffusion_bridge.stats import LatentStats, write_stats

    vae = _vae(16)
    vae.save_pretrained(tmp_path / "m")
    stats = LatentStats(1, 16, 0.0, 1.0, [0.9, 1.1], [0.0] * 16, [1.0] * 16)
    with pytest.raises(ValueError, match="assumes 4 latent channels; this VAE has 16"):
        write_stats(tmp_path / "m", stats, convention="sdxl")
