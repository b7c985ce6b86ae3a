"""Model presets, losses and data for training diffusers ``AutoencoderKL`` VAEs."""

from .config import Config, DataConfig, LossConfig, ModelConfig, TrainConfig, parse_config
from .losses import VAELoss, beta_at, kl_loss
from .models import PRESETS, VAEForTraining, build_vae

__all__ = [
    "Config",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "TrainConfig",
    "parse_config",
    "VAELoss",
    "beta_at",
    "kl_loss",
    "PRESETS",
    "VAEForTraining",
    "build_vae",
]
