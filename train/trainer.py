"""The Accelerate training loop for a diffusers ``AutoencoderKL``.

Standard shape: ``prepare`` once; forward through the *prepared* model inside
``accelerator.accumulate``; clip under ``sync_gradients``; ``save_state``/``load_state`` +
``skip_first_batches`` to resume; ``gather_for_metrics`` for validation;
``unwrap_model(...).vae.save_pretrained(...)`` to export (fp32, safetensors).
"""

import contextlib
import itertools
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import datasets
import numpy as np
import torch
import yaml
from accelerate import Accelerator, skip_first_batches
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from huggingface_hub import get_token
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from autoencoder.config import Config, flat_dict, help_text, parse_config, save_config
from autoencoder.data import (
    ImageDataset,
    StreamingImageDataset,
    check_data_source,
    check_enough_images,
    collate,
    data_flag,
    eval_transform,
    loader_workers,
    load_splits,
    train_transform,
)
from autoencoder.losses import VAELoss, build_discriminator, disc_factor_at
from autoencoder.errors import CatchOutOfMemory, OutOfMemory, UsageError, agree, check_output_writable, run_cli
from autoencoder.lpips_weights import build_lpips
from autoencoder.models import (
    VAEForTraining,
    build_vae,
    check_resolution,
    compile_regions,
    count_parameters,
    downsampling_factor,
    half_check_latents,
    half_precision_decode_check,
    needs_force_upcast,
)
from diffusion_bridge.publish import PublishError, prepare_folder, upload
from diffusion_bridge.stats import collect_latent_stats, describe, process_shard
from eval.latent import LatentAccumulator, collapse_warning
from eval.metrics import MeanAccumulator, quantize_01, reconstruction_metrics

from . import checkpoints
from autoencoder.launch import relaunch_cpu, requested_cpu_processes, use_cpu_backend

logger = get_logger(__name__)


class TrainingState:
    """Counters, data position and loss-module state saved with every checkpoint."""

    def __init__(self, loss_fn: VAELoss):
        self.loss_fn = loss_fn
        self.global_step = 0
        self.epoch = 0
        self.batches_in_epoch = 0  # micro-batches consumed in `epoch` (skip_first_batches on resume)
        self.skipped_images = 0
        self.nonfinite_steps = 0
        self.consecutive_nonfinite = 0

    def state_dict(self) -> dict:
        counters = ("global_step", "epoch", "batches_in_epoch", "skipped_images", "nonfinite_steps",
                    "consecutive_nonfinite")  # fmt: skip
        return {**{k: getattr(self, k) for k in counters}, "logvar": self.loss_fn.logvar.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if key != "logvar":
                setattr(self, key, int(value))
        with torch.no_grad():
            self.loss_fn.logvar.copy_(state["logvar"])


def fused_adamw_available(device: torch.device) -> bool:
    """Whether torch's fused AdamW runs on ``device`` (it can skip a step on the device: see ``guarded_step``)."""
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1, device=device))], fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


def build_optimizers(cfg: Config, model: torch.nn.Module, loss_fn: VAELoss, disc: Optional[torch.nn.Module], world: int,
                     fused: bool = False):  # fmt: skip
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


def guarded_step(optimizer, bad: torch.Tensor) -> None:
    """``optimizer.step()`` that changes nothing where the 0-dim device flag ``bad`` is set, with no host sync.

    Fused AdamW skips its update, and its step count, where ``found_inf`` is 1: the mechanism
    torch's GradScaler uses.  Under fp16 accelerate's GradScaler finds non-finite gradients itself.
    """
    inner = optimizer.optimizer  # accelerate's AcceleratedOptimizer wraps the torch optimizer
    if optimizer.scaler is not None:
        optimizer.step()
    elif inner.defaults.get("fused"):
        inner.found_inf = bad.float()
        try:
            optimizer.step()
        finally:
            del inner.found_inf
    elif not bool(bad):  # an unfused optimizer cannot skip on the device: one host sync
        optimizer.step()


def ema_step(ema: EMAModel, params: list[torch.nn.Parameter], bad: torch.Tensor) -> None:
    """``EMAModel.step`` in foreach kernels that leaves the EMA unchanged where ``bad`` is set (no host sync).

    shadow += (1 - decay) * (param - shadow) for trainable parameters; frozen ones never move, so
    their shadows stay equal to them.
    """
    ema.optimization_step += 1
    decay = ema.get_decay(ema.optimization_step)
    ema.cur_decay_value = decay
    pairs = [(s, p.detach()) for s, p in zip(ema.shadow_params, params) if p.requires_grad]
    shadow = [s for s, _ in pairs]
    delta = torch._foreach_sub([p for _, p in pairs], shadow)
    torch._foreach_mul_(delta, (~bad).to(shadow[0].dtype) * (1.0 - decay))
    torch._foreach_add_(shadow, delta)


@dataclass
class WaitClock:
    """Seconds the loop's host thread spent blocked, cumulative: on the loader for a batch, on the device.

    On a GPU the loop waits on the device once per step (``LaggedFlags``): a loop that keeps the GPU
    busy spends its spare host time there, and one starved by its data waits on the loader instead.
    """

    data: float = 0.0
    device: float = 0.0


_END = object()


def timed_batches(batches: Iterable, clock: WaitClock) -> Iterator:
    """``batches``' items, adding the time spent waiting for each (iterator start included) to ``clock.data``."""
    start = time.perf_counter()
    iterator = iter(batches)
    while True:
        batch = next(iterator, _END)
        clock.data += time.perf_counter() - start
        if batch is _END:
            return
        yield batch
        start = time.perf_counter()


