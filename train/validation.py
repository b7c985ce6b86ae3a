"""Held-out validation during training: PSNR/SSIM/LPIPS, loss terms and the latent report, gathered over ranks."""

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers.training_utils import EMAModel
from torchvision.utils import make_grid, save_image

from autoencoder.errors import agreement
from eval.latent import LatentAccumulator, collapse_warning
from eval.metrics import MeanAccumulator, quantize_01, reconstruction_metrics

from . import checkpoints
from .run import Run

logger = get_logger(__name__)


@contextlib.contextmanager
def ema_weights(ema: EMAModel | None, params: list[torch.nn.Parameter]) -> Iterator[None]:
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
def validate(run: Run, step: int) -> dict:
    """Held-out PSNR/SSIM/LPIPS and loss terms, gathered over processes; saves the grid on main."""
    acc, cfg = run.accelerator, run.cfg
    vae_model = acc.unwrap_model(run.model.module)
    # Invariant: autocast computes in bf16/fp16, but the master weights never leave fp32.
    assert all(p.dtype == torch.float32 for p in vae_model.parameters()), "master weights must stay fp32"
    was_training = vae_model.training
    vae_model.eval()
    metrics, latent_acc = MeanAccumulator(), LatentAccumulator()
    generator = torch.Generator().manual_seed(step)  # aggregate-posterior samples; the global RNG is untouched
    grid_inputs, grid_recons = [], []
    for batch in run.val_dl:
        x = batch["pixel_values"]  # [B,3,H,W] in [-1,1]
        with acc.autocast():
            recon, posterior = vae_model(x, sample_posterior=False)  # deterministic: decode the mode
        recon = recon.float()
        _, logs = run.loss_fn(x, recon, posterior, step=step, split="val")
        per_image = reconstruction_metrics(recon, x, run.val_lpips)
        # Batch-mean loss terms repeated per image so padding duplicates are dropped consistently.
        terms = {k.split("/", 1)[1]: v.expand(x.shape[0]) for k, v in logs.items() if k != "val/beta"}
        assert not terms.keys() & per_image.keys(), "loss log names must not shadow the metrics"
        per_image.update(terms)
        metrics.update(acc.gather_for_metrics(per_image))
        mean, logvar = acc.gather_for_metrics((posterior.mean.float(), posterior.logvar.float()))
        latent_acc.update(mean, logvar, tuple(x.shape[-2:]), generator)
        if sum(t.shape[0] for t in grid_inputs) < cfg.train.num_grid_images:
            grid_inputs.append(x)
            grid_recons.append(recon)
    vae_model.train(was_training)
    results = {f"val/{k}": v for k, v in metrics.compute().items()}
    results["val/n_images"] = metrics.count("psnr")
    results.update(latent_results(latent_acc, step))
    path = Path(cfg.train.output_dir) / "samples" / f"step_{step:07d}.png"
    with agreement(), run.folder.guard(path, lambda: checkpoints.survivors(run.folder.path)):
        if acc.is_main_process:  # a full disk here ends every rank, not only this one
            n = cfg.train.num_grid_images
            log_grid(acc, torch.cat(grid_inputs)[:n], torch.cat(grid_recons)[:n], path, step)
    acc.log({k: v for k, v in results.items() if k.startswith("val/")}, step=step)
    return results


def latent_results(latent_acc: LatentAccumulator, step: int) -> dict:
    """The latent report's per-channel KL, active units and prior gap (none for a single image)."""
    if latent_acc.n < 2:  # active units are a variance over images
        return {}
    latent = latent_acc.compute()
    results = {f"val/kl_ch{c}": kl for c, kl in enumerate(latent["kl_per_channel_nats"])}
    results["val/active_channels"] = latent["active_channels"]
    results["val/active_units_fraction"] = latent["active_units"] / latent["units"]
    results["val/prior_fd"] = latent["prior_fd"]
    if warning := collapse_warning(latent):
        logger.warning(f"step {step}: {warning}")
    results["latent"] = latent
    return results


def summary(results: dict) -> str:
    """One-line summary of validation results."""
    parts = []
    for key in ("val/psnr", "val/ssim", "val/lpips", "val/n_images"):
        value = results[key]
        parts.append(f"{key.split('/')[1]}={value:.4f}" if isinstance(value, float) else f"{key.split('/')[1]}={value}")
    line = ", ".join(parts)
    if "latent" in results:
        lat = results["latent"]
        line += (
            f", rate={lat['rate_bpp']:.4f} bits/px, active channels {lat['active_channels']}/"
            f"{lat['latent_shape'][0]}, prior FD {lat['prior_fd']:.3g}"
        )
    return line
