"""End-to-end training runs of the tiny preset through the real Accelerate loop."""

import json
import logging

import pytest
import torch
from conftest import reset_accelerate
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from test_lpips import _offline

import train.preflight
import train.trainer as trainer
from autoencoder.config import DataConfig
from autoencoder.data import ImageDataset, eval_transform, load_splits


@pytest.fixture
def run(tmp_path, lpips_dir, monkeypatch):
    """Call ``train.main`` in-process on the tiny preset; returns (exit code, output dir)."""
    monkeypatch.setenv("LPIPS_WEIGHTS", str(lpips_dir))
    out = tmp_path / "run"

    def _run(*args: str):
        reset_accelerate()
        code = trainer.main(["--config=tiny", f"--output_dir={out}", *args])
        return code, out

    return _run


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_tiny_run_exports_a_loadable_vae(run):
    code, out = run(
        "--max_train_steps=6", "--checkpointing_steps=3", "--validation_steps=3", "--checkpoints_total_limit=1"
    )
    assert code == 0
    metrics = _metrics(out)
    assert metrics["step"] == 6 and metrics["n_images"] == 8
    for key in ("psnr", "ssim", "lpips"):  # the headline figures are the final validation's, not the untrained ones
        assert metrics[key] == metrics["val"][f"val/{key}"] != metrics["initial"][key]
    assert metrics["lpips_net"] == "alex"
    latent = metrics["latent"]  # the held-out latent report of the last validation
    assert len(latent["kl_per_channel_nats"]) == 4 and latent["n_images"] == 8 and latent["active_channels"] >= 1
    assert metrics["val"]["val/active_channels"] == latent["active_channels"] and "val/kl_ch3" in metrics["val"]

    vae = AutoencoderKL.from_pretrained(out / "vae")
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    # force_upcast follows the measured fp16 decode of held-out latents
    assert vae.config.force_upcast == metrics["fp16_decode"]["force_upcast"]
    assert all(p.dtype == torch.float32 for p in vae.parameters())
    assert (out / "vae" / "training_config.yaml").is_file() and (out / "config.yaml").is_file()
    # latent statistics of the held-out images are in the exported config and latent_stats.json
    stats = json.loads((out / "vae" / "latent_stats.json").read_text())
    assert stats == metrics["latent_stats"] and stats["num_images"] == 8
    assert vae.config.scaling_factor == pytest.approx(1 / stats["std"]) and vae.config.scaling_factor != 1.0
    assert vae.config.shift_factor == pytest.approx(stats["mean"]) and len(stats["channel_std"]) == 4
    assert vae.config.latents_std is None and stats["convention"] == "sd3"  # SDXL would decode per channel otherwise
    # exported weights are the trained ones (same as the final checkpoint's model)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-6"]  # total limit 1, no temporary leftovers
    saved = load_file(out / "checkpoints" / "checkpoint-6" / "model.safetensors")
    assert torch.equal(saved["vae.decoder.conv_out.weight"], vae.decoder.conv_out.weight)
    assert (out / "checkpoints" / "checkpoint-6" / "training_config.yaml").is_file()
    # a checkpoint folder loads as a VAE (what `python -m eval --model CHECKPOINT` uses): the same weights
    from autoencoder.models import load_vae

    from_ckpt = load_vae(str(out / "checkpoints" / "checkpoint-6"))
    assert all(torch.equal(a, b) for a, b in zip(from_ckpt.state_dict().values(), vae.state_dict().values()))
    assert from_ckpt.config.block_out_channels == vae.config.block_out_channels
    # it reconstructs held-out images
    splits = load_splits(DataConfig(resolution=32, num_validation_images=4))
    x = torch.stack([ImageDataset(splits.validation, "image", eval_transform(32))[i]["pixel_values"] for i in range(4)])
    with torch.no_grad():
        recon = vae(x, sample_posterior=False).sample
    assert recon.shape == x.shape
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "step_0000000.png",
        "step_0000003.png",
        "step_0000006.png",
    ]
    assert list((out / "logs").rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_resume_latest_continues_the_step_count(run, caplog):
    caplog.set_level(logging.INFO)
    code, out = run("--max_train_steps=4", "--checkpointing_steps=2", "--validation_steps=0")
    assert code == 0 and _metrics(out)["step"] == 4
    code, out = run(
        "--max_train_steps=6", "--checkpointing_steps=2", "--validation_steps=0", "--resume_from_checkpoint=latest"
    )
    assert code == 0
    metrics = _metrics(out)
    assert metrics["step"] == 6 and metrics["initial"] is None  # no step-0 baseline on a resumed run
    assert any("resumed from" in r.getMessage() and "checkpoint-4" in r.getMessage() for r in caplog.records)
    assert (out / "checkpoints" / "checkpoint-6").is_dir()


def test_resume_from_missing_folder_is_an_error(run, tmp_path, capsys):
    code, out = run("--max_train_steps=1", f"--resume_from_checkpoint={tmp_path / 'nope'}")
    assert code == 2 and "not a checkpoint folder" in capsys.readouterr().err
    assert not (out / "config.yaml").exists()  # refused before anything was written


def test_offline_without_lpips_weights_stops_before_training(run, monkeypatch, tmp_path, capsys):
    def unreachable(*args, **kwargs):
        raise AssertionError("training work started before the LPIPS check")

    monkeypatch.setattr(train.preflight, "load_splits", unreachable)
    monkeypatch.setattr(train.preflight, "build_vae", unreachable)
    _offline(monkeypatch, tmp_path)
    code, _ = run("--max_train_steps=1")
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and message.startswith("error: cannot obtain the ImageNet vgg backbone")
    assert "--lpips_weights" in message and "LPIPS_WEIGHTS" in message and "checkpoints" in message


@pytest.mark.slow
def test_trains_on_parquet_and_image_folder(run, shared):
    code, out = run(
        f"--train_data_dir={shared / 'data' / 'cifar10' / 'train.parquet'}",
        "--max_train_steps=2",
        "--num_validation_images=8",
        "--validation_steps=0",
        "--checkpointing_steps=0",
    )
    assert code == 0 and _metrics(out)["step"] == 2 and "8 images held out" in _metrics(out)["data"]
    code, out = run(
        f"--train_data_dir={shared / 'data' / 'cbsd68'}",
        "--max_train_steps=2",
        "--resolution=64",
        "--num_validation_images=4",
        "--validation_steps=0",
        "--checkpointing_steps=0",
    )
    assert code == 0 and _metrics(out)["n_images"] == 4 and _metrics(out)["resolution"] == 64
    # the export says what it was trained at (enable_tiling()'s tile size); a fine-tune at a lower resolution
    # keeps the pretrained model's own, larger value
    assert AutoencoderKL.load_config(out / "vae")["sample_size"] == 64
    reset_accelerate()
    finetuned = out.parent / "finetuned"
    argv = ["--config=tiny", f"--pretrained_model_name_or_path={out / 'vae'}", "--resolution=32", "--max_train_steps=1"]
    assert trainer.main([*argv, "--validation_steps=0", "--checkpointing_steps=0", f"--output_dir={finetuned}"]) == 0
    assert AutoencoderKL.load_config(finetuned / "vae")["sample_size"] == 64


def test_unwritable_output_dir_fails_at_start_up(run, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    reset_accelerate()
    assert trainer.main(["--config=tiny", f"--output_dir={blocker / 'out'}"]) == 2
    assert "is not writable" in capsys.readouterr().err


@pytest.mark.slow
def test_reported_lpips_is_the_alexnet_metric_of_the_exported_model(run, lpips_dir):
    """metrics.json's lpips is LPIPS-AlexNet on the held-out images, recomputable from the export."""
    from autoencoder.lpips_weights import build_lpips
    from eval.metrics import reconstruction_metrics

    code, out = run("--max_train_steps=2", "--validation_steps=0", "--checkpointing_steps=0")
    metrics = _metrics(out)
    vae = AutoencoderKL.from_pretrained(out / "vae")
    splits = load_splits(DataConfig(resolution=32, num_validation_images=8))
    ds = ImageDataset(splits.validation, "image", eval_transform(32))
    x = torch.stack([ds[i]["pixel_values"] for i in range(len(ds))])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the in-process run validated
    vae, x = vae.to(device), x.to(device)
    with torch.no_grad():
        recon = vae(x, sample_posterior=False).sample
    again = reconstruction_metrics(recon, x, build_lpips("alex", str(lpips_dir)).to(device))
    rel = 1e-5 if device.type == "cpu" else 1e-4  # cuDNN picks its kernels per batch and layout: not bit-stable
    for key in ("psnr", "ssim", "lpips"):
        assert metrics[key] == pytest.approx(again[key].mean().item(), rel=rel), key


def test_validation_warns_when_a_latent_channel_collapses(run, monkeypatch, caplog):
    real_build = train.preflight.build_vae

    def collapsed(cfg):  # channels 1 and 3 of the posterior mean no longer depend on the image
        vae = real_build(cfg)
        with torch.no_grad():
            vae.quant_conv.weight[1].zero_()
            vae.quant_conv.weight[3].zero_()
        return vae

    monkeypatch.setattr(train.preflight, "build_vae", collapsed)
    with caplog.at_level(logging.WARNING):
        code, out = run("--max_train_steps=1", "--validation_steps=0", "--checkpointing_steps=0")
    assert code == 0
    warnings = [r.getMessage() for r in caplog.records if "posterior collapse" in r.getMessage()]
    assert warnings and "step 0" in warnings[0] and "channel(s) [1, 3] of 4" in warnings[0]