class LaggedFlags:
    """Small per-step device tensors read on the host one step later, so it never waits for the step just queued.

    On CUDA each push starts a non-blocking copy into pinned memory and records an event; ``ready``
    waits only for steps the GPU has (nearly) finished, and adds that wait to ``clock.device``.  On
    the CPU the values are ready at once.
    """

    def __init__(self, clock: WaitClock) -> None:
        self.queue: list[tuple[int, torch.Tensor, Optional[torch.cuda.Event]]] = []
        self.clock = clock

    def push(self, step: int, values: torch.Tensor) -> None:
        """Queue ``values`` (a 1-D device tensor) of optimizer step ``step``."""
        if values.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.queue.append((step, host, event))
        else:
            self.queue.append((step, values.clone(), None))

    def ready(self, keep: int) -> Iterator[tuple[int, list[float]]]:
        """(step, values) of every queued step except the newest ``keep``, oldest first."""
        while len(self.queue) > keep:
            step, host, event = self.queue.pop(0)
            if event is not None:
                start = time.perf_counter()
                event.synchronize()
                self.clock.device += time.perf_counter() - start
            yield step, host.tolist()


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, world: int):
    """The configured LR schedule (warm-up + decay) for ``optimizer``; the discriminator's follows the VAE's.

    Prepared schedulers step once per process per optimizer step, hence the scaling (as in diffusers).
    """
    t = cfg.train
    return get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps * world,
                         num_training_steps=t.max_train_steps * world)  # fmt: skip


def log_grid(accelerator: Accelerator, inputs: torch.Tensor, recons: torch.Tensor, path: Path, step: int) -> None:
    """Save originals (top row) over reconstructions (bottom row) as a PNG and send it to trackers."""
    n = inputs.shape[0]
    grid = make_grid(torch.cat([quantize_01(inputs), quantize_01(recons)]).cpu(), nrow=n, padding=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    hwc = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"val/reconstructions": hwc[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"val/reconstructions": [hwc]}, step=step)


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # --compile's regions run eager here: no recompiles for eval shapes
def validate(accelerator, model, loss_fn, val_lpips, val_dl, step: int, cfg: Config) -> dict:
    """Held-out PSNR/SSIM/LPIPS and loss terms, gathered over processes; saves the grid on main."""
    vae_model = accelerator.unwrap_model(model)
    # Invariant: autocast computes in bf16/fp16, but the master weights never leave fp32.
    assert all(p.dtype == torch.float32 for p in vae_model.parameters()), "master weights must stay fp32"
    was_training = vae_model.training
    vae_model.eval()
    acc, latent_acc = MeanAccumulator(), LatentAccumulator()
    generator = torch.Generator().manual_seed(step)  # aggregate-posterior samples; the global RNG is untouched
    grid_inputs, grid_recons = [], []
    for batch in val_dl:
        x = batch["pixel_values"]
        with accelerator.autocast():
            recon, posterior = vae_model(x, sample_posterior=False)  # deterministic: decode the mode
        recon = recon.float()
        _, logs = loss_fn(x, recon, posterior, step=step, split="val")
        per_image = reconstruction_metrics(recon, x, val_lpips)
        # Batch-mean loss terms repeated per image so padding duplicates are dropped consistently.
        terms = {k.split("/", 1)[1]: v.expand(x.shape[0]) for k, v in logs.items() if k != "val/beta"}
        assert not terms.keys() & per_image.keys(), "loss log names must not shadow the metrics"
        per_image.update(terms)
        acc.update(accelerator.gather_for_metrics(per_image))
        mean, logvar = accelerator.gather_for_metrics((posterior.mean.float(), posterior.logvar.float()))
        latent_acc.update(mean, logvar, tuple(x.shape[-2:]), generator)
        if sum(t.shape[0] for t in grid_inputs) < cfg.train.num_grid_images:
            grid_inputs.append(x)
            grid_recons.append(recon)
    vae_model.train(was_training)
    results = {f"val/{k}": v for k, v in acc.compute().items()}
    results["val/n_images"] = acc.count("psnr")
    if latent_acc.n >= 2:  # active units are a variance over images
        latent = latent_acc.compute()
        results.update({f"val/kl_ch{c}": kl for c, kl in enumerate(latent["kl_per_channel_nats"])})
        results["val/active_channels"] = latent["active_channels"]
        results["val/active_units_fraction"] = latent["active_units"] / latent["units"]
        results["val/prior_fd"] = latent["prior_fd"]
        if warning := collapse_warning(latent):
            logger.warning(f"step {step}: {warning}")
        results["latent"] = latent
    if accelerator.is_main_process:
        n = cfg.train.num_grid_images
        path = Path(cfg.train.output_dir) / "samples" / f"step_{step:07d}.png"
        log_grid(accelerator, torch.cat(grid_inputs)[:n], torch.cat(grid_recons)[:n], path, step)
    accelerator.log({k: v for k, v in results.items() if k.startswith("val/")}, step=step)
    return results


def save_checkpoint(accelerator: Accelerator, model, cfg: Config, step: int) -> Path:
    """``save_state`` into a temporary folder, then publish it atomically and apply the total limit."""
    root = Path(cfg.train.output_dir) / "checkpoints"
    tmp = checkpoints.tmp_path(root, step)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    final = checkpoints.final_path(root, step)
    if accelerator.is_main_process:
        save_config(cfg, tmp / "training_config.yaml")
        accelerator.unwrap_model(model).vae.save_config(tmp)  # config.json: the folder loads with load_vae
        final = checkpoints.publish(root, step)
        removed = checkpoints.prune(root, cfg.train.checkpoints_total_limit)
        logger.info(f"saved {final}" + (f"; removed {[p.name for p in removed]}" if removed else ""))
    accelerator.wait_for_everyone()
    return final


def resolve_resume(cfg: Config) -> Optional[Path]:
    """The checkpoint to resume from: 'latest' (None if there is none yet) or an explicit folder."""
    value = cfg.train.resume_from_checkpoint
    if not value:
        return None
    if value == "latest":
        return checkpoints.latest_checkpoint(Path(cfg.train.output_dir) / "checkpoints")
    path = Path(value)
    if not path.is_dir():
        raise UsageError(f"--resume_from_checkpoint {value!r} is not a checkpoint folder",
                         "give a folder under OUTPUT_DIR/checkpoints, or 'latest'")  # fmt: skip
    return path


