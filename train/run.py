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
from autoencoder.errors import UsageError, agreement, check_output_writable
from autoencoder.folders import LOCK, RunLock, check_folder, finish_swap, mark_folder, write_guard
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
    """Counters, data position and loss-module state saved with every checkpoint."""

    COUNTERS = (
        "global_step",
        "epoch",
        "batches_in_epoch",
        "skipped_images",
        "nonfinite_steps",
        "consecutive_nonfinite",
    )

    def __init__(self, loss_fn: VAELoss):
        self.loss_fn = loss_fn
        self.global_step = 0
        self.epoch = 0
        self.batches_in_epoch = 0  # micro-batches consumed in `epoch` (skip_first_batches on resume)
        self.skipped_images = 0
        self.nonfinite_steps = 0
        self.consecutive_nonfinite = 0

    def state_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in self.COUNTERS}, "logvar": self.loss_fn.logvar.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if key != "logvar":
                setattr(self, key, int(value))
        with torch.no_grad():
            self.loss_fn.logvar.copy_(state["logvar"])


@dataclass
class Parts:
    """What ``preflight`` built before any collective: the losses, the model and the data of a run."""

    loss_fn: VAELoss
    val_lpips: torch.nn.Module
    vae: AutoencoderKL
    factor: int  # the VAE's spatial downsampling
    disc: torch.nn.Module | None
    splits: Any  # autoencoder.data.ImageSplits
    train_ds: torch.utils.data.Dataset
    val_ds: ImageDataset
    streaming: bool
    resume_from: Path | None  # the verified checkpoint to resume from (resolve_resume)
    equivariance_scales: list[int]  # the --equivariance_scales valid at this resolution (autoencoder.equivariance)


@dataclass
class Run:
    """Everything a training run is made of, built once by ``build``; models and optimizers are prepared."""

    cfg: Config
    accelerator: Accelerator
    keep_process_group: bool  # another run follows in this process (train.sweep): see ``end_run``
    called: float  # perf_counter when train() was called (start-up time in metrics.json)
    parts: Parts  # what preflight built (the raw VAE, datasets, losses)
    model: torch.nn.Module  # VAEForTraining around ``parts.vae``, prepared (DDP on many ranks)
    disc: torch.nn.Module | None  # prepared discriminator
    optimizer: Any
    disc_optimizer: Any
    scheduler: Any
    disc_scheduler: Any
    ema: EMAModel | None
    train_dl: Any  # prepared unless streaming (a stream is sharded per rank by the dataset)
    val_dl: Any
    state: TrainingState
    initial_checksum: float  # param_checksum of the VAE as built (before training)
    workers: int  # loader worker processes
    fused: bool  # fused AdamW: a non-finite step is skipped on the device
    vae_params: list[torch.nn.Parameter]  # the prepared VAE's parameters in order (what the EMA shadows)
    raw_disc: torch.nn.Module | None  # the discriminator outside DDP, for the generator's adversarial term
    last_layer: torch.nn.Parameter  # the decoder's output conv weight (the adaptive GAN weight)
    lock: RunLock | None  # the main process's hold on the output folder, for the run's lifetime

    @property
    def vae(self) -> AutoencoderKL:
        return self.parts.vae

    @property
    def loss_fn(self) -> VAELoss:
        return self.parts.loss_fn

    @property
    def val_lpips(self) -> torch.nn.Module:
        return self.parts.val_lpips

    @property
    def streaming(self) -> bool:
        return self.parts.streaming

    def release(self) -> None:
        """Let go of the output folder (main process; safe to call twice)."""
        if self.lock is not None:
            self.lock.release()

    def trained_modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.model, self.disc) if m is not None]

    def optimizers(self) -> list:
        return [o for o in (self.optimizer, self.disc_optimizer) if o is not None]

    def images_per_step(self) -> int:
        t = self.cfg.train
        return t.train_batch_size * t.gradient_accumulation_steps * self.accelerator.num_processes

    def train_set_epoch(self, epoch: int) -> None:
        """Set the epoch (data order and augmentation) on what owns it: the stream, or the prepared loader."""
        (self.parts.train_ds if self.streaming else self.train_dl).set_epoch(epoch)


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


def build(cfg: Config, accelerator: Accelerator, called: float, keep_process_group: bool = False) -> Run:
    """Check the inputs on every rank, then build and ``prepare`` everything once; no training yet."""
    set_seed(cfg.train.seed)  # before the VAE and discriminator are built: their initialisation is seeded
    main, lock = accelerator.is_main_process, None
    try:
        with agreement():  # one rank's mistake ends every rank with the same message
            lock = claim_output(cfg) if main else None
            parts = preflight(cfg, accelerator)
        with agreement():  # one run per output folder: a second one is refused here, naming the first
            if main and lock is None:
                lock = RunLock(cfg.train.output_dir).acquire("--output_dir", TRAIN)
        run = assemble(cfg, accelerator, parts, called, keep_process_group)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    run.lock = lock
    return run


def claim_output(cfg: Config) -> RunLock | None:
    """Main process: refuse a folder this command did not write; lock it now if a run used it before.

    A folder no run has used yet is locked after the checks instead, so that a refused run leaves no
    lock file behind; a used one is locked first, so a second run never reads a live run's checkpoints.
    """
    out = Path(cfg.train.output_dir)
    check_folder("--output_dir", out, TRAIN, legacy=lambda folder: legacy_run(folder, cfg))
    check_output_writable("--output_dir", out)
    return RunLock(out).acquire("--output_dir", TRAIN) if (out / LOCK).exists() else None


