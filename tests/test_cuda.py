"""The CUDA lane: the real commands on a GPU (``python -m pytest -m cuda``).

Skipped, with the reason, where ``torch.cuda.is_available()`` is false (conftest.py); never passed
without running.  Each test runs the same code paths a user's ``python -m train|eval|diffusion_bridge``
runs, on the GPU the process sees.
"""

import json
import os
import shutil

import pytest
import torch
from conftest import _metrics, _nan_at, _run_inprocess, reset_accelerate, stopped_at
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from diffusion_bridge.cli import main as bridge_main
from eval.runner import main as eval_main

pytestmark = [pytest.mark.cuda, pytest.mark.slow]


def _reset() -> None:
    reset_accelerate()


def _assert_trained_on_gpu(out) -> dict:
    m = _metrics(out)
    assert "CPU" not in m["hardware"], m["hardware"]  # torch.cuda.get_device_name, not the CPU fallback
    for key in ("psnr", "ssim", "lpips"):  # the headline figures are the final validation's
        assert m[key] == m["val"][f"val/{key}"], (key, m[key])
    vae = AutoencoderKL.from_pretrained(out / "vae")
    assert all(p.dtype == torch.float32 for p in vae.parameters())
    assert vae.config.scaling_factor != 1.0 and (out / "vae" / "latent_stats.json").is_file()
    return m


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_run_exports_a_loadable_fp32_vae(tmp_path, lpips_dir, monkeypatch, precision):
    out = tmp_path / precision
    assert (
        _run_inprocess(
            out,
            lpips_dir,
            monkeypatch,
            f"--mixed_precision={precision}",
            "--max_train_steps=20",
            "--checkpointing_steps=10",
            "--validation_steps=10",
            "--validate_at_start=true",
        )
        == 0
    )
    m = _assert_trained_on_gpu(out)
    assert m["mixed_precision"] == precision and m["psnr"] > m["initial"]["psnr"]
    ckpt = load_file(out / "checkpoints" / "checkpoint-20" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in ckpt.values())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_equivariance_term_under_mixed_precision_compile_and_the_gan(tmp_path, lpips_dir, monkeypatch, precision):
    """The scale-equivariance regulariser on a GPU: fp16/bf16 autocast, --compile, the GAN; finite and trained."""
    out = tmp_path / precision
    flags = (f"--mixed_precision={precision}", "--compile", "--disc_enabled=true", "--disc_start=0")
    eq = ("--equivariance_weight=0.5", "--equivariance_scales=2", "--equivariance_rotate", "--max_train_steps=10")
    assert _run_inprocess(out, lpips_dir, monkeypatch, *flags, *eq, "--validate_at_start=true") == 0
    m = _assert_trained_on_gpu(out)
    assert m["nonfinite_steps"] == 0 and m["psnr"] > m["initial"]["psnr"]


def test_gan_ema_workers_resume_matches_uninterrupted_run(tmp_path, lpips_dir, monkeypatch):
    """GAN from step 0, EMA, 2 loader workers, bf16; resumed at step 2 vs uninterrupted to step 4.

    cuDNN is made deterministic here; the tolerance (5e-4 absolute on weights of order 0.1) covers
    the remaining atomics-order differences.
    """
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    args = [
        "--disc_enabled",
        "--disc_start=0",
        "--use_ema",
        "--dataloader_num_workers=2",
        "--mixed_precision=bf16",
        "--max_train_steps=4",
        "--checkpointing_steps=2",
        "--checkpoints_total_limit=5",
    ]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert _run_inprocess(full, lpips_dir, monkeypatch, *args) == 0
    _assert_trained_on_gpu(full)
    stopped_at(full, 2, resumed)
    # the first step after the resume used to die in EMAModel.step (shadow parameters left on the CPU)
    assert _run_inprocess(resumed, lpips_dir, monkeypatch, *args, "--resume_from_checkpoint=latest") == 0
    for name in ("model.safetensors", "model_1.safetensors"):
        a, b = (load_file(d / "checkpoints" / "checkpoint-4" / name) for d in (full, resumed))
        worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        assert worst < 5e-4, (name, worst)
    ea, eb = (load_file(d / "vae" / "diffusion_pytorch_model.safetensors") for d in (full, resumed))  # EMA export
    assert max((ea[k] - eb[k]).abs().max().item() for k in ea) < 5e-4