def export(accelerator: Accelerator, model, cfg: Config, metrics: dict) -> Path:
    """Write ``<output_dir>/vae`` (fp32 safetensors + config), the resolved config and metrics.json."""
    out = Path(cfg.train.output_dir)
    vae_dir = out / "vae"
    if accelerator.is_main_process:
        vae = accelerator.unwrap_model(model).vae
        assert all(p.dtype == torch.float32 for p in vae.parameters()), "master weights must stay fp32"
        tmp = out / ".tmp-vae"
        shutil.rmtree(tmp, ignore_errors=True)
        vae.save_pretrained(tmp, safe_serialization=True)
        save_config(cfg, tmp / "training_config.yaml")
        if "latent_stats" in metrics:
            (tmp / "latent_stats.json").write_text(json.dumps(metrics["latent_stats"], indent=2))
        shutil.rmtree(vae_dir, ignore_errors=True)
        tmp.rename(vae_dir)
        with open(out / "metrics.json", "w") as fh:
            json.dump(metrics, fh, indent=2)
    accelerator.wait_for_everyone()
    return vae_dir


def hardware(accelerator: Accelerator) -> str:
    """What trained the model, for the model card: '2 x NVIDIA H100 ...' or '1 x CPU (2 cores)'."""
    device = accelerator.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type.upper()} ({os.cpu_count()} cores)"
    return f"{accelerator.num_processes} x {name}"


def eval_payload(cfg: Config, metrics: dict, vae_dir: Path) -> dict:
    """The held-out validation figures in ``python -m eval``'s metrics.json format (what publishing reads)."""
    d = cfg.data
    name = d.dataset_name or (Path(d.train_data_dir).name if d.train_data_dir else "embedded held-out photographs")
    val = {k.split("/", 1)[1]: v for k, v in metrics["val"].items() if k.split("/", 1)[1] in ("psnr", "ssim", "ms_ssim", "lpips")}
    return {
        "data": metrics["data"],
        "dataset": {"name": name, "hub_id": d.dataset_name, "split": "held-out validation"},
        "n_images": metrics["n_images"],
        "resolution": d.resolution,
        "preprocessing": "the training run's validation transform (resize shorter side, antialiased, centre crop; "
                         "tiles of held-out photographs for the embedded data)",
        "lpips_net": metrics["lpips_net"],
        "rfid_status": "not computed during training (run `python -m eval` for rFID)",
        "models": {str(vae_dir): {**val, "n_images": metrics["n_images"], "resolution": d.resolution}},
    }


def push_to_hub(cfg: Config, metrics: dict, vae_dir: Path) -> dict:
    """Publish the export with its held-out figures (main process); failures are reported, the folder kept."""
    out = Path(cfg.train.output_dir)
    (out / "eval").mkdir(exist_ok=True)
    (out / "eval" / "metrics.json").write_text(json.dumps(eval_payload(cfg, metrics, vae_dir), indent=2))
    try:
        folder = prepare_folder(vae_dir, out / "hub-upload", cfg.train.hub_model_id, eval_dir=str(out / "eval"))
        url = upload(folder, cfg.train.hub_model_id, private=cfg.train.hub_private,
                     commit_message=f"AutoencoderKL after {metrics['step']} steps")  # fmt: skip
    except PublishError as exc:
        logger.error(f"push_to_hub failed: {exc}")
        return {"error": str(exc)}
    logger.info(f"pushed to https://huggingface.co/{cfg.train.hub_model_id} ({url})")
    return {"repo_id": cfg.train.hub_model_id, "commit_url": url}


class StopRequest:
    """Records SIGINT/SIGTERM so the loop can checkpoint and exit at the next step boundary."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def ema_weights(ema: Optional[EMAModel], params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Temporarily swap the EMA weights into ``params`` (no-op without EMA)."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def param_checksum(module: torch.nn.Module) -> float:
    """Order-insensitive float64 fingerprint of a module's parameters (to compare ranks)."""
    return float(sum(p.detach().double().sum() + p.detach().double().pow(2).sum() for p in module.parameters()))


def check_disk_space(path: Path, n_params: int, cfg: Config) -> None:
    """Stop at start-up if one checkpoint cannot fit; warn if the kept checkpoints will not."""
    t = cfg.train
    # fp32 weights + two AdamW moments (+ EMA copy); the exported model is one more copy.
    ckpt = n_params * 4 * (3 + int(t.use_ema))
    free = shutil.disk_usage(path).free
    if free < ckpt + n_params * 4:
        raise UsageError(
            f"only {free / 1e9:.2f} GB free under {str(path)!r}, but one checkpoint plus the export needs "
            f"~{(ckpt + n_params * 4) / 1e9:.2f} GB", "free space or choose another --output_dir"
        )
    kept = t.checkpoints_total_limit or (math.ceil(t.max_train_steps / t.checkpointing_steps) if t.checkpointing_steps else 0)
    if free < (kept + 1) * ckpt + n_params * 4:
        logger.warning(
            f"{free / 1e9:.2f} GB free under {path}; {kept} checkpoints need ~{kept * ckpt / 1e9:.2f} GB: "
            "lower --checkpoints_total_limit or free space"
        )


def clip_vae_gradients(accelerator: Accelerator, model, loss_fn: VAELoss, cfg: Config, logs: dict) -> torch.Tensor:
    """Average the learned logvar's gradient, clip the VAE's; the pre-clipping norm as a device tensor.

    No host sync: a non-finite norm makes every gradient non-finite, and ``guarded_step`` skips
    the update on the device.  Under fp16 the GradScaler unscales first and owns overflow handling.
    """
    if cfg.loss.learn_logvar and accelerator.num_processes > 1 and loss_fn.logvar.grad is not None:
        # logvar lives outside the DDP-wrapped model: average its gradient by hand.
        loss_fn.logvar.grad = accelerator.reduce(loss_fn.logvar.grad, "mean")
    max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
    logs["train/grad_norm"] = grad_norm
    return grad_norm


