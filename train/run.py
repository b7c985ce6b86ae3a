"""Building a run: checks first, then the models, data, optimizers and schedules, prepared once, and resuming."""

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from huggingface_hub import get_token

from autoencoder.config import Config, flat_dict, save_config, to_dict
from autoencoder.data import (
    ImageDataset,
    StreamingImageDataset,
    check_data_source,
    check_enough_images,
    collate,
    data_flag,
    eval_transform,
    load_splits,
    loader_workers,
    train_transform,
)
from autoencoder.equivariance import valid_scales
from autoencoder.errors import UsageError, agreement
from autoencoder.folders import RunDir
from autoencoder.launch import use_cpu_backend
from autoencoder.losses import VAELoss, build_discriminator
from autoencoder.lpips_weights import build_lpips
from autoencoder.models import (
    VAEForTraining,
    build_vae,
    check_resolution,
    compile_regions,
    count_parameters,
    downsampling_factor,
)
from diffusion_bridge.stats import MIN_IMAGES

from . import checkpoints

logger = get_logger(__name__)

TRAIN = "python -m train"  # the marker of a run's --output_dir (autoencoder.folders)


class TrainingState:
    """The run's position and health, saved with every checkpoint; each counter lives here and only here.

    Position (host ints): optimizer steps, epoch, micro-batches consumed in the epoch.  Health (0-dim
    device tensors, so counting a step needs no host sync): skipped updates, skipped in a row, unreadable
    images.  ``state_dict`` reads the device counters: a host sync, at checkpoints only.
    """

    HEALTH = ("nonfinite_steps", "consecutive_nonfinite", "skipped_images")

    def __init__(self, loss_fn: VAELoss, device: torch.device):
        self.loss_fn = loss_fn  # its learned log-variance is saved with the counters
        self.global_step = 0
        self.epoch = 0
        self.batches_in_epoch = 0  # micro-batches trained on in `epoch` (skip_first_batches on resume)
        count = lambda: torch.zeros((), dtype=torch.long, device=device)  # noqa: E731
        self.nonfinite_steps = count()  # optimizer steps skipped for a non-finite loss or gradient
        self.consecutive_nonfinite = count()  # skipped in a row up to the last step (0 after a good one)
        self.skipped_images = count()  # unreadable images the loader replaced

    def count_batch(self, num_skipped: torch.Tensor) -> None:
        """One micro-batch trained on; ``num_skipped`` (a CPU tensor from the collate function) unreadable images."""
        self.batches_in_epoch += 1
        self.skipped_images.add_(num_skipped.to(self.skipped_images.device, non_blocking=True))

    def count_step(self, bad: torch.Tensor) -> None:
        """One optimizer step taken, its update skipped on the device where the 0-dim flag ``bad`` is set."""
        self.global_step += 1
        self.nonfinite_steps.add_(bad)
        self.consecutive_nonfinite.add_(1).mul_(bad)  # +1 if bad, else back to 0

    def next_epoch(self) -> None:
        """The epoch ran to its end."""
        self.epoch += 1
        self.batches_in_epoch = 0

    def health(self) -> dict[str, int]:
        """The health counters as ints (a host sync: logging and checkpoint steps only)."""
        return {k: int(getattr(self, k)) for k in self.HEALTH}

    def state_dict(self) -> dict:
        position = {"global_step": self.global_step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}
        return {**position, **self.health(), "logvar": self.loss_fn.logvar.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.global_step, self.epoch = int(state["global_step"]), int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        for key in self.HEALTH:
            getattr(self, key).fill_(int(state[key]))
        with torch.no_grad():
            self.loss_fn.logvar.copy_(state["logvar"])


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


@dataclass
class Trained:
    """A prepared module (DDP on several ranks) with its prepared optimizer and LR schedule."""

    module: torch.nn.Module
    optimizer: Any  # accelerate's AcceleratedOptimizer around torch's AdamW
    scheduler: Any


@dataclass
class Run:
    """Everything a training run is made of, built once by ``build``; each module is held once, prepared."""

    cfg: Config
    accelerator: Accelerator
    folder: RunDir  # the output folder: marker, lock (held by the main process), atomic writes
    called: float  # perf_counter when train() was called (start-up time in metrics.json)
    data: Data
    loss_fn: VAELoss
    val_lpips: torch.nn.Module
    factor: int
    equivariance_scales: list[int]
    resume_from: Path | None
    model: Trained  # VAEForTraining around the AutoencoderKL
    disc: Trained | None  # the PatchGAN discriminator (--disc_enabled)
    ema: EMAModel | None
    train_dl: Any  # prepared unless streaming (a stream is sharded per rank by the dataset)
    val_dl: Any
    state: TrainingState
    initial_checksum: float  # param_checksum of the VAE as built (before training)

    @property
    def vae(self) -> AutoencoderKL:
        """The AutoencoderKL being trained (outside DDP: for saving, checks and the EMA)."""
        return self.accelerator.unwrap_model(self.model.module).vae

    @property
    def vae_params(self) -> list[torch.nn.Parameter]:
        """The VAE's parameters in order: what the EMA shadows."""
        return list(self.vae.parameters())

    def trained(self) -> list[Trained]:
        return [t for t in (self.model, self.disc) if t is not None]

    def images_per_step(self) -> int:
        t = self.cfg.train
        return t.train_batch_size * t.gradient_accumulation_steps * self.accelerator.num_processes

    def train_set_epoch(self, epoch: int) -> None:
        """Set the epoch (data order and augmentation) on what owns it: the stream, or the prepared loader."""
        (self.data.train if self.data.streaming else self.train_dl).set_epoch(epoch)


def make_accelerator(cfg: Config) -> Accelerator:
    """The run's Accelerator (accumulation, precision, trackers, seedable sampler) and logging."""
    t, out = cfg.train, Path(cfg.train.output_dir)
    accelerator = Accelerator(
        cpu=use_cpu_backend(),
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=t.mixed_precision,
        log_with=None if t.report_to == "none" else t.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / t.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=t.seed, non_blocking=True),
    )
    if accelerator.device.type == "cuda":  # TF32 tensor cores for the fp32 matmuls/convolutions left by autocast
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = t.allow_tf32
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for name in ("train.trainer", "train.run", "train.loop", "train.validation", "train.finish", "train.checkpoints"):
        logging.getLogger(name).setLevel(logging.INFO)  # get_logger set ACCELERATE_LOG_LEVEL's level on each
    for noisy in ("accelerate.checkpointing", "accelerate.accelerator"):  # we log one line per checkpoint
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return accelerator


