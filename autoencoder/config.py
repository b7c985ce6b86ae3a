"""Typed run configuration: one dataclass per concern, a YAML file, and ``--key=value`` overrides.

Resolution order: dataclass defaults < YAML file (``--config``) < command line.  Every key is
checked: an unknown key or a value of the wrong type is a ``ValueError`` naming the key, the
expected type and the fix.  Keys are unique across sections, so ``--resolution=128`` and
``--data.resolution=128`` are the same override.
"""

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import UsageError

# configs/ beside the packages (editable install / source checkout).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "cpu-small.yaml"


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line help text (shown by ``--help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    preset: str = opt("cpu-small", "architecture preset: tiny, cpu-small, sd-f8c4 or f8c16 (autoencoder/models.py)")
    latent_channels: int | None = opt(None, "override the preset's latent channels")
    block_out_channels: list[int] | None = opt(None, "override the preset's block widths (one per resolution level)")
    layers_per_block: int | None = opt(None, "override the preset's ResNet layers per block")
    pretrained_model_name_or_path: str | None = opt(
        None,
        "initialise from a diffusers AutoencoderKL (local folder or Hub id), or the trained weights of a "
        "training checkpoint folder, instead of the preset",
    )
    pretrained_subfolder: str | None = opt(None, "subfolder of the pretrained repo, e.g. 'vae' for a pipeline repo")
    revision: str | None = opt(None, "Hub revision of the pretrained model")
    train_decoder_only: bool = opt(
        False, "freeze encoder + quant_conv and train the decoder only (sd-vae-ft-mse style)"
    )
    gradient_checkpointing: bool = opt(False, "trade compute for memory on large images")


@dataclass
class LossConfig:
    rec_loss: Literal["l1", "l2"] = opt("l1", "pixel reconstruction loss, per pixel value (latent-diffusion: l1)")
    rec_weight: float = opt(1.0, "weight of the pixel reconstruction loss")
    lpips_weight: float = opt(0.5, "weight of the LPIPS perceptual loss (0 disables it)")
    lpips_net: Literal["vgg", "alex"] = opt("vgg", "LPIPS backbone used for training")
    lpips_weights: str | None = opt(
        None,
        "torchvision-format backbone weights for LPIPS (a .pth file or a folder holding one); "
        "falls back to $LPIPS_WEIGHTS, then torchvision's cache/download",
    )
    kl_weight: float = opt(
        1e-6,
        "beta, as in latent-diffusion and diffusers' example: sum(NLL)/batch + beta * sum(KL)/batch, "
        "the same at every resolution (autoencoder/losses.py)",
    )
    kl_schedule: Literal["constant", "linear", "cyclical"] = opt("constant", "beta schedule over optimizer steps")
    kl_warmup_steps: int = opt(0, "linear: steps to ramp beta from 0 to kl_weight")
    kl_cycle_steps: int = opt(1000, "cyclical: length of one cycle in steps (Fu et al. 2019)")
    kl_cycle_ratio: float = opt(0.5, "cyclical: fraction of each cycle spent ramping up, the rest at kl_weight")
    free_bits: float = opt(0.0, "minimum KL per latent element (nats), applied per latent channel; 0 disables")
    learn_logvar: bool = opt(False, "latent-diffusion NLL: rec / exp(logvar) + logvar with a learned scalar logvar")
    logvar_init: float = opt(0.0, "initial value of the learned log-variance")
    disc_enabled: bool = opt(False, "add a PatchGAN discriminator (adversarial loss)")
    disc_start: int = opt(0, "optimizer step at which the adversarial loss switches on")
    disc_weight: float = opt(0.5, "weight of the adversarial term (times the adaptive weight)")
    disc_factor: float = opt(1.0, "latent-diffusion's disc_factor: multiplies both GAN losses from disc_start on")
    disc_adaptive_weight: bool = opt(
        True, "scale the GAN term by ||grad rec|| / ||grad gan|| at the decoder's last layer"
    )
    disc_loss: Literal["hinge", "vanilla"] = opt("hinge", "discriminator loss")
    disc_num_layers: int = opt(3, "PatchGAN depth (3 gives a 70x70 receptive field)")
    disc_channels: int = opt(64, "PatchGAN width of the first layer")
    equivariance_weight: float = opt(
        0.0,
        "alpha of the scale-equivariance term alpha * rec(down_s x, D(down_s z)) (Skorokhodov et al. 2025); "
        "0 = off, nothing extra computed",
    )
    equivariance_scales: list[int] = opt(
        [2, 4], "downsampling factors s; each step draws one of those valid at the run's resolution"
    )
    equivariance_prob: float = opt(1.0, "fraction of steps the equivariance term applies to (EQ-VAE: 0.5)")
    equivariance_rotate: bool = opt(False, "EQ-VAE's random rot90 of the downsampled latent and image")


@dataclass
class DataConfig:
    dataset_name: str | None = opt(None, "Hub dataset id (or a local dataset script/folder) for datasets.load_dataset")
    dataset_config_name: str | None = opt(None, "config name of the Hub dataset")
    train_data_dir: str | None = opt(
        None, "local image folder, parquet file(s) or folder of them; neither this nor dataset_name = embedded photos"
    )
    image_column: str = opt("image", "column holding the images")
    validation_split: str | None = opt(
        None, "split used for validation; default: 'validation' or 'test' if present, else held out from train"
    )
    num_validation_images: int = opt(
        64, "validation images: N spread over the validation split, else N held out of train (at most 10%)"
    )
    max_train_samples: int | None = opt(None, "keep N training images, spread evenly over the split (debugging)")
    resolution: int = opt(64, "training resolution (square crops, pixels)")
    train_crop: Literal["auto", "random", "center", "multiscale"] = opt(
        "auto",
        "train crop after resizing the shorter side: random, center, or multiscale (shorter side "
        "resized to a random multiple of the resolution first); auto = multiscale for the embedded photos, "
        "random otherwise",
    )
    multiscale_min: float = opt(2.0, "multiscale: smallest shorter side, as a multiple of the resolution")
    multiscale_max: float = opt(6.0, "multiscale: largest shorter side, as a multiple of the resolution")
    random_flip: bool = opt(True, "random horizontal flips during training")
    dataloader_num_workers: int | Literal["auto"] = opt(
        "auto",
        "DataLoader worker processes; auto = 0 on CPU (the main process's cores are the compute), on a "
        "GPU min(8, CPU cores per process - 1) so decoding never starves it; 0 = load in the main process",
    )
    cache_dir: str | None = opt(None, "datasets cache directory")
    streaming: bool = opt(
        False, "stream the dataset (datasets IterableDataset, sharded per rank) instead of downloading it"
    )
    shuffle_buffer: int = opt(1000, "streaming: shuffle buffer size (examples)")


@dataclass
class TrainConfig:
    output_dir: str = opt("outputs/vae", "where checkpoints, logs, samples and the exported VAE go")
    seed: int = opt(0, "global seed (model init, data order, crops, posterior samples)")
    max_train_steps: int = opt(300, "optimizer steps to train")
    train_batch_size: int = opt(8, "batch size per device")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    learning_rate: float = opt(2e-4, "peak learning rate of the VAE")
    scale_lr: bool = opt(False, "multiply learning_rate by batch size x accumulation x processes")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = opt("cosine", "diffusers.optimization.get_scheduler name")
    lr_warmup_steps: int = opt(20, "linear LR warm-up steps")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_weight_decay: float = opt(0.0, "AdamW weight decay")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 disables)")
    disc_learning_rate: float | None = opt(None, "discriminator learning rate (default: learning_rate)")
    mixed_precision: Literal["no", "fp16", "bf16"] = opt("no", "autocast precision; master weights stay fp32")
    allow_tf32: bool = opt(True, "TF32 tensor cores for fp32 matmuls and convolutions on NVIDIA GPUs (off: exact fp32)")
    compile: bool = opt(
        False,
        "torch.compile the VAE block by block (not LPIPS; the decoder's last layer stays eager "
        "for the GAN weight): it compiles during the first steps; its gain on GPUs is not measured "
        "yet (README 'Speed')",
    )
    checkpointing_steps: int = opt(500, "save a resumable checkpoint every N steps (0 disables)")
    checkpoints_total_limit: int | None = opt(3, "keep at most this many checkpoints (None keeps all)")
    resume_from_checkpoint: str | None = opt(None, "'latest' or a checkpoint folder to resume from")
    validation_steps: int = opt(100, "validate (PSNR/SSIM/LPIPS + grid) every N steps (0: only at the end)")
    validation_batch_size: int = opt(16, "batch size per device for validation")
    validate_at_start: bool = opt(True, "also validate the untrained model at step 0 (the baseline figure)")
    val_lpips_net: Literal["alex", "vgg"] = opt(
        "alex", "LPIPS backbone for the validation metric (AlexNet, as published)"
    )
    num_grid_images: int = opt(8, "validation images shown in the reconstruction grid")
    report_to: Literal["tensorboard", "wandb", "all", "none"] = opt("tensorboard", "experiment tracker")
    logging_dir: str = opt("logs", "tracker folder, relative to output_dir")
    log_every: int = opt(10, "log training scalars every N steps")
    use_ema: bool = opt(False, "keep an EMA of the VAE weights (diffusers EMAModel) for validation and export")
    ema_decay: float = opt(0.999, "EMA decay (the maximum, with ema_warmup)")
    ema_warmup: bool = opt(True, "EMA decay warm-up 1 - (1 + step)^-2/3, capped at ema_decay")
    max_consecutive_nonfinite: int = opt(
        5, "stop after this many consecutive steps with a non-finite loss or gradient (each is skipped)"
    )
    push_to_hub: bool = opt(
        False,
        "at the end, publish the exported VAE (fp32 + fp16 variant, model card with the held-out metrics) "
        "to the Hub; the token (HF_TOKEN or `hf auth login`) is checked before training starts",
    )
    hub_model_id: str | None = opt(None, "USER/NAME repository for push_to_hub")
    hub_private: bool = opt(False, "create the push_to_hub repository as private")
    latent_stats: bool = opt(
        True,
        "at the end, measure latent statistics on the validation split and write the scaling of "
        "latent_convention into the exported config (all statistics in latent_stats.json)",
    )
    latent_convention: Literal["sd", "sd3", "sdxl"] = opt(
        "sd3",
        "keys latent_stats writes: sd = scaling_factor (z*s); sd3 = scaling_factor + shift_factor "
        "((z-shift)*s; SD/DiT pipelines ignore the shift, so it serves both); sdxl = per-channel "
        "latents_mean/latents_std with scaling_factor 1 ((z-mean_c)/std_c, StableDiffusionXLPipeline)",
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def _section_types() -> dict[str, type]:
    """Map section name -> its dataclass type."""
    return {f.name: f.type for f in dataclasses.fields(Config)}


def key_index() -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """Map every flat key to (section, field, resolved type); keys are unique across sections."""
    index: dict[str, tuple[str, dataclasses.Field, Any]] = {}
    for section, cls in _section_types().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.name not in index and f.name not in SECTIONS, f"duplicate config key {f.name}"
            index[f.name] = (section, f, hints[f.name])
    return index


def _type_name(tp: Any) -> str:
    """Human-readable name of a type annotation."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def check_value(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` (int -> float only), or raise a ValueError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_value(key, value, arg)
            except ValueError:
                pass
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            return [check_value(key, v, item_tp) for v in value]
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise AssertionError(f"unsupported config type {tp!r} for {key}")
    raise UsageError(
        f"config key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})",
        f"give --{key} a value of type {_type_name(tp)}",
    )


def parse_cli_value(key: str, text: str, tp: Any) -> Any:
    """Parse a command-line string for a key of type ``tp`` (YAML scalars/lists; strings stay verbatim)."""
    args = typing.get_args(tp)
    optional = type(None) in args
    if optional and text.lower() in ("none", "null", "~"):
        return None
    base = [a for a in args if a is not type(None)][0] if optional else tp
    if base is str or typing.get_origin(base) is Literal:
        return check_value(key, text, tp)
    if base is float:  # YAML 1.1 reads '3e-4' as a string; Python's float() does not
        try:
            return float(text)
        except ValueError:
            raise UsageError(f"config key '{key}' expects float, got {text!r}", f"write e.g. --{key}=1e-4") from None
    if typing.get_origin(base) is list and not text.strip().startswith("["):
        text = f"[{text}]"  # --equivariance_scales=2,4 as well as [2, 4]
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(
            f"config key '{key}': cannot parse {text!r} ({str(exc).splitlines()[0]})",
            f"give --{key} a YAML value of type {_type_name(tp)}",
        ) from None
    return check_value(key, value, tp)


def _unknown_key_error(key: str, where: str) -> UsageError:
    """A ValueError for an unknown key, suggesting close matches."""
    import difflib

    close = difflib.get_close_matches(key, list(key_index()), n=3)
    hint = f"did you mean: {', '.join(close)}?" if close else "run with --help for the list of keys"
    return UsageError(f"unknown config key '{key}' in {where}", hint)


def apply_mapping(cfg: Config, mapping: dict, where: str) -> None:
    """Apply a YAML-style mapping ({section: {key: value}} or flat {key: value}) onto ``cfg``."""
    index = key_index()
    if not isinstance(mapping, dict):
        raise UsageError(
            f"{where}: expected a mapping of config sections, got {type(mapping).__name__}",
            "write sections model/loss/data/train of key: value lines (see configs/)",
        )
    for name, value in mapping.items():
        if name in SECTIONS:
            if not isinstance(value, dict):
                raise UsageError(
                    f"{where}: section '{name}' must be a mapping, got {value!r}", "indent key: value lines under it"
                )
            for key, sub in value.items():
                if key not in index or index[key][0] != name:
                    raise _unknown_key_error(f"{name}.{key}", where)
                setattr(getattr(cfg, name), key, check_value(key, sub, index[key][2]))
        elif name in index:
            section, _, tp = index[name]
            setattr(getattr(cfg, section), name, check_value(name, value, tp))
        else:
            raise _unknown_key_error(str(name), where)


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML config file, with a clear error if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        presets = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise UsageError(f"config file {str(path)!r} not found", f"give a path, or a preset name: {presets}")
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(
            f"config file {where}: not valid YAML ("
            + (f"{exc.context}: {problem}" if getattr(exc, "context", None) else problem)
            + ")",
            "fix the YAML at that place (sections model/loss/data/train, each a mapping of key: value)",
        ) from None
    if data is not None and not isinstance(data, dict):
        raise UsageError(
            f"config file {path}, line 1, column 1: a YAML {type(data).__name__}, not a mapping of sections",
            "write it as sections (model:, loss:, data:, train:), each a mapping of key: value",
        )
    return data or {}


def resolve_config_path(value: str) -> Path:
    """A config path, or a preset name such as 'tiny' meaning configs/tiny.yaml."""
    path = Path(value)
    if not path.exists() and not path.suffix and (CONFIG_DIR / f"{value}.yaml").exists():
        return CONFIG_DIR / f"{value}.yaml"
    return path


def split_argv(argv: list[str]) -> list[tuple[str, str | None]]:
    """Split ``--k=v``, ``--k v`` and bare ``--flag`` arguments into (key, text-or-None) pairs."""
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument {arg!r}", "options are written --key=value or --key value")
        body = arg[2:]
        if "=" in body:
            key, text = body.split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, text = body, argv[i + 1]
            i += 1
        else:
            key, text = body, None
        pairs.append((key.replace("-", "_") if key not in ("config",) else key, text))
        i += 1
    return pairs


def apply_overrides(cfg: Config, pairs: list[tuple[str, str | None]]) -> None:
    """Apply command-line (key, text) pairs onto ``cfg``; a bare flag means True for booleans."""
    index = key_index()
    for key, text in pairs:
        name = key.split(".", 1)[1] if key.split(".", 1)[0] in SECTIONS and "." in key else key
        if name not in index or ("." in key and index[name][0] != key.split(".", 1)[0]):
            raise _unknown_key_error(key, "the command line")
        section, _, tp = index[name]
        setattr(getattr(cfg, section), name, flag_value(name, text, tp, "config key"))


def flag_value(key: str, text: str | None, tp: Any, what: str) -> Any:
    """The value of ``--key[=text]`` for type ``tp``: a bare flag is True for booleans and an error otherwise."""
    if text is not None:
        return parse_cli_value(key, text, tp)
    if tp is not bool:
        raise UsageError(f"{what} '{key}' needs a value", f"write --{key}=<{_type_name(tp)}>")
    return True


def check_one_source(dataset_name: str | None, train_data_dir: str | None) -> None:
    """Refuse both data flags at once (train, eval and the bridge)."""
    if dataset_name and train_data_dir:
        raise UsageError("both --dataset_name and --train_data_dir are set", "give only one of them")


def validate(cfg: Config) -> None:
    """Cross-field checks that single-key type checks cannot catch."""
    check_one_source(cfg.data.dataset_name, cfg.data.train_data_dir)
    positive = {
        "max_train_steps": cfg.train.max_train_steps,
        "train_batch_size": cfg.train.train_batch_size,
        "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "resolution": cfg.data.resolution,
        "validation_batch_size": cfg.train.validation_batch_size,
    }
    for key, value in positive.items():
        if value < 1:
            raise UsageError(f"config key '{key}' must be >= 1, got {value}", f"set --{key} to 1 or more")
    index = key_index()
    nonnegative = ("learning_rate", "kl_weight", "lpips_weight", "rec_weight", "free_bits", "disc_weight")
    for key in (*nonnegative, "disc_factor", "equivariance_weight"):
        if getattr(getattr(cfg, index[key][0]), key) < 0:
            raise UsageError(f"config key '{key}' must be >= 0", f"set --{key} to 0 or more")
    workers = cfg.data.dataloader_num_workers
    if workers != "auto" and workers < 0:
        raise UsageError(
            f"config key 'dataloader_num_workers' must be >= 0 or auto, got {workers}",
            "set --dataloader_num_workers=auto (or 0 to load in the main process)",
        )
    if cfg.train.push_to_hub and not cfg.train.hub_model_id:
        raise UsageError("push_to_hub needs a repository id", "add --hub_model_id=USER/NAME")
    if cfg.train.hub_model_id:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(cfg.train.hub_model_id)
        except HFValidationError as exc:
            raise UsageError(
                f"--hub_model_id {cfg.train.hub_model_id!r} is not a Hub repository id ({str(exc).splitlines()[0]})",
                "write USER/NAME, e.g. --hub_model_id=me/my-vae",
            ) from None
    if cfg.train.push_to_hub and not cfg.train.latent_stats:
        raise UsageError(
            "push_to_hub publishes latent statistics, but latent_stats is false", "keep --latent_stats=true"
        )
    if cfg.train.mixed_precision == "fp16" and cfg.loss.disc_enabled and cfg.train.gradient_accumulation_steps > 1:
        raise UsageError(
            "mixed_precision=fp16 with disc_enabled and gradient_accumulation_steps > 1 is not supported: accelerate's "
            "single GradScaler changes its scale between the VAE and discriminator steps, so the discriminator's "
            "accumulated gradients would mix two scales; use --mixed_precision=bf16 or --gradient_accumulation_steps=1"
        )
    if cfg.loss.kl_schedule == "cyclical" and cfg.loss.kl_cycle_steps < 1:
        raise UsageError("kl_schedule=cyclical needs kl_cycle_steps >= 1", "set --kl_cycle_steps")
    if not 0.0 < cfg.loss.kl_cycle_ratio <= 1.0:
        raise UsageError(
            f"kl_cycle_ratio must be in (0, 1], got {cfg.loss.kl_cycle_ratio}", "set --kl_cycle_ratio in (0, 1]"
        )
    validate_equivariance(cfg.loss)
    if not 1.0 <= cfg.data.multiscale_min <= cfg.data.multiscale_max:
        raise UsageError(
            f"need 1 <= multiscale_min <= multiscale_max, got {cfg.data.multiscale_min}, {cfg.data.multiscale_max}",
            "set --multiscale_min and --multiscale_max in that order",
        )


def validate_equivariance(loss: LossConfig) -> None:
    """The equivariance flags: a probability, and integer downsampling factors of at least 2."""
    if not 0.0 <= loss.equivariance_prob <= 1.0:
        raise UsageError(
            f"equivariance_prob must be in [0, 1], got {loss.equivariance_prob}", "set --equivariance_prob in [0, 1]"
        )
    if not loss.equivariance_scales or any(s < 2 for s in loss.equivariance_scales):
        raise UsageError(
            f"equivariance_scales must be downsampling factors >= 2, got {loss.equivariance_scales}",
            "e.g. --equivariance_scales=2,4",
        )


def help_text() -> str:
    """The config reference: every key with its section, type, default and help."""
    lines = ["Options (--key=value or --key value; YAML sections model/loss/data/train):", "  --config PATH|PRESET"]
    for key, (section, f, tp) in key_index().items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  --{key}  [{section}] {_type_name(tp)} = {default!r}\n      {f.metadata['help']}")
    return "\n".join(lines)


def reference_markdown() -> str:
    """docs/config.md: every key per section, with its type, dataclass default, the default run's value and help."""
    run = parse_config([])  # what `python -m train` uses: the dataclass defaults under configs/cpu-small.yaml
    out = [
        "# Config reference",
        "",
        "Generated from the dataclasses in `autoencoder/config.py` by `python -m autoencoder --config-reference`;",
        "a test fails when it is out of date. Precedence: dataclass defaults < the YAML file (`--config PATH` or",
        f"a preset name; default `configs/{DEFAULT_CONFIG.name}`) < the command line. Options are `--key=value` or",
        "`--key value` (also `--section.key`); a bare boolean flag means true. Unknown keys and wrong types are",
        "errors. **default** is the dataclass's; **`python -m train`** is what the default run uses",
        f"({DEFAULT_CONFIG.stem}), in bold where the preset changes it.",
        "",
    ]
    for section, cls in _section_types().items():
        out += [f"## {section} (`{cls.__name__}`)", "", "| key | type | default | `python -m train` | meaning |"]
        out.append("|---|---|---|---|---|")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            used = getattr(getattr(run, section), f.name)
            shown = f"`{used!r}`" if used == default else f"**`{used!r}`**"
            row = [f"`--{f.name}`", _type_name(hints[f.name]), f"`{default!r}`", shown, f.metadata["help"]]
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out).replace("' | '", "'\\|'")


