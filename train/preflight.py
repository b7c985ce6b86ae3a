"""What a run checks before any work, cheapest first, and the parts it builds meanwhile (``preflight``).

Nothing here holds a collective, so every rank reaches the agreement that follows whatever failed;
nothing here writes, so a refused run leaves its output folder as it was.
"""

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import AutoencoderKL
from huggingface_hub import get_token

from autoencoder.config import Config, to_dict
from autoencoder.data import (
    ImageDataset,
    StreamingImageDataset,
    check_data_source,
    check_enough_images,
    data_flag,
    eval_transform,
    load_splits,
    train_transform,
)
from autoencoder.equivariance import valid_scales
from autoencoder.errors import UsageError
from autoencoder.losses import VAELoss, build_discriminator
from autoencoder.lpips_weights import build_lpips
from autoencoder.models import build_vae, check_resolution, count_parameters, downsampling_factor

from . import checkpoints

logger = get_logger(__name__)


@dataclass
class Data:
    """The run's datasets as built (their loaders are the run's own)."""

    splits: Any  # autoencoder.data.ImageSplits: where the images come from (its description is logged)
    train: torch.utils.data.Dataset  # map-style, or a stream sharded per rank
    validation: ImageDataset
    streaming: bool


@dataclass
class Parts:
    """What ``preflight`` built before any collective; ``assemble`` prepares the models and keeps the rest."""

    loss_fn: VAELoss
    val_lpips: torch.nn.Module
    vae: AutoencoderKL
    factor: int  # the VAE's spatial downsampling
    disc: torch.nn.Module | None
    data: Data
    resume_from: Path | None  # the verified checkpoint to resume from (resolve_resume)
    equivariance_scales: list[int]  # the --equivariance_scales valid at this resolution (autoencoder.equivariance)


def preflight(cfg: Config, accelerator: Accelerator) -> Parts:
    """Check everything bad input can break and build the run's parts, before any collective or training.

    Contains no collective, so every rank reaches the agreement whatever failed.  Order: cheapest
    first, so a mistake costs seconds.  Writes nothing: a refused run leaves the output folder as it was.
    """
    t = cfg.train
    out = Path(t.output_dir)
    if accelerator.is_main_process and t.push_to_hub and get_token() is None:  # fail now, not after hours
        raise UsageError("push_to_hub needs a Hugging Face token", "set HF_TOKEN or run `hf auth login`")
    resume_from = resolve_resume(cfg)  # a mistyped or damaged --resume_from_checkpoint fails now
    check_data_source(cfg.data)
    # LPIPS first: missing backbone weights must stop the run before any data or model work.
    loss_fn = VAELoss(cfg.loss)
    reuse = loss_fn.lpips is not None and cfg.loss.lpips_net == t.val_lpips_net
    val_lpips = loss_fn.lpips if reuse else build_lpips(t.val_lpips_net, cfg.loss.lpips_weights)
    vae = build_vae(cfg.model)
    factor = downsampling_factor(vae)
    check_resolution(cfg.data.resolution, factor)
    disc = build_discriminator(cfg.loss)
    scales = equivariance_scales(cfg, factor)
    if resume_from is not None:
        check_same_architecture(cfg, vae, resume_from)
    if accelerator.is_main_process:
        check_disk_space(out, count_parameters(vae) + (count_parameters(disc) if disc is not None else 0), cfg)
    data = build_datasets(cfg, accelerator, load_splits(cfg.data, seed=t.seed))
    return Parts(loss_fn, val_lpips, vae, factor, disc, data, resume_from, scales)