def build(cfg: Config, accelerator: Accelerator, called: float) -> Run:
    """Check the inputs on every rank, then build and ``prepare`` everything once; no training yet."""
    set_seed(cfg.train.seed)  # before the VAE and discriminator are built: their initialisation is seeded
    folder = RunDir(cfg.train.output_dir, TRAIN, "--output_dir")
    main = accelerator.is_main_process
    try:
        with agreement():  # one rank's mistake ends every rank with the same message
            if main:
                claim_output(folder)
            parts = preflight(cfg, accelerator)
        with agreement():  # one run per output folder: a second one is refused here, naming the first
            if main:
                folder.lock()  # kept if claim_output took it
        return assemble(cfg, accelerator, folder, parts, called)
    except BaseException:
        folder.release()
        raise


def claim_output(folder: RunDir) -> None:
    """Main process: refuse a folder this command did not write; lock it now if a run used it before.

    A folder no run has used yet is locked after the checks instead, so that a refused run leaves no
    lock file behind; a used one is locked first, so a second run never reads a live run's checkpoints.
    """
    folder.check()
    if folder.used_by_a_run():
        folder.lock()


def assemble(cfg: Config, accelerator: Accelerator, folder: RunDir, parts: Parts, called: float) -> Run:
    """Mark the folder, then build the loaders, optimizers and schedules, ``prepare`` them once, and the EMA."""
    with agreement(), folder.guard(folder.path / "config.yaml", lambda: checkpoints.survivors(folder.path)):
        if accelerator.is_main_process:  # only now: a run refused above leaves the output folder as it was
            folder.claim()
            checkpoints.clean_incomplete(folder.path / "checkpoints")
            folder.settle("vae")  # an export killed between its two renames
            save_config(cfg, folder.path / "config.yaml")
    parts.loss_fn.to(accelerator.device)
    parts.val_lpips.to(accelerator.device)
    initial_checksum = param_checksum(parts.vae)
    train_dl, val_dl = build_loaders(cfg, accelerator, parts.data)
    model, disc = prepare_models(cfg, accelerator, parts)
    ema = build_ema(cfg, accelerator, list(parts.vae.parameters()), parts.vae)
    state = TrainingState(parts.loss_fn, accelerator.device)
    for saved in (state, ema):
        if saved is not None:
            accelerator.register_for_checkpointing(saved)
    val_dl = accelerator.prepare(val_dl)
    if not parts.data.streaming:
        train_dl = accelerator.prepare(train_dl)
    run = Run(
        cfg=cfg,
        accelerator=accelerator,
        folder=folder,
        called=called,
        data=parts.data,
        loss_fn=parts.loss_fn,
        val_lpips=parts.val_lpips,
        factor=parts.factor,
        equivariance_scales=parts.equivariance_scales,
        resume_from=parts.resume_from,
        model=model,
        disc=disc,
        ema=ema,
        train_dl=train_dl,
        val_dl=val_dl,
        state=state,
        initial_checksum=initial_checksum,
    )
    start_logging(run)
    return run


