"""Every package runs as ``python -m pkg`` with ``main(argv=None)``; the eval runner scores real models."""

import json
import subprocess
import sys

import numpy as np
import pytest
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from autoencoder.config import ModelConfig
from autoencoder.models import build_vae
from conftest import REPO


def _python_m(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.mark.parametrize("package", ["train", "eval", "diffusion_bridge"])
def test_python_m_help(package):
    result = _python_m(package, "--help")
    assert result.returncode == 0, result.stderr
    assert "--" in result.stdout


def test_presets_table():
    result = _python_m("autoencoder")
    assert result.returncode == 0, result.stderr
    assert "| sd-f8c4 | 83,653,863 | 8 | 4 | yes |" in result.stdout
    assert "| f8c16 |" in result.stdout and "| 16 | no |" in result.stdout


def test_bridge_info(tmp_path):
    build_vae(ModelConfig(preset="tiny")).save_pretrained(tmp_path / "vae")
    result = _python_m("diffusion_bridge", "info", "--model", str(tmp_path / "vae"))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["latent_channels"] == 4 and info["downsampling_factor"] == 2 and info["scaling_factor"] == 1.0


def test_eval_runner_scores_two_models_on_the_same_images(tmp_path, lpips_dir):
    import torch

    from eval.runner import main

    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        build_vae(ModelConfig(preset="tiny")).save_pretrained(tmp_path / name)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    code = main([
        "--model", str(tmp_path / "a"), "--model", str(tmp_path / "b"), "--train_data_dir", str(tmp_path / "imgs"),
        "--resolution", "32", "--batch_size", "2", "--lpips_weights", str(lpips_dir), "--output_dir", str(tmp_path / "out"),
    ])  # fmt: skip
    assert code == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    a, b = (metrics["models"][str(tmp_path / n)] for n in ("a", "b"))
    assert a["n_images"] == b["n_images"] == 5  # odd count: the padded last batch is not double-counted
    assert a["psnr"] != b["psnr"] and all(0 < m["ssim"] < 1 and m["lpips"] > 0 for m in (a, b))
