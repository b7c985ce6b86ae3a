"""Building a run: checks first, then the models, data, optimizers and schedules, prepared once, and resuming."""

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from autoencoder.config import Config, flat_dict, save_config
from autoencoder.data import (
    collate,
    loader_workers,
)
from autoencoder.errors import agreement
from autoencoder.folders import RunDir
from autoencoder.launch import use_cpu_backend
from autoencoder.losses import VAELoss
from autoencoder.models import (
    VAEForTraining,
    compile_regions,
    count_parameters,
)
from diffusion_bridge.stats import MIN_IMAGES

from . import checkpoints
from .preflight import Data, Parts, preflight

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


def param_checksum(module: torch.nn.Module) -> float:
    """Order-insensitive float64 fingerprint of a module's parameters (to compare ranks)."""
    return float(sum(p.detach().double().sum() + p.detach().double().pow(2).sum() for p in module.parameters()))


def end_run(run: Run) -> None:
    """Finish the trackers and the process group, and let go of the output folder."""
    run.accelerator.end_training()
    run.folder.release()
