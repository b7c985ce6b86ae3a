"""Presets are real diffusers AutoencoderKL architectures; fine-tuning init and decoder-only mode."""

import pytest
import torch
from diffusers import AutoencoderKL

from autoencoder.config import ModelConfig
from autoencoder.models import PRESETS, VAEForTraining, build_vae, count_parameters, downsampling_factor


def test_tiny_and_cpu_small_sizes():
    tiny = build_vae(ModelConfig(preset="tiny"))
    small = build_vae(ModelConfig(preset="cpu-small"))
    assert 1_000 < count_parameters(tiny) < 20_000
    assert 1_000_000 < count_parameters(small) < 10_000_000
    assert downsampling_factor(small) == 8 and small.config.latent_channels == 4
    z = small.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
    assert z.shape == (1, 4, 8, 8)


def test_sd_f8c4_matches_stable_diffusion_vae():
    vae = build_vae(ModelConfig(preset="sd-f8c4"))
    assert list(vae.config.block_out_channels) == [128, 256, 512, 512] and vae.config.layers_per_block == 2
    assert count_parameters(vae) == 83_653_863  # parameter count of SD 1.x / SDXL's AutoencoderKL


def test_f8c16_is_sd3_flux_style():
    vae = build_vae(ModelConfig(preset="f8c16"))
    assert vae.config.latent_channels == 16 and downsampling_factor(vae) == 8
    assert vae.quant_conv is None and vae.post_quant_conv is None


def test_overrides_and_unknown_preset():
    vae = build_vae(ModelConfig(preset="tiny", latent_channels=2, block_out_channels=[4, 8, 8]))
    assert vae.config.latent_channels == 2 and downsampling_factor(vae) == 4
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        build_vae(ModelConfig(preset="huge"))
    assert set(PRESETS) >= {"tiny", "cpu-small", "sd-f8c4", "f8c16"}


def test_init_from_pretrained_folder(tmp_path):
    src = build_vae(ModelConfig(preset="tiny"))
    src.save_pretrained(tmp_path / "repo" / "vae")
    vae = build_vae(ModelConfig(pretrained_model_name_or_path=str(tmp_path / "repo"), pretrained_subfolder="vae"))
    assert isinstance(vae, AutoencoderKL)
    for (name, a), b in zip(src.state_dict().items(), vae.state_dict().values()):
        assert torch.equal(a, b), name


def test_forward_reaches_encoder_through_the_sample():
    model = VAEForTraining(build_vae(ModelConfig(preset="tiny")))
    recon, posterior = model(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert recon.shape == (2, 3, 16, 16) and posterior.mean.shape == (2, 4, 8, 8)
    (recon.abs().mean() + posterior.kl().mean()).backward()
    assert model.vae.encoder.conv_in.weight.grad.abs().sum() > 0


def test_decoder_only_freezes_encoder():
    model = VAEForTraining(build_vae(ModelConfig(preset="tiny", train_decoder_only=True)))
    recon, _ = model(torch.rand(2, 3, 16, 16) * 2 - 1)
    recon.abs().mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.vae.encoder.parameters())
    assert all(p.grad is None for p in model.vae.quant_conv.parameters())
    assert model.vae.decoder.conv_out.weight.grad.abs().sum() > 0


def test_half_precision_check_and_force_upcast():
    from autoencoder.models import half_precision_decode_check, needs_force_upcast

    vae = build_vae(ModelConfig(preset="tiny"))
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    latents = vae.encode(torch.rand(2, 3, 16, 16) * 2 - 1).latent_dist.mode()
    check = half_precision_decode_check(vae, latents, torch.bfloat16)
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())  # the model itself is untouched
    assert vae.dtype == torch.float32
    assert check["finite"] is True and 20 < check["psnr_vs_fp32"] < 80  # bf16 keeps ~8 bits of mantissa
    assert needs_force_upcast({"finite": True, "psnr_vs_fp32": 55.0}) is False
    assert needs_force_upcast({"finite": True, "psnr_vs_fp32": 30.0}) is True
    assert needs_force_upcast({"finite": False, "psnr_vs_fp32": None}) is True
    assert needs_force_upcast({"finite": None, "psnr_vs_fp32": None, "error": "no kernel"}) is True


def test_gradient_checkpointing_recomputes_the_blocks_in_backward_and_trains_the_same():
    """--gradient_checkpointing: every encoder down block and decoder up block runs its forward twice per
    training step (once more in backward, instead of keeping its activations), and the gradients are the same."""

    def step(model: VAEForTraining) -> tuple[dict[str, int], torch.Tensor]:
        blocks = {f"down{i}": b for i, b in enumerate(model.vae.encoder.down_blocks)}
        blocks |= {f"up{i}": b for i, b in enumerate(model.vae.decoder.up_blocks)}
        calls = dict.fromkeys(blocks, 0)
        for name, block in blocks.items():
            block.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        model.train()
        recon, _ = model(x, sample_posterior=False)
        recon.abs().mean().backward()
        return calls, model.vae.encoder.conv_in.weight.grad

    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.manual_seed(0)
    plain_calls, plain_grad = step(VAEForTraining(build_vae(ModelConfig(preset="tiny"))))
    torch.manual_seed(0)
    ckpt_calls, ckpt_grad = step(VAEForTraining(build_vae(ModelConfig(preset="tiny", gradient_checkpointing=True))))
    assert set(plain_calls.values()) == {1}, plain_calls
    # twice: recomputed in backward (counted by a pre-hook, as torch stops a recompute early)
    assert set(ckpt_calls.values()) == {2}, ckpt_calls
    assert plain_grad.abs().sum() > 0 and torch.allclose(plain_grad, ckpt_grad, atol=1e-6)
