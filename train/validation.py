"""Held-out validation during training: ``python -m eval``'s engine with the figures training needs.

PSNR/SSIM/LPIPS and the latent report are the evaluation runner's own metrics (``eval.engine``), so a figure
means the same in a run's ``metrics.json`` and in an evaluation's; the loss terms are added here.
"""

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
from eval.engine import Outputs, Samples, evaluate
from eval.latent import LatentReport, collapse_warning
from eval.metrics import MeanAccumulator, Reconstruction, quantize_01

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


class LossTerms:
    """The loss terms on the held-out images (batch means, one value per image), gathered: an ``eval.engine`` metric."""

    def __init__(self, run: Run, step: int):
        self.run, self.step = run, step
        self.means = MeanAccumulator()

    def update(self, out: Outputs) -> None:
        _, logs = self.run.loss_fn(out.x, out.recon, out.posterior, step=self.step, split="val")
        # batch means repeated per image, so gather_for_metrics drops the last batch's padding consistently
        terms = {k.split("/", 1)[1]: v.expand(len(out.x)) for k, v in logs.items() if k != "val/beta"}
        self.means.update(self.run.accelerator.gather_for_metrics(terms))

    def compute(self) -> dict:
        return self.means.compute()


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # --compile's regions run eager here: no recompiles for eval shapes
def validate(run: Run, step: int) -> dict:
    """Held-out PSNR/SSIM/LPIPS, loss terms and the latent report, over every process; saves the grid on main."""
    acc, cfg = run.accelerator, run.cfg
    vae_model = acc.unwrap_model(run.model.module)
    # Invariant: autocast computes in bf16/fp16, but the master weights never leave fp32.
    assert all(p.dtype == torch.float32 for p in vae_model.parameters()), "master weights must stay fp32"

    def forward(batch: dict) -> Outputs:
        x = batch["pixel_values"]  # [B,3,H,W] in [-1,1]
        with acc.autocast():
            recon, posterior = vae_model(x, sample_posterior=False)  # deterministic: decode the mode
        return Outputs(x, batch["index"], posterior, recon.float())

    metrics = {
        "reconstruction": Reconstruction(acc, run.val_lpips),
        "loss": LossTerms(run, step),
        "latent": LatentReport(acc, seed=step),  # aggregate-posterior samples; the global RNG is untouched
        "grid": Samples(acc, cfg.train.num_grid_images),
    }
    was_training = vae_model.training
    vae_model.eval()
    figures = evaluate(run.val_dl, forward, metrics)
    vae_model.train(was_training)
    assert not figures["loss"].keys() & figures["reconstruction"].keys(), "loss log names must not shadow the metrics"
    results = {f"val/{k}": v for k, v in {**figures["reconstruction"], **figures["loss"]}.items()}
    results.update(latent_results(figures["latent"], step))
    path = Path(cfg.train.output_dir) / "samples" / f"step_{step:07d}.png"
    with agreement(), run.folder.guard(path, lambda: checkpoints.survivors(run.folder.path)):
        if acc.is_main_process:  # a full disk here ends every rank, not only this one
            log_grid(acc, figures["grid"]["inputs"], figures["grid"]["recons"], path, step)
    acc.log({k: v for k, v in results.items() if k.startswith("val/")}, step=step)
    return results


def latent_results(latent: dict, step: int) -> dict:
    """The latent report's per-channel KL, active units and prior gap (none for a single image)."""
    if not latent:  # active units are a variance over images
        return {}
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
    if "val/colour_shift_r" in results:
        line += ", colour shift R/G/B " + "/".join(f"{results[f'val/colour_shift_{c}']:.1f}" for c in "rgb") + " levels"
    if "latent" in results:
        lat = results["latent"]
        line += (
            f", rate={lat['rate_bpp']:.4f} bits/px, active channels {lat['active_channels']}/"
            f"{lat['latent_shape'][0]}, prior FD {lat['prior_fd']:.3g}"
        )
    return line
