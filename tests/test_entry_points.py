"""Every package runs as ``python -m pkg`` with ``main(argv=None)``; the eval runner scores real models."""

import json
import subprocess
import sys

import pytest
from conftest import REPO

from autoencoder.config import ModelConfig
from autoencoder.models import build_vae


def _python_m(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.mark.parametrize("package", ["train", "train.sweep", "eval", "diffusion_bridge"])
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