def prepare_models(cfg: Config, accelerator: Accelerator, parts: Parts) -> tuple[Trained, Trained | None]:
    """The VAE (in VAEForTraining) and the discriminator, each with its AdamW and schedule, prepared once."""
    world = accelerator.num_processes
    fused = fused_adamw_available(accelerator.device)  # a non-finite step is then skipped without a host sync
    model = VAEForTraining(parts.vae)
    optimizer, disc_optimizer = build_optimizers(cfg, model, parts.loss_fn, parts.disc, world, fused)
    scheduler = build_scheduler(cfg, optimizer, world)
    if cfg.train.compile:  # in place, block by block (compile_regions): DDP sees plain modules, checkpoints plain keys
        compile_regions(parts.vae)
    trained = Trained(*accelerator.prepare(model, optimizer, scheduler))
    if parts.disc is None:
        return trained, None
    disc_scheduler = build_scheduler(cfg, disc_optimizer, world)  # the discriminator's LR follows the VAE's
    return trained, Trained(*accelerator.prepare(parts.disc, disc_optimizer, disc_scheduler))


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


def build_loaders(cfg: Config, accelerator: Accelerator, data: Data) -> tuple[Any, Any]:
    """(train loader, validation loader), not yet prepared.

    Own generators: creating a DataLoader iterator draws a base seed, which must not come from the
    global RNG (it drives posterior sampling and must replay exactly after a resume).
    """
    t = cfg.train
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))  # ranks sharing this machine's CPUs
    workers = loader_workers(cfg.data.dataloader_num_workers, accelerator.device, per_node)
    loader_kw = dict(
        collate_fn=collate,
        num_workers=workers,
        generator=torch.Generator().manual_seed(t.seed),
        pin_memory=accelerator.device.type == "cuda",
        persistent_workers=workers > 0,
    )
    train_dl = torch.utils.data.DataLoader(
        data.train, batch_size=t.train_batch_size, shuffle=not data.streaming, drop_last=True, **loader_kw
    )
    val_dl = torch.utils.data.DataLoader(
        data.validation, batch_size=t.validation_batch_size, shuffle=False, **loader_kw
    )
    return train_dl, val_dl


def build_ema(cfg: Config, accelerator: Accelerator, params: list, vae: AutoencoderKL) -> EMAModel | None:
    """diffusers' EMAModel over the prepared VAE's parameters, on the device (None without --use_ema)."""
    t = cfg.train
    if not t.use_ema:
        return None
    ema = EMAModel(
        params, decay=t.ema_decay, use_ema_warmup=t.ema_warmup, model_cls=AutoencoderKL, model_config=vae.config
    )
    ema.to(accelerator.device)
    return ema