@contextlib.contextmanager
def loadable_checkpoint(checkpoint: Path, has_disc: bool) -> Iterator[Path]:
    """The folder to ``load_state`` from: a GAN checkpoint written before the discriminator had an LR
    schedule lacks ``scheduler_1.bin``; a temporary view of it (links) gets the VAE's schedule state,
    which the discriminator's schedule now follows.  The checkpoint itself is never modified."""
    if not has_disc or (checkpoint / "scheduler_1.bin").exists() or not (checkpoint / "model_1.safetensors").exists():
        yield checkpoint
        return
    logger.warning(f"{checkpoint} predates the discriminator's LR schedule: it starts from the VAE's schedule state")
    with tempfile.TemporaryDirectory(dir=checkpoint.parent, prefix=".resume-") as tmp:
        view = Path(tmp)
        for item in checkpoint.iterdir():
            (view / item.name).symlink_to(item.resolve())
        shutil.copyfile(checkpoint / "scheduler.bin", view / "scheduler_1.bin")
        yield view


def warn_if_old_objective(checkpoint: Path, cfg: Config) -> None:
    """Say how a checkpoint written before kl_weight took latent-diffusion's meaning continues its objective.

    Before that change the loss averaged the pixel terms over the N = 3·H·W pixel values but summed
    the KL per image, so its kl_weight was N times latent-diffusion's β.  Such checkpoints (their saved
    config has no ``disc_factor`` key) resume with the current meaning; the old objective is kept
    by passing the translated value.
    """
    saved = checkpoint / "training_config.yaml"
    if not saved.is_file():
        return
    old = yaml.safe_load(saved.read_text()) or {}
    loss = old.get("loss", {})
    if "disc_factor" in loss or "kl_weight" not in loss:
        return
    res = old.get("data", {}).get("resolution", cfg.data.resolution)
    same = float(loss["kl_weight"]) / (3 * res * res)
    logger.warning(
        f"{checkpoint} was trained before kl_weight meant latent-diffusion's beta: its kl_weight "
        f"{loss['kl_weight']} at {res} px is beta = {same:.3g} now. This run uses kl_weight {cfg.loss.kl_weight}; "
        f"pass --kl_weight={same:.6g} to continue the checkpoint's objective unchanged"
    )


@dataclass
class RunInputs:
    """What ``preflight`` built: the losses, the model and the data of a run."""

    loss_fn: VAELoss
    val_lpips: torch.nn.Module
    vae: AutoencoderKL
    factor: int  # the VAE's spatial downsampling
    disc: Optional[torch.nn.Module]
    splits: Any  # autoencoder.data.ImageSplits
    train_ds: torch.utils.data.Dataset
    val_ds: ImageDataset
    streaming: bool


def preflight(cfg: Config, accelerator: Accelerator) -> RunInputs:
    """Check everything bad input can break and build the run's parts, before any collective or training.

    Contains no collective, so every rank reaches ``agree`` whatever failed.  Order: cheapest first,
    so a mistake costs seconds.
    """
    t = cfg.train
    out = Path(t.output_dir)
    if accelerator.is_main_process:
        check_output_writable("--output_dir", out)
        if t.push_to_hub and get_token() is None:  # fail now, not after hours of training
            raise UsageError("push_to_hub needs a Hugging Face token", "set HF_TOKEN or run `hf auth login`")
    resolve_resume(cfg)  # a mistyped --resume_from_checkpoint fails now
    check_data_source(cfg.data)
    # LPIPS first: missing backbone weights must stop the run before any data or model work.
    loss_fn = VAELoss(cfg.loss)
    reuse = loss_fn.lpips is not None and cfg.loss.lpips_net == t.val_lpips_net
    val_lpips = loss_fn.lpips if reuse else build_lpips(t.val_lpips_net, cfg.loss.lpips_weights)
    vae = build_vae(cfg.model)
    factor = downsampling_factor(vae)
    check_resolution(cfg.data.resolution, factor)
    disc = build_discriminator(cfg.loss)
    if accelerator.is_main_process:
        check_disk_space(out, count_parameters(vae) + (count_parameters(disc) if disc is not None else 0), cfg)
    splits = load_splits(cfg.data, seed=t.seed)
    transform = train_transform(cfg.data, splits.embedded)
    streaming = isinstance(splits.train, datasets.IterableDataset)
    global_batch = t.train_batch_size * accelerator.num_processes
    if streaming:  # sharded per rank here, so the loader is not prepared (no accelerate re-sharding)
        train_ds = StreamingImageDataset(splits.train, splits.image_column, transform, t.seed, accelerator.process_index,
                                         accelerator.num_processes, cfg.data.shuffle_buffer)  # fmt: skip
    else:
        # the embedded default crops 11 photographs ~700 times an epoch: decode each once per process
        train_ds = ImageDataset(splits.train, splits.image_column, transform, seed=t.seed, cache_decoded=splits.embedded)
        check_enough_images(train_ds, global_batch, "training", data_flag(cfg.data.dataset_name, cfg.data.train_data_dir))
    val_ds = ImageDataset(splits.validation, splits.image_column, eval_transform(cfg.data.resolution))
    check_enough_images(val_ds, 1, "validation", data_flag(cfg.data.dataset_name, cfg.data.train_data_dir), need="{n} image",
                        fix="add images or choose another --validation_split")
    return RunInputs(loss_fn, val_lpips, vae, factor, disc, splits, train_ds, val_ds, streaming)