def equivariance_scales(cfg: Config, factor: int) -> list[int]:
    """The --equivariance_scales usable at this resolution; none usable with the term on is an error."""
    res, loss = cfg.data.resolution, cfg.loss
    valid = valid_scales(loss.equivariance_scales, res // factor, res, lpips=loss.lpips_weight > 0)
    if loss.equivariance_weight > 0 and not valid:
        raise UsageError(
            f"none of --equivariance_scales {loss.equivariance_scales} fits {res} px with {factor}x downsampling "
            f"(a scale must divide the {res // factor}-position latent, leave it >= 2x2 and, with LPIPS, the image "
            ">= 16 px)",
            "give smaller scales (e.g. --equivariance_scales=2) or a higher --resolution",
        )
    return valid


def build_datasets(cfg: Config, accelerator: Accelerator, splits) -> Data:
    """The training set (map-style, or a stream sharded per rank) and the validation set, checked for size."""
    t = cfg.train
    transform = train_transform(cfg.data, splits.embedded)
    streaming = isinstance(splits.train, datasets.IterableDataset)
    flag = data_flag(cfg.data.dataset_name, cfg.data.train_data_dir)
    if streaming:  # sharded per rank here, so the loader is not prepared (no accelerate re-sharding)
        train_ds = StreamingImageDataset(
            splits.train,
            splits.image_column,
            transform,
            t.seed,
            accelerator.process_index,
            accelerator.num_processes,
            cfg.data.shuffle_buffer,
        )
    else:
        # the embedded default crops 11 photographs ~700 times an epoch: decode each once per process
        train_ds = ImageDataset(
            splits.train, splits.image_column, transform, seed=t.seed, cache_decoded=splits.embedded
        )
        check_enough_images(train_ds, t.train_batch_size * accelerator.num_processes, "training", flag)
    val_ds = ImageDataset(splits.validation, splits.image_column, eval_transform(cfg.data.resolution))
    check_enough_images(
        val_ds, 1, "validation", flag, need="{n} image", fix="add images or choose another --validation_split"
    )
    return Data(splits, train_ds, val_ds, streaming)


def resolve_resume(cfg: Config) -> Path | None:
    """The checkpoint to resume from: 'latest' (the newest intact one; None if none yet) or an intact folder."""
    value = cfg.train.resume_from_checkpoint
    if not value:
        return None
    if value == "latest":
        return checkpoints.latest_checkpoint(Path(cfg.train.output_dir) / "checkpoints")
    path = Path(value)
    if not path.is_dir():
        raise UsageError(
            f"--resume_from_checkpoint {value!r} is not a checkpoint folder",
            "give a folder under OUTPUT_DIR/checkpoints, or 'latest'",
        )
    checkpoints.check_intact(path)
    return path


# What fixes the shapes of the saved state: the VAE's architecture (its diffusers config), the
# discriminator's, and which optional states exist (EMA shadow, learned log-variance).
ARCHITECTURE = (
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "latent_channels",
    "norm_num_groups",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
)
STATE_KEYS = (
    "model.train_decoder_only",  # the optimizer's parameter list
    "loss.disc_enabled",
    "loss.disc_num_layers",
    "loss.disc_channels",
    "loss.learn_logvar",
    "train.use_ema",
)


def check_same_architecture(cfg: Config, vae: AutoencoderKL, path: Path) -> None:
    """Refuse, before any work, to resume a checkpoint whose model or saved states this run cannot load."""
    saved_vae = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    saved = path / "training_config.yaml"
    saved_run = dotted(yaml.safe_load(saved.read_text()) or {}) if saved.is_file() else {}
    differ = [
        f"{k} {saved_vae[k]} -> {vae.config[k]}"
        for k in ARCHITECTURE
        if k in saved_vae and _plain(saved_vae[k]) != _plain(vae.config[k])
    ]
    now = dotted(to_dict(cfg))
    differ += [f"{k} {saved_run[k]} -> {now[k]}" for k in STATE_KEYS if k in saved_run and saved_run[k] != now[k]]
    if differ:
        raise UsageError(
            f"--resume_from_checkpoint {str(path)!r} holds another architecture than this run ({'; '.join(differ)})",
            f"resume with the run's own config (--config {Path(cfg.train.output_dir) / 'config.yaml'}), or start a "
            f"new --output_dir with --pretrained_model_name_or_path {path} to begin from its weights",
        )


def _plain(value: Any) -> Any:
    """Lists for tuples (a diffusers config holds tuples, its JSON lists)."""
    return list(value) if isinstance(value, (list, tuple)) else value


def dotted(config: dict) -> dict:
    """{'section.key': value} of a nested config dict."""
    return {f"{section}.{k}": v for section, values in config.items() for k, v in (values or {}).items()}


def check_disk_space(path: Path, n_params: int, cfg: Config) -> None:
    """Stop at start-up if one checkpoint cannot fit; warn if the kept checkpoints will not."""
    t = cfg.train
    # fp32 weights + two AdamW moments (+ EMA copy); the exported model is one more copy.
    ckpt = n_params * 4 * (3 + int(t.use_ema))
    free = shutil.disk_usage(path).free
    if free < ckpt + n_params * 4:
        raise UsageError(
            f"only {free / 1e9:.2f} GB free under {str(path)!r}, but one checkpoint plus the export needs "
            f"~{(ckpt + n_params * 4) / 1e9:.2f} GB",
            "free space or choose another --output_dir",
        )
    every = math.ceil(t.max_train_steps / t.checkpointing_steps) if t.checkpointing_steps else 0
    kept = t.checkpoints_total_limit or every
    if free < (kept + 1) * ckpt + n_params * 4:
        logger.warning(
            f"{free / 1e9:.2f} GB free under {path}; {kept} checkpoints need ~{kept * ckpt / 1e9:.2f} GB: "
            "lower --checkpoints_total_limit or free space"
        )