def start_logging(run: Run) -> None:
    """Start the trackers and say what this run is."""
    cfg, acc, vae = run.cfg, run.accelerator, run.vae
    t = cfg.train
    if acc.is_main_process:
        acc.init_trackers("autoencoder-kl", config=flat_dict(cfg))
    logger.info(f"data: {run.data.splits.description}")
    if len(run.data.validation) < MIN_IMAGES:
        logger.warning(
            f"only {len(run.data.validation)} validation images: the held-out figures and the latent statistics "
            "rest on them; give a validation split or more images for figures to compare"
        )
    fused = run.model.optimizer.optimizer.defaults.get("fused")
    logger.info(
        f"model: {cfg.model.pretrained_model_name_or_path or cfg.model.preset}, "
        f"{count_parameters(vae) / 1e6:.2f}M parameters ({count_parameters(vae, True) / 1e6:.2f}M trainable), "
        f"f={run.factor}, latent channels {vae.config.latent_channels}; processes: {acc.num_processes}, "
        f"device: {acc.device}, mixed precision: {t.mixed_precision}, EMA: {t.use_ema}; loader workers: "
        f"{run.train_dl.num_workers}; {'fused' if fused else 'foreach'} AdamW; compile: {t.compile}"
    )


def resume(run: Run) -> None:
    """Load the checkpoint to resume from (``--resume_from_checkpoint``), if there is one."""
    path = run.resume_from
    if path is not None:
        path = checkpoints.settled(path)  # build's clean-up renamed a moved-aside checkpoint back
        run.accelerator.load_state(str(path))
        if run.ema is not None:  # load_state restores the shadow parameters on the CPU
            run.ema.to(run.accelerator.device)
        logger.info(f"resumed from {path} at step {run.state.global_step}")
    elif run.cfg.train.resume_from_checkpoint:
        logger.info("no checkpoint to resume from yet; starting a new run")


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


def fused_adamw_available(device: torch.device) -> bool:
    """Whether torch's fused AdamW runs on ``device`` (it can skip a step on the device: see ``guarded_step``)."""
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1, device=device))], fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


def build_optimizers(
    cfg: Config,
    model: torch.nn.Module,
    loss_fn: VAELoss,
    disc: torch.nn.Module | None,
    world: int,
    fused: bool = False,
):
    """AdamW for the VAE (+ learned logvar) and, if enabled, for the discriminator (fused where available)."""
    t = cfg.train
    lr = t.learning_rate
    if t.scale_lr:
        lr *= t.train_batch_size * t.gradient_accumulation_steps * world
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": params}]
    if cfg.loss.learn_logvar:
        groups.append({"params": [loss_fn.logvar]})
    kw = dict(betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay, eps=t.adam_epsilon, fused=fused)
    opt = torch.optim.AdamW(groups, lr=lr, **kw)
    disc_opt = torch.optim.AdamW(disc.parameters(), lr=t.disc_learning_rate or lr, **kw) if disc is not None else None
    return opt, disc_opt


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, world: int):
    """The configured LR schedule (warm-up + decay) for ``optimizer``; the discriminator's follows the VAE's.

    Prepared schedulers step once per process per optimizer step, hence the scaling (as in diffusers).
    """
    t = cfg.train
    return get_scheduler(
        t.lr_scheduler,
        optimizer,
        num_warmup_steps=t.lr_warmup_steps * world,
        num_training_steps=t.max_train_steps * world,
    )


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


def param_checksum(module: torch.nn.Module) -> float:
    """Order-insensitive float64 fingerprint of a module's parameters (to compare ranks)."""
    return float(sum(p.detach().double().sum() + p.detach().double().pow(2).sum() for p in module.parameters()))


def end_run(run: Run) -> None:
    """Finish the trackers and the process group, and let go of the output folder."""
    run.accelerator.end_training()
    run.folder.release()