def stop_after_oom(accelerator: Accelerator, model, optimizers: list, cfg: Config, state: TrainingState, what: str,
                   micro_in_window: int, in_update: bool) -> None:
    """Out of memory in the loop: checkpoint the last completed step where that is safe, then raise OutOfMemory.

    Safe means one process (a collective save cannot be joined by ranks stuck in a collective) and no
    optimizer step half done; the unfinished accumulation window is rewound so a resume replays it.
    """
    t = cfg.train
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if accelerator.device.type == "cuda":
        torch.cuda.empty_cache()
    saved = None
    last = checkpoints.latest_checkpoint(Path(t.output_dir) / "checkpoints")
    if accelerator.num_processes == 1 and not in_update and state.global_step > 0 and (
            last is None or not last.name.endswith(f"-{state.global_step}")):  # fmt: skip
        state.batches_in_epoch -= micro_in_window
        accelerator.step -= micro_in_window  # accelerate's accumulation counter is saved with the state
        try:
            saved = save_checkpoint(accelerator, model, cfg, state.global_step)
        except Exception as exc:  # noqa: BLE001 - the OOM is the error to report
            logger.error(f"could not write a checkpoint after running out of memory: {exc}")
    last = saved or last
    resume = f"; resume with --resume_from_checkpoint {last}" if last else ""
    precision = t.mixed_precision if t.mixed_precision != "no" else "fp32"
    raise OutOfMemory(
        f"out of memory at step {state.global_step + 1} on {accelerator.device} with --train_batch_size "
        f"{t.train_batch_size} x --gradient_accumulation_steps {t.gradient_accumulation_steps} at --resolution "
        f"{cfg.data.resolution} ({precision}, gradient checkpointing {'on' if cfg.model.gradient_checkpointing else 'off'}; "
        f"{what[:120]})" + (f"; saved {saved} at step {state.global_step}" if saved else ""),
        "lower --train_batch_size (raise --gradient_accumulation_steps to keep the global batch), add "
        "--gradient_checkpointing, or use --mixed_precision=bf16" + resume,
    )


def end_run(accelerator: Accelerator, keep_process_group: bool) -> None:
    """``end_training``, or only finish the trackers when another run follows in this process (train.sweep):
    a destroyed process group cannot be initialised again on the same rendezvous."""
    if keep_process_group:
        for tracker in accelerator.trackers:
            tracker.finish()
    else:
        accelerator.end_training()


def note_step_flags(accelerator: Accelerator, cfg: Config, state: TrainingState, lagged: LaggedFlags, keep: int,
                    keep_process_group: bool) -> None:  # fmt: skip
    """Take the queued steps' device counters (all but the newest ``keep``) onto the host."""
    for step, values in lagged.ready(keep):
        note_one_step(accelerator, cfg, state, step, values, keep_process_group)


def note_one_step(accelerator: Accelerator, cfg: Config, state: TrainingState, step: int, values: list[float],
                  keep_process_group: bool) -> None:  # fmt: skip
    """One step's counters: update the state, warn about a skipped step, stop after too many in a row."""
    bad, total, consecutive, skipped = (int(v) for v in values)
    state.nonfinite_steps, state.consecutive_nonfinite, state.skipped_images = total, consecutive, skipped
    if not bad:
        return
    logger.warning(f"step {step}: non-finite loss or gradient, update skipped "
                   f"({consecutive} in a row, {total} in total)")  # fmt: skip
    if consecutive >= cfg.train.max_consecutive_nonfinite:
        last = checkpoints.latest_checkpoint(Path(cfg.train.output_dir) / "checkpoints")
        end_run(accelerator, keep_process_group)
        raise UsageError(
            f"{consecutive} consecutive steps with a non-finite loss or gradient (up to step {step}); stopping. "
            f"Last good checkpoint: {last or 'none'}",
            f"resume from it with --resume_from_checkpoint {last or 'PATH'} and e.g. a lower --learning_rate or "
            "--mixed_precision=bf16/no",
        )