def assemble(cfg: Config, accelerator: Accelerator, parts: Parts, called: float, keep_process_group: bool) -> Run:
    """Claim the folder, then build the loaders, optimizers and schedules, ``prepare`` them once, and the EMA."""
    t, out = cfg.train, Path(cfg.train.output_dir)
    with agreement(), write_guard(out / "config.yaml", lambda: checkpoints.survivors(out), "rerun"):
        if accelerator.is_main_process:  # only now: a run refused above leaves the output folder as it was
            mark_folder(out, TRAIN)
            checkpoints.clean_incomplete(out / "checkpoints")
            finish_swap(out / "vae")  # an export killed between its two renames
            save_config(cfg, out / "config.yaml")
    parts.loss_fn.to(accelerator.device)
    parts.val_lpips.to(accelerator.device)
    model = VAEForTraining(parts.vae)
    initial_checksum = param_checksum(parts.vae)
    workers, train_dl, val_dl = build_loaders(cfg, accelerator, parts)
    fused = fused_adamw_available(accelerator.device)  # a non-finite step is then skipped without a host sync
    optimizer, disc_optimizer = build_optimizers(
        cfg, model, parts.loss_fn, parts.disc, accelerator.num_processes, fused
    )
    scheduler = build_scheduler(cfg, optimizer, accelerator.num_processes)
    if t.compile:  # in place, block by block (see compile_regions): DDP sees plain modules, checkpoints plain keys
        compile_regions(parts.vae)
    model, optimizer, scheduler, val_dl = accelerator.prepare(model, optimizer, scheduler, val_dl)
    if not parts.streaming:
        train_dl = accelerator.prepare(train_dl)
    disc, disc_scheduler = parts.disc, None
    if disc is not None:  # the discriminator's LR follows the VAE's schedule
        disc_scheduler = build_scheduler(cfg, disc_optimizer, accelerator.num_processes)
        disc, disc_optimizer, disc_scheduler = accelerator.prepare(disc, disc_optimizer, disc_scheduler)
    raw = accelerator.unwrap_model(model)
    vae_params = list(raw.vae.parameters())
    ema = build_ema(cfg, accelerator, vae_params, parts.vae)
    state = TrainingState(parts.loss_fn)
    for saved in (state, ema):
        if saved is not None:
            accelerator.register_for_checkpointing(saved)
    raw_disc = accelerator.unwrap_model(disc) if disc is not None else None
    run = Run(
        cfg=cfg,
        accelerator=accelerator,
        keep_process_group=keep_process_group,
        called=called,
        parts=parts,
        model=model,
        disc=disc,
        optimizer=optimizer,
        disc_optimizer=disc_optimizer,
        scheduler=scheduler,
        disc_scheduler=disc_scheduler,
        ema=ema,
        train_dl=train_dl,
        val_dl=val_dl,
        state=state,
        initial_checksum=initial_checksum,
        workers=workers,
        fused=fused,
        vae_params=vae_params,
        raw_disc=raw_disc,
        last_layer=raw.last_layer(),
        lock=None,  # set by build
    )
    start_logging(run)
    return run


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
    splits = load_splits(cfg.data, seed=t.seed)
    train_ds, val_ds, streaming = build_datasets(cfg, accelerator, splits)
    return Parts(loss_fn, val_lpips, vae, factor, disc, splits, train_ds, val_ds, streaming, resume_from, scales)


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


def legacy_run(folder: Path, cfg: Config) -> bool:
    """Whether ``folder`` is a run written before folder markers existed: config.yaml and only run files."""
    names = {"config.yaml", "checkpoints", cfg.train.logging_dir, "samples", "vae", "metrics.json", "eval"}
    names |= {"hub-upload", ".tmp-hub-upload", ".tmp-vae"}
    return (folder / "config.yaml").is_file() and all(p.name in names for p in folder.iterdir())


def build_datasets(cfg: Config, accelerator: Accelerator, splits) -> tuple[Any, ImageDataset, bool]:
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
    return train_ds, val_ds, streaming


def build_loaders(cfg: Config, accelerator: Accelerator, parts: Parts) -> tuple[int, Any, Any]:
    """(workers, train loader, validation loader), not yet prepared.

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
        parts.train_ds, batch_size=t.train_batch_size, shuffle=not parts.streaming, drop_last=True, **loader_kw
    )
    val_dl = torch.utils.data.DataLoader(parts.val_ds, batch_size=t.validation_batch_size, shuffle=False, **loader_kw)
    return workers, train_dl, val_dl


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
    logger.info(f"data: {run.parts.splits.description}")
    if len(run.parts.val_ds) < MIN_IMAGES:
        logger.warning(
            f"only {len(run.parts.val_ds)} validation images: the held-out figures and the latent statistics "
            "rest on them; give a validation split or more images for figures to compare"
        )
    logger.info(
        f"model: {cfg.model.pretrained_model_name_or_path or cfg.model.preset}, "
        f"{count_parameters(vae) / 1e6:.2f}M parameters ({count_parameters(vae, True) / 1e6:.2f}M trainable), "
        f"f={run.parts.factor}, latent channels {vae.config.latent_channels}; processes: {acc.num_processes}, "
        f"device: {acc.device}, mixed precision: {t.mixed_precision}, EMA: {t.use_ema}; loader workers: "
        f"{run.workers}; {'fused' if run.fused else 'foreach'} AdamW; compile: {t.compile}"
    )


def resume(run: Run) -> None:
    """Load the checkpoint to resume from (``--resume_from_checkpoint``), if there is one."""
    path = run.parts.resume_from
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
    """``end_training``, or only finish the trackers when another run follows in this process (train.sweep):
    a destroyed process group cannot be initialised again on the same rendezvous."""
    if run.keep_process_group:
        for tracker in run.accelerator.trackers:
            tracker.finish()
    else:
        run.accelerator.end_training()
