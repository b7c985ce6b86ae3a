"""The scale-equivariance regulariser in training: its term, its cost when off, and a run that resumes exactly."""

import pytest
import torch
from conftest import _metrics, _run_inprocess, deterministic_cudnn, same, stopped_at
from safetensors.torch import load_file

import autoencoder.models
from autoencoder.config import LossConfig, ModelConfig
from autoencoder.equivariance import Draw, downsample
from autoencoder.losses import VAELoss
from autoencoder.models import VAEForTraining, build_vae


@pytest.mark.parametrize("turns", [0, 1])
def test_the_term_is_alpha_times_the_reconstruction_term_of_the_downsampled_pair(turns):
    torch.manual_seed(0)
    model = VAEForTraining(build_vae(ModelConfig(preset="tiny")))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    d = Draw(scale=2, turns=turns)
    recon, posterior, pair = model(x, sample_posterior=False, equivariance=d)
    # D(↓z) of the posterior mode, ↓x: the same antialiased bilinear resampling for both, then the rotation
    z_small = torch.rot90(downsample(posterior.mode(), 2), turns, dims=(2, 3))
    assert torch.allclose(pair.reconstruction, model.vae.decode(z_small).sample, atol=1e-6)
    assert torch.equal(pair.target, torch.rot90(downsample(x, 2), turns, dims=(2, 3)))
    alpha = 0.7
    loss_fn = VAELoss(LossConfig(lpips_weight=0.0, rec_loss="l1", rec_weight=1.3, equivariance_weight=alpha))
    plain, _ = loss_fn(x, recon, posterior, step=0)
    with_term, logs = loss_fn(x, recon, posterior, step=0, scaled=pair)
    expected = 1.3 * (pair.reconstruction - pair.target).abs().mean()  # rec_weight · |↓x − D(↓z)|, per value
    assert logs["train/equivariance"] == pytest.approx(float(expected), rel=1e-6)
    assert float(with_term - plain) == pytest.approx(alpha * float(expected), rel=1e-5)


def _count_transforms(monkeypatch) -> list:
    """Count the equivariance transforms the training forward makes (two per step: ↓z and ↓x)."""
    calls = []
    original = autoencoder.models.transform
    monkeypatch.setattr(autoencoder.models, "transform", lambda t, d: calls.append(d) or original(t, d))
    return calls


def test_weight_zero_computes_nothing_extra_and_weight_alpha_a_term_every_step(tmp_path, lpips_dir, monkeypatch):
    calls = _count_transforms(monkeypatch)
    assert _run_inprocess(tmp_path / "off", lpips_dir, monkeypatch, "--max_train_steps=3") == 0
    assert calls == []
    on = ("--max_train_steps=3", "--equivariance_weight=0.5", "--equivariance_scales=2,4")
    assert _run_inprocess(tmp_path / "on", lpips_dir, monkeypatch, *on) == 0
    assert len(calls) == 2 * 3 and {d.scale for d in calls} == {2}  # 32 px: ↓4 leaves 8 px, too small for LPIPS


@pytest.mark.slow
def test_a_run_with_the_term_resumes_exactly_with_accumulation_ema_gan_and_bf16(tmp_path, lpips_dir, monkeypatch):
    deterministic_cudnn(monkeypatch)
    args = [
        "--max_train_steps=6",
        "--checkpointing_steps=3",
        "--checkpoints_total_limit=5",
        "--gradient_accumulation_steps=2",
        "--use_ema",
        "--disc_enabled=true",
        "--disc_start=0",
        "--mixed_precision=bf16",
        "--equivariance_scales=2",
        "--equivariance_prob=0.5",
        "--equivariance_rotate",
    ]
    full, resumed, off = tmp_path / "full", tmp_path / "resumed", tmp_path / "off"
    assert _run_inprocess(full, lpips_dir, monkeypatch, *args, "--equivariance_weight=1") == 0
    stopped_at(full, 3, resumed)
    assert (
        _run_inprocess(
            resumed, lpips_dir, monkeypatch, *args, "--equivariance_weight=1", "--resume_from_checkpoint=latest"
        )
        == 0
    )
    a, b = (load_file(d / "checkpoints" / "checkpoint-6" / "model.safetensors") for d in (full, resumed))
    assert all(same(a[k], b[k]) for k in a)  # the per-step draw replays after a resume
    assert _run_inprocess(off, lpips_dir, monkeypatch, *args, "--equivariance_weight=0") == 0
    c = load_file(off / "checkpoints" / "checkpoint-6" / "model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the term reached the weights
    assert _metrics(full)["step"] == 6
