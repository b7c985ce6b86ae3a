"""Training that is *right*, not only running: it improves, the GAN trains and resumes, accumulation and
gradient checkpointing change nothing but memory and batching."""

import diffusers.models.autoencoders.vae as diffusers_vae
import pytest
import torch
from conftest import _metrics, _run_inprocess, deterministic_cudnn, same, stopped_at
from safetensors.torch import load_file

import train.step
from autoencoder.config import LossConfig, ModelConfig
from autoencoder.losses import VAELoss
from autoencoder.models import VAEForTraining, build_vae


@pytest.mark.slow
def test_short_run_improves_held_out_psnr_by_a_margin(tmp_path, lpips_dir, monkeypatch):
    """A sign-flipped or detached loss cannot pass: 40 steps must gain >= 2 dB over the untrained model."""
    out = tmp_path / "improve"
    assert (
        _run_inprocess(
            out, lpips_dir, monkeypatch, "--max_train_steps=25", "--checkpointing_steps=0", "--validate_at_start=true"
        )
        == 0
    )
    m = _metrics(out)
    assert m["psnr"] >= m["initial"]["psnr"] + 2.0, (m["initial"], m["psnr"])
    assert m["lpips"] < m["initial"]["lpips"]


@pytest.mark.slow
def test_gan_from_step_zero_with_ema_trains_checkpoints_and_resumes_exactly(tmp_path, lpips_dir, monkeypatch):
    args = [
        "--disc_enabled",
        "--disc_start=0",
        "--disc_channels=8",
        "--disc_num_layers=2",
        "--use_ema",
        "--max_train_steps=4",
        "--checkpointing_steps=2",
        "--checkpoints_total_limit=5",
        "--lr_scheduler=cosine",
        "--lr_warmup_steps=1",
    ]
    deterministic_cudnn(monkeypatch)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert _run_inprocess(full, lpips_dir, monkeypatch, *args) == 0
    ck2, ck4 = (full / "checkpoints" / f"checkpoint-{i}" for i in (2, 4))
    d2, d4 = (load_file(c / "model_1.safetensors") for c in (ck2, ck4))  # the discriminator (second prepared model)
    assert any(not torch.equal(d2[k], d4[k]) for k in d2)  # the discriminator trained
    # its LR follows the VAE's cosine schedule (scheduler_1 is the discriminator's)
    s_vae, s_disc = (torch.load(ck4 / name, weights_only=False) for name in ("scheduler.bin", "scheduler_1.bin"))
    assert s_vae["_last_lr"] == s_disc["_last_lr"] and s_vae["last_epoch"] == s_disc["last_epoch"] == 4
    assert _metrics(full)["step"] == 4 and _metrics(full)["psnr"] == _metrics(full)["val"]["val/psnr"]

    stopped_at(full, 2, resumed)
    assert _run_inprocess(resumed, lpips_dir, monkeypatch, *args, "--resume_from_checkpoint=latest") == 0
    for name in ("model.safetensors", "model_1.safetensors"):  # VAE and discriminator, bit for bit on CPU
        a, b = (load_file(d / "checkpoints" / "checkpoint-4" / name) for d in (full, resumed))
        assert all(same(a[k], b[k]) for k in a), name


def _grad_norms(monkeypatch) -> list[float]:
    """Record the VAE's pre-clipping gradient norm at every optimizer step."""
    seen: list[float] = []
    original = train.step.clip_vae_gradients

    def spy(accelerator, model, loss_fn, cfg, logs):
        ok = original(accelerator, model, loss_fn, cfg, logs)
        seen.append(float(logs["train/grad_norm"]))
        return ok

    monkeypatch.setattr(train.step, "clip_vae_gradients", spy)
    return seen


@pytest.mark.slow
def test_two_micro_batches_of_four_equal_one_batch_of_eight(tmp_path, lpips_dir, monkeypatch):
    common = [
        "--max_train_steps=2",
        "--checkpointing_steps=0",
        "--latent_stats=false",
        "--lpips_weight=0",
        "--random_flip=false",
        "--max_grad_norm=0",
    ]
    norms = _grad_norms(monkeypatch)
    # CUDA's Philox draws differ for one [8,...] and two [4,...] tensors; draw the posterior noise on the
    # CPU (sequential there) so both runs see the same noise, and compare in full fp32 (no TF32)
    monkeypatch.setattr(
        diffusers_vae,
        "randn_tensor",
        lambda shape, generator=None, device=None, dtype=None: torch.randn(shape, generator=generator, dtype=dtype).to(
            device
        ),
    )
    common.append("--allow_tf32=false")
    assert _run_inprocess(tmp_path / "b8", lpips_dir, monkeypatch, *common, "--train_batch_size=8") == 0
    assert (
        _run_inprocess(
            tmp_path / "b4x2",
            lpips_dir,
            monkeypatch,
            *common,
            "--train_batch_size=4",
            "--gradient_accumulation_steps=2",
        )
        == 0
    )
    assert len(norms) == 4
    norms_8, norms_4x2 = norms[:2], norms[2:]
    assert norms_4x2 == pytest.approx(norms_8, rel=1e-4)  # the accumulated gradient is the batch-8 gradient
    a, b = (load_file(tmp_path / d / "vae" / "diffusion_pytorch_model.safetensors") for d in ("b8", "b4x2"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def _saved_bytes_and_grads(checkpointing: bool):
    """Bytes the autograd graph keeps for backward, and the gradients, of one loss on a fixed batch."""
    torch.manual_seed(0)
    vae = build_vae(ModelConfig(preset="tiny", gradient_checkpointing=checkpointing)).train()
    assert vae.encoder.gradient_checkpointing == checkpointing and vae.decoder.gradient_checkpointing == checkpointing
    model, loss_fn = VAEForTraining(vae), VAELoss(LossConfig(lpips_weight=0.0))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        recon, posterior = model(x, sample_posterior=False)
        loss, _ = loss_fn(x, recon, posterior, step=0)
    loss.backward()
    return sum(saved), {n: p.grad.clone() for n, p in vae.named_parameters()}


def test_gradient_checkpointing_changes_memory_not_gradients():
    plain_bytes, plain = _saved_bytes_and_grads(False)
    ckpt_bytes, ckpt = _saved_bytes_and_grads(True)
    assert ckpt_bytes < 0.8 * plain_bytes, (ckpt_bytes, plain_bytes)  # fewer activations kept for backward
    assert plain.keys() == ckpt.keys() and all(torch.allclose(plain[k], ckpt[k], atol=1e-6) for k in plain)