def parse_config(argv: list[str] | None = None, default_config: Path = DEFAULT_CONFIG) -> Config:
    """Build a Config from defaults, the YAML file named by --config (default cpu-small) and overrides."""
    pairs = split_argv(list(argv or []))
    config_paths = [text for key, text in pairs if key == "config"]
    if any(text is None for text in config_paths):
        raise UsageError("--config needs a path or a preset name", "e.g. --config configs/tiny.yaml")
    path = resolve_config_path(config_paths[-1]) if config_paths else default_config
    cfg = Config()
    apply_mapping(cfg, load_yaml(path), where=str(path))
    apply_overrides(cfg, [(k, v) for k, v in pairs if k != "config"])
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    """Nested plain-dict form of the config (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def flat_dict(cfg: Config) -> dict:
    """Flat {key: value} form for trackers (lists become strings, None becomes 'None')."""
    out = {}
    for section in to_dict(cfg).values():
        for key, value in section.items():
            out[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (loadable again with --config)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)


# Command-line options of the other entry points (eval, diffusion_bridge): the same rules as the run
# config above (``--key=value`` / ``--key value`` / bare ``--flag``, typed values, "did you mean").


def required(help: str) -> Any:
    """A dataclass field the command line must give (no default)."""
    return field(metadata={"help": help})


def parse_options(cls: type, argv: list[str]) -> Any:
    """An instance of the options dataclass ``cls`` from ``argv``; a ``list`` field takes the flag repeatedly."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, text in split_argv(argv):
        if key not in fields:
            import difflib

            close = difflib.get_close_matches(key, list(fields), n=3)
            hint = (
                f"did you mean: {', '.join('--' + c for c in close)}?" if close else "run with --help for the options"
            )
            raise UsageError(f"unknown option --{key}", hint)
        tp = hints[key]
        repeated = typing.get_origin(tp) is list
        item_tp = typing.get_args(tp)[0] if repeated else tp
        value = flag_value(key, text, item_tp, "option")
        if repeated:
            values.setdefault(key, []).append(value)
        else:
            values[key] = value
    for name, f in fields.items():
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            tp = hints[name]
            item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
            raise UsageError(f"--{name} is required ({f.metadata['help']})", f"add --{name}=<{_type_name(item)}>")
    return cls(**values)


def plain_text(doc: str) -> str:
    """A docstring for a terminal: reStructuredText's inline markup (``code``, :role:`name`, literal ``::``) removed."""
    doc = re.sub(r":[a-z]+:`([^`]+)`", r"\1", doc)
    doc = doc.replace("``", "").replace("`", "")
    return re.sub(r"::$", ":", doc, flags=re.MULTILINE)


def options_help(cls: type, usage: str, about: str) -> str:
    """``--help`` of an options dataclass: usage, what the command does, every option with type, default, help."""
    hints = typing.get_type_hints(cls)
    lines = [f"usage: {usage}", "", plain_text(about.strip()), "", "Options (--key=value or --key value):"]
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.default is not dataclasses.MISSING:
            default = f" = {f.default!r}"
        elif f.default_factory is not dataclasses.MISSING:
            default = f" = {f.default_factory()!r}"
        else:
            default = " (required)"
        repeat = ", repeatable" if typing.get_origin(tp) is list else ""
        lines.append(f"  --{f.name}  {_type_name(tp)}{default}{repeat}\n      {f.metadata['help']}")
    return "\n".join(lines)