def test_fp16_non_finite_loss_is_skipped_then_counted_to_a_stop(tmp_path, lpips_dir, monkeypatch, capsys):
    out = tmp_path / "nan"
    _nan_at({1}, monkeypatch)
    assert (
        _run_inprocess(
            out,
            lpips_dir,
            monkeypatch,
            "--mixed_precision=fp16",
            "--max_train_steps=3",
            "--checkpointing_steps=1",
            "--checkpoints_total_limit=5",
        )
        == 0
    )
    assert _metrics(out)["nonfinite_steps"] == 1
    w1, w2 = (load_file(out / "checkpoints" / f"checkpoint-{i}" / "model.safetensors") for i in (1, 2))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # the skipped step changed nothing (and never unscaled twice)
    _nan_at(set(range(2, 100)), monkeypatch)
    assert (
        _run_inprocess(
            tmp_path / "stop",
            lpips_dir,
            monkeypatch,
            "--mixed_precision=fp16",
            "--max_train_steps=50",
            "--checkpointing_steps=2",
            "--max_consecutive_nonfinite=3",
        )
        == 2
    )
    assert "3 consecutive steps with a non-finite loss" in capsys.readouterr().err


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory, lpips_dir):
    """A short bf16 GPU run of the tiny preset: its export and its checkpoint."""
    mp = pytest.MonkeyPatch()
    out = tmp_path_factory.mktemp("gpu") / "run"
    try:
        assert (
            _run_inprocess(
                out, lpips_dir, mp, "--mixed_precision=bf16", "--max_train_steps=4", "--checkpointing_steps=2"
            )
            == 0
        )
    finally:
        mp.undo()
    return out


def test_eval_two_models_on_the_gpu_with_a_real_tiling_check(gpu_model, shared, tmp_path, capsys):
    """Both models evaluated on the GPU (throughput after an untimed warm-up: benchmarks/eval_speed.py)."""
    _reset()
    out = tmp_path / "eval"
    assert (
        eval_main(
            [
                "--model",
                str(gpu_model / "vae"),
                "--model",
                str(gpu_model / "checkpoints" / "checkpoint-2"),
                "--train_data_dir",
                str(shared / "data" / "cbsd68"),
                "--num_images",
                "8",
                "--resolution",
                "64",
                "--batch_size",
                "4",
                "--no_fid",
                "--output_dir",
                str(out),
            ]
        )
        == 0
    )
    models = json.loads((out / "metrics.json").read_text())["models"]
    first, second = models.values()
    for m in (first, second):
        tiling = m["tiling"]
        assert tiling["tile_size"] < min(tiling["image_size"])  # the image was really cut into tiles
        assert m["peak_memory_kind"] == "cuda_max_allocated" and m["n_images"] == 8


def test_bridge_stats_encode_and_publish_dry_run_on_gpu(gpu_model, shared, tmp_path, capsys):
    model = tmp_path / "vae"
    shutil.copytree(gpu_model / "vae", model)
    data = ["--train_data_dir", str(shared / "data" / "cifar10" / "test.parquet"), "--resolution", "32"]
    _reset()
    assert bridge_main(["stats", "--model", str(model), *data, "--num_images", "32", "--write"]) == 0
    assert "wrote the sd3 convention" in capsys.readouterr().out
    _reset()
    assert (
        bridge_main(
            [
                "encode",
                "--model",
                str(model),
                *data,
                "--num_images",
                "16",
                "--shard_size",
                "8",
                "--output_dir",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "cache" / "data").glob("shard-*.parquet"))) == 2
    _reset()
    assert (
        bridge_main(
            [
                "publish",
                "--model",
                str(model),
                "--repo_id",
                "someone/vae",
                "--allow_missing_eval",
                "--dry_run",
                str(tmp_path / "repo"),
            ]
        )
        == 0
    )
    half = AutoencoderKL.from_pretrained(tmp_path / "repo", variant="fp16", torch_dtype=torch.float16)
    full = AutoencoderKL.from_pretrained(tmp_path / "repo")  # the fp16 variant is the fp32 weights, rounded
    pairs = zip(half.state_dict().values(), full.state_dict().values())
    assert all(h.dtype == torch.float16 and torch.equal(h, f.half()) for h, f in pairs)


@pytest.mark.cuda
def test_real_cuda_out_of_memory_is_exit_3_with_the_batch_and_remedies(tmp_path, lpips_dir):
    """A batch no GPU holds (sd-f8c4, 64 x 1024 px): one line, exit 3, no traceback."""
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "LPIPS_WEIGHTS": str(lpips_dir), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "--config=sd-f8c4",
            "--resolution=1024",
            "--train_batch_size=64",
            "--max_train_steps=2",
            "--validate_at_start=false",
            f"--output_dir={tmp_path / 'oom'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(errors) == 1
    assert errors[0].startswith("error: out of memory at step 1 on cuda") and "--train_batch_size 64" in errors[0]
    assert "--gradient_checkpointing" in errors[0]


def test_seeded_augmentation_leaves_the_cuda_generator_alone():
    """Loading in the training process (0 workers) must not reseed the generator posterior noise comes from."""
    from autoencoder.config import DataConfig
    from autoencoder.data import ImageDataset, load_splits, train_transform

    cfg = DataConfig(resolution=32)
    splits = load_splits(cfg, seed=0)
    ds = ImageDataset(splits.train, splits.image_column, train_transform(cfg, splits.embedded), seed=0)
    torch.cuda.manual_seed(1234)
    torch.randn(4, device="cuda")  # advance it: a reseed would show as a different state
    before = torch.cuda.get_rng_state()
    ds[0], ds[1]
    assert torch.equal(torch.cuda.get_rng_state(), before)
