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


# what each --help must say: an option of its own with its help text
HELP = {
    "train": ["--kl_weight  [loss] float = 1e-06", "beta, as in latent-diffusion", "--resume_from_checkpoint"],
    "train.sweep": ["--kl_weight 1e-7,1e-6,1e-5,1e-4", "--sweep_dir", "rate_distortion.png"],
    "eval": ["--model  list of str (required), repeatable", "--fd  list of 'vgg16' = [], repeatable", "rFID"],
    "diffusion_bridge": ["stats  latent statistics over a dataset", "encode", "publish", "COMMAND --help"],
    "diffusion_bridge stats": ["--write  bool = False", "--convention  'sd' | 'sd3' | 'sdxl' = 'sd3'"],
}


@pytest.mark.parametrize("command", list(HELP))
def test_python_m_help_lists_the_commands_options(command):
    result = _python_m(*command.split(), "--help")
    assert result.returncode == 0, result.stderr
    missing = [text for text in HELP[command] if text not in result.stdout]
    assert not missing, (missing, result.stdout[:2000])


def test_presets_table():
    result = _python_m("autoencoder")
    assert result.returncode == 0, result.stderr
    assert "| sd-f8c4 | 83,653,863 | 8 | 4 | yes |" in result.stdout
    assert "| f8c16 |" in result.stdout and "| 16 | no |" in result.stdout


def test_bridge_info(tmp_path):
    """``info`` prints the saved config's latent facts: a 4x, 3-channel VAE with its own scaling and shift."""
    vae = build_vae(ModelConfig(preset="tiny", latent_channels=3, block_out_channels=[4, 8, 8]))
    vae.register_to_config(scaling_factor=0.37, shift_factor=-0.12, force_upcast=False)
    vae.save_pretrained(tmp_path / "vae")
    result = _python_m("diffusion_bridge", "info", "--model", str(tmp_path / "vae"))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["latent_channels"], info["downsampling_factor"]) == (3, 4)
    assert (info["scaling_factor"], info["shift_factor"], info["force_upcast"]) == (0.37, -0.12, False)
    assert info["parameters"] == sum(p.numel() for p in vae.parameters())