def train(cfg: Config, keep_process_group: bool = False) -> dict:
    """Run training as configured; returns the metrics written to metrics.json.

    On SIGINT/SIGTERM it checkpoints and returns early with ``metrics["interrupted"]`` set to the
    signal number.  ``keep_process_group``: another run follows in this process (see ``end_run``).
    """
    t = cfg.train
    out = Path(t.output_dir)
    called = time.perf_counter()
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
    logging.getLogger(__name__).setLevel(logging.INFO)
    for noisy in ("accelerate.checkpointing", "accelerate.accelerator"):  # we log one line per checkpoint
        logging.getLogger(noisy).setLevel(logging.WARNING)
    set_seed(t.seed)  # before the VAE and discriminator are built: their initialisation is seeded
    error = None
    try:
        run = preflight(cfg, accelerator)
    except Exception as exc:  # noqa: BLE001 - every rank must reach the agreement below
        error = exc
    agree(error)  # one rank's mistake ends every rank with the same message
    loss_fn, val_lpips, vae, disc, splits = run.loss_fn, run.val_lpips, run.vae, run.disc, run.splits
    train_ds, val_ds, streaming, factor = run.train_ds, run.val_ds, run.streaming, run.factor
    if accelerator.is_main_process:  # only now: a run refused above leaves the output folder as it was
        checkpoints.clean_incomplete(out / "checkpoints")
        save_config(cfg, out / "config.yaml")
    loss_fn.to(accelerator.device)
    val_lpips.to(accelerator.device)
    model = VAEForTraining(vae)
    initial_checksum = param_checksum(vae)
    # Own generators: creating a DataLoader iterator draws a base seed, which must not come from
    # the global RNG (it drives posterior sampling and must replay exactly after a resume).
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))  # ranks sharing this machine's CPUs
    workers = loader_workers(cfg.data.dataloader_num_workers, accelerator.device, per_node)
    loader_kw = dict(collate_fn=collate, num_workers=workers, generator=torch.Generator().manual_seed(t.seed),
                     pin_memory=accelerator.device.type == "cuda", persistent_workers=workers > 0)  # fmt: skip
    train_dl = torch.utils.data.DataLoader(train_ds, batch_size=t.train_batch_size, shuffle=not streaming,
                                           drop_last=True, **loader_kw)  # fmt: skip
    val_dl = torch.utils.data.DataLoader(val_ds, batch_size=t.validation_batch_size, shuffle=False, **loader_kw)

    fused = fused_adamw_available(accelerator.device)  # a non-finite step is then skipped without a host sync
    optimizer, disc_optimizer = build_optimizers(cfg, model, loss_fn, disc, accelerator.num_processes, fused=fused)
    scheduler = build_scheduler(cfg, optimizer, accelerator.num_processes)
    if t.compile:  # in place, block by block (see compile_regions): DDP sees plain modules, checkpoints plain keys
        compile_regions(vae)
    model, optimizer, scheduler, val_dl = accelerator.prepare(model, optimizer, scheduler, val_dl)
    if not streaming:
        train_dl = accelerator.prepare(train_dl)
    disc_scheduler = None
    if disc is not None:  # the discriminator's LR follows the VAE's schedule
        disc_scheduler = build_scheduler(cfg, disc_optimizer, accelerator.num_processes)
        disc, disc_optimizer, disc_scheduler = accelerator.prepare(disc, disc_optimizer, disc_scheduler)
    vae_params = list(accelerator.unwrap_model(model).vae.parameters())
    ema = None
    if t.use_ema:
        ema = EMAModel(vae_params, decay=t.ema_decay, use_ema_warmup=t.ema_warmup,
                       model_cls=AutoencoderKL, model_config=vae.config)  # fmt: skip
        ema.to(accelerator.device)
    state = TrainingState(loss_fn)
    accelerator.register_for_checkpointing(state)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    if accelerator.is_main_process:
        accelerator.init_trackers("autoencoder-kl", config=flat_dict(cfg))
    logger.info(f"data: {splits.description}")
    logger.info(
        f"model: {cfg.model.pretrained_model_name_or_path or cfg.model.preset}, "
        f"{count_parameters(vae) / 1e6:.2f}M parameters ({count_parameters(vae, True) / 1e6:.2f}M trainable), "
        f"f={factor}, latent channels {vae.config.latent_channels}; processes: {accelerator.num_processes}, "
        f"device: {accelerator.device}, mixed precision: {t.mixed_precision}, EMA: {t.use_ema}; loader workers: "
        f"{workers}; {'fused' if fused else 'foreach'} AdamW; compile: {t.compile}"
    )

    resume = resolve_resume(cfg)
    if resume is not None:
        with loadable_checkpoint(resume, disc is not None) as folder:
            accelerator.load_state(str(folder))
        if ema is not None:  # load_state restores the shadow parameters on the CPU
            ema.to(accelerator.device)
        warn_if_old_objective(resume, cfg)
        logger.info(f"resumed from {resume} at step {state.global_step}")
    elif t.resume_from_checkpoint:
        logger.info("no checkpoint to resume from yet; starting a new run")

    results: dict = {}
    initial: dict = {}
    if t.validate_at_start and state.global_step == 0:
        with ema_weights(ema, vae_params):
            initial = validate(accelerator, model, loss_fn, val_lpips, val_dl, 0, cfg)
        logger.info(f"untrained: {fmt(initial)}")

    raw_disc = accelerator.unwrap_model(disc) if disc is not None else None
    last_layer = accelerator.unwrap_model(model).last_layer()
    progress = tqdm(total=t.max_train_steps, initial=state.global_step, disable=not accelerator.is_local_main_process,
                    desc="train", dynamic_ncols=True)  # fmt: skip
    images_per_step = t.train_batch_size * t.gradient_accumulation_steps * accelerator.num_processes
    interval_start, interval_steps = time.perf_counter(), 0
    train_start = time.perf_counter()
    # (step, seconds into the loop, seconds waited on data, on the device) at logging steps, after their host sync
    log_marks: list[tuple[int, float, float, float]] = []
    waits = WaitClock()
    interval_waits = WaitClock()  # ``waits`` at the start of the logging interval
    device = accelerator.device
    # [non-finite steps, consecutive non-finite steps, skipped images], kept on the device and read one
    # step late (LaggedFlags), or at once at logging/checkpoint/validation steps: no host sync per step
    counters = torch.tensor([state.nonfinite_steps, state.consecutive_nonfinite, state.skipped_images], device=device)
    window_bad = torch.zeros((), dtype=torch.bool, device=device)  # a non-finite loss in this accumulation window
    lagged = LaggedFlags(waits)
    interrupted: Optional[int] = None
    micro_in_window = 0  # micro-batches of the current accumulation window entered so far
    in_update = False  # inside an optimizer step: parameters may be half-updated
    no_clip = float("inf")
    model.train()
    with StopRequest() as stop, CatchOutOfMemory() as oom:
        for epoch in itertools.count(state.epoch):
            if state.global_step >= t.max_train_steps or interrupted:
                break
            state.epoch = epoch
            (train_ds if streaming else train_dl).set_epoch(epoch)  # data order and augmentation of this epoch
            if streaming:  # a stream cannot seek: re-read and drop the batches already trained on
                loader = itertools.islice(train_dl, state.batches_in_epoch, None)
            elif state.batches_in_epoch:
                loader = skip_first_batches(train_dl, state.batches_in_epoch)
            else:
                loader = train_dl
            yielded = 0
            for batch in timed_batches(loader, waits):
                yielded += 1
                state.batches_in_epoch += 1
                micro_in_window += 1
                x = batch["pixel_values"].to(device, non_blocking=True)  # prepared loaders already moved it
                counters[2].add_(batch["num_skipped"].to(device, non_blocking=True))
                step = state.global_step
                use_disc = disc is not None and disc_factor_at(step, cfg.loss) > 0
                # fp16: the adaptive GAN weight differentiates at the scaler's scale (no fp16 underflow)
                grad_scale = accelerator.scaler.get_scale() if use_disc and accelerator.scaler is not None else 1.0
                with accelerator.accumulate(*(m for m in (model, disc) if m is not None)):
                    recon, posterior = model(x)
                    with accelerator.autocast():  # LPIPS in the run's precision (its accuracy: tests/test_lpips.py)
                        loss, logs = loss_fn(x, recon, posterior, step, discriminator=raw_disc if use_disc else None,
                                             last_layer=last_layer, grad_scale=grad_scale)  # fmt: skip
                    window_bad |= ~torch.isfinite(loss)
                    accelerator.backward(loss)  # a non-finite loss gives non-finite gradients: skipped below
                    if accelerator.sync_gradients:
                        # every rank must take the same decision: the loss flags are summed over ranks (a
                        # device collective), the gradient norm is already global after DDP's all-reduce
                        loss_bad = window_bad if accelerator.num_processes == 1 else (
                            accelerator.reduce(window_bad.float(), "sum") > 0)  # fmt: skip
                        grad_norm = clip_vae_gradients(accelerator, model, loss_fn, cfg, logs)
                        # fp16: an overflow is the GradScaler's business (it skips and lowers its scale)
                        bad = loss_bad if accelerator.scaler is not None else loss_bad | ~torch.isfinite(grad_norm)
                        in_update = True
                        guarded_step(optimizer, bad)
                        scheduler.step()  # a skipped step still advances the LR schedule, as it does global_step
                        in_update = False
                    optimizer.zero_grad(set_to_none=True)
                    if use_disc:  # after the VAE step, so the D step runs on the same (updated) scaler scale
                        d_loss, d_logs = loss_fn.discriminator_loss(x, recon, disc, step)
                        accelerator.backward(d_loss)
                        logs.update(d_logs)
                        if accelerator.sync_gradients:  # no D update where the VAE's was skipped
                            d_norm = accelerator.clip_grad_norm_(disc.parameters(), t.max_grad_norm or no_clip)
                            in_update = True
                            guarded_step(disc_optimizer, bad | ~torch.isfinite(d_norm))
                            disc_scheduler.step()
                            in_update = False
                        disc_optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                micro_in_window = 0
                state.global_step += 1
                interval_steps += 1
                progress.update(1)
                counters[0].add_(bad)
                counters[1].add_(1).mul_(bad)  # consecutive: +1 if bad, else back to 0
                if ema is not None:
                    in_update = True
                    ema_step(ema, vae_params, bad)
                    in_update = False
                window_bad = torch.zeros((), dtype=torch.bool, device=device)
                lagged.push(state.global_step, torch.cat([bad.long().view(1), counters]))
                is_log = state.global_step % t.log_every == 0 or state.global_step == t.max_train_steps
                is_ckpt = bool(t.checkpointing_steps) and state.global_step % t.checkpointing_steps == 0
                is_val = bool(t.validation_steps) and state.global_step % t.validation_steps == 0
                exact = is_log or is_ckpt or is_val or (accelerator.num_processes == 1 and stop.signum is not None)
                note_step_flags(accelerator, cfg, state, lagged, 0 if exact else 1, keep_process_group)
                if accelerator.num_processes == 1:
                    stop_now = stop.signum is not None
                else:  # ranks agree at steps every rank syncs at anyway (SIGTERM is seen within log_every steps)
                    stop_now = exact and bool(accelerator.reduce(
                        torch.tensor(float(stop.signum is not None), device=device), "sum") > 0)  # fmt: skip
                if is_log:
                    elapsed = time.perf_counter() - interval_start
                    logs = {k: float(v) for k, v in logs.items()}  # the host sync of a logging step
                    log_marks.append((state.global_step, time.perf_counter() - train_start, waits.data, waits.device))
                    # where the host's time went: waiting for a batch (the data too slow) or for the device
                    logs["train/data_wait_frac"] = (waits.data - interval_waits.data) / max(elapsed, 1e-9)
                    logs["train/device_wait_frac"] = (waits.device - interval_waits.device) / max(elapsed, 1e-9)
                    logs["train/lr"] = scheduler.get_last_lr()[0]
                    logs["train/images_per_sec"] = interval_steps * images_per_step / max(elapsed, 1e-9)
                    logs["train/skipped_images"] = state.skipped_images
                    logs["train/nonfinite_steps"] = state.nonfinite_steps
                    if ema is not None:
                        logs["train/ema_decay"] = ema.cur_decay_value or 0.0
                    accelerator.log(logs, step=state.global_step)
                    progress.set_postfix(loss=f"{logs['train/loss']:.4f}", img_s=f"{logs['train/images_per_sec']:.1f}")
                    interval_start, interval_steps = time.perf_counter(), 0
                    interval_waits = WaitClock(waits.data, waits.device)
                if stop_now:
                    interrupted = stop.signum or signal.SIGTERM  # another rank was signalled
                    break
                if is_ckpt:
                    save_checkpoint(accelerator, model, cfg, state.global_step)
                if is_val:
                    with ema_weights(ema, vae_params):
                        results = validate(accelerator, model, loss_fn, val_lpips, val_dl, state.global_step, cfg)
                    results["step"] = state.global_step
                    logger.info(f"step {state.global_step}: {fmt(results)}")
                if state.global_step >= t.max_train_steps:
                    break
            else:  # the epoch ran to its end
                if not yielded and not state.batches_in_epoch:
                    raise UsageError(f"the training data yielded no batch of {t.train_batch_size} images",
                                     "add images or lower --train_batch_size")  # fmt: skip
                state.batches_in_epoch = 0
        if oom.message is None:
            note_step_flags(accelerator, cfg, state, lagged, 0, keep_process_group)
    if oom.message is not None:  # the failed step's tensors are released with the exception
        x = recon = posterior = loss = logs = batch = None  # noqa: F841
        note_step_flags(accelerator, cfg, state, lagged, 0, keep_process_group)  # the completed steps, for the checkpoint
        progress.close()
        optimizers = [o for o in (optimizer, disc_optimizer) if o is not None]
        stop_after_oom(accelerator, model, optimizers, cfg, state, oom.message, micro_in_window, in_update)
    progress.close()
    train_time = time.perf_counter() - train_start

    if interrupted:
        path = save_checkpoint(accelerator, model, cfg, state.global_step)
        logger.warning(f"{signal.Signals(interrupted).name} received: saved {path} at step {state.global_step}; "
                       "continue with --resume_from_checkpoint latest")  # fmt: skip
        end_run(accelerator, keep_process_group)
        return {"step": state.global_step, "interrupted": int(interrupted), "checkpoint": str(path)}

    if results.get("step") != state.global_step:
        with ema_weights(ema, vae_params):
            results = validate(accelerator, model, loss_fn, val_lpips, val_dl, state.global_step, cfg)
        logger.info(f"final: {fmt(results)}")
    checksums = accelerator.gather(torch.tensor([param_checksum(vae)], dtype=torch.float64, device=accelerator.device))
    metrics = {
        "step": state.global_step,
        "resolution": cfg.data.resolution,
        "data": splits.description,
        "n_images": results["val/n_images"],
        "lpips_net": t.val_lpips_net,
        "ema": t.use_ema,
        "psnr": results["val/psnr"],
        "ssim": results["val/ssim"],
        "lpips": results["val/lpips"],
        "val": {k: v for k, v in results.items() if k.startswith("val/")},
        "latent": results.get("latent"),  # rate, active units, prior gap of the held-out images (eval.latent)
        "initial": {k.split("/", 1)[1]: initial[k] for k in ("val/psnr", "val/ssim", "val/lpips")} if initial else None,
        "skipped_images": state.skipped_images,
        "nonfinite_steps": state.nonfinite_steps,
        "startup_seconds": train_start - called,  # checks, data, model, prepare, resume, first validation
        "train_seconds_this_run": train_time,
        "data_wait_seconds": waits.data,  # of train_seconds_this_run, blocked on the loader
        "device_wait_seconds": waits.device,  # blocked on the device (GPU)
        # (step, seconds into the loop, data wait, device wait) at each logging step: benchmarks/train_throughput.py
        "log_marks": log_marks,
        "num_processes": accelerator.num_processes,
        "mixed_precision": t.mixed_precision,
        "hardware": hardware(accelerator),
        # Trained (non-EMA) weights per rank: equal when gradients are synchronised.
        "param_checksum_per_rank": checksums.cpu().tolist(),
        "param_checksum_initial": initial_checksum,
    }
    if t.checkpointing_steps and state.global_step % t.checkpointing_steps:
        save_checkpoint(accelerator, model, cfg, state.global_step)  # the end is always resumable/extendable
    with ema_weights(ema, vae_params), torch.compiler.set_stance("force_eager"):  # no compiles for these shapes
        if accelerator.is_main_process:  # force_upcast from a measured fp16 decode of held-out latents
            raw_vae = accelerator.unwrap_model(model).vae
            x = torch.stack([val_ds[i]["pixel_values"] for i in range(min(4, len(val_ds)))]).to(accelerator.device)
            with torch.no_grad():
                latents = raw_vae.encode(x).latent_dist.mode()
            check = half_precision_decode_check(raw_vae, half_check_latents(latents))
            raw_vae.register_to_config(force_upcast=needs_force_upcast(check))
            metrics["fp16_decode"] = {**check, "force_upcast": raw_vae.config.force_upcast}
        if t.latent_stats:  # collective: every rank encodes its share of the held-out images
            raw_vae = accelerator.unwrap_model(model).vae
            shard = process_shard(val_ds, accelerator.process_index, accelerator.num_processes)
            stats_dl = torch.utils.data.DataLoader(shard, batch_size=t.validation_batch_size, collate_fn=collate)
            stats = collect_latent_stats(raw_vae, stats_dl, accelerator, sample_posterior=True, seed=t.seed)
            raw_vae.register_to_config(**stats.config_values(t.latent_convention))
            metrics["latent_stats"] = stats.to_json(t.latent_convention)
            logger.info("latent statistics (validation split): " + describe(stats).replace("\n", "; "))
        vae_dir = export(accelerator, model, cfg, metrics)
    logger.info(f"exported {vae_dir}; metrics in {out / 'metrics.json'}")
    if t.push_to_hub and accelerator.is_main_process:
        metrics["push_to_hub"] = push_to_hub(cfg, metrics, vae_dir)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    accelerator.wait_for_everyone()
    end_run(accelerator, keep_process_group)
    return metrics


def fmt(results: dict) -> str:
    """One-line summary of validation results."""
    keys = ("val/psnr", "val/ssim", "val/lpips", "val/n_images")
    line = ", ".join(f"{k.split('/')[1]}={results[k]:.4f}" if isinstance(results[k], float) else f"{k.split('/')[1]}={results[k]}" for k in keys)
    if "latent" in results:
        lat = results["latent"]
        line += (f", rate={lat['rate_bpp']:.4f} bits/px, active channels {lat['active_channels']}/{lat['latent_shape'][0]}"
                 f", prior FD {lat['prior_fd']:.3g}")  # fmt: skip
    return line


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: ``python -m train [--config PRESET|PATH] [--key=value ...] [--debug]``.

    Exit status: 0 done, 1 crash, 2 bad input, 3 out of memory, 128+signal if interrupted (see autoencoder.errors).
    """
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    """The body of ``main`` (errors are reported by ``run_cli``)."""
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    cfg = parse_config(argv)
    n = requested_cpu_processes()
    if n > 1:
        return relaunch_cpu(n, "train", argv)
    metrics = train(cfg)
    if metrics.get("interrupted"):
        return 128 + metrics["interrupted"]
    return 1 if "error" in metrics.get("push_to_hub", {}) else 0
