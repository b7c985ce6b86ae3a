"""One optimizer step: forward through the prepared model, backward, and the guarded updates.

No host sync: a non-finite loss or gradient sets a device flag ``bad`` that makes the optimizer,
scheduler-independent counters and EMA skip their update on the device (``guarded_step``,
``ema_step``); the host reads the flag one step later (``train.loop.LaggedFlags``).
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from autoencoder.config import Config
from autoencoder.equivariance import draw
from autoencoder.losses import VAELoss, disc_factor_at

if TYPE_CHECKING:
    from .run import Run


@dataclass
class DeviceCounters:
    """The run's health counters as 0-dim device tensors, so counting a step needs no host sync."""

    nonfinite_steps: torch.Tensor  # optimizer steps skipped for a non-finite loss or gradient
    consecutive_nonfinite: torch.Tensor  # skipped in a row up to the last step (0 after a good one)
    skipped_images: torch.Tensor  # unreadable images the loader replaced
    window_bad: torch.Tensor  # bool: a non-finite loss in the current accumulation window

    @classmethod
    def start(cls, nonfinite_steps: int, consecutive_nonfinite: int, skipped_images: int, device) -> "DeviceCounters":
        """Counters continuing from the host's (resumed) values."""
        count = lambda n: torch.tensor(n, dtype=torch.long, device=device)  # noqa: E731
        window_bad = torch.zeros((), dtype=torch.bool, device=device)
        return cls(count(nonfinite_steps), count(consecutive_nonfinite), count(skipped_images), window_bad)

    def add_skipped(self, num_skipped: torch.Tensor) -> None:
        """Count the unreadable images of a batch (a CPU tensor from the collate function)."""
        self.skipped_images.add_(num_skipped.to(self.skipped_images.device, non_blocking=True))

    def note_loss(self, loss: torch.Tensor) -> None:
        """Remember a non-finite micro-batch loss until the window's optimizer step."""
        self.window_bad |= ~torch.isfinite(loss)

    def after_step(self, bad: torch.Tensor) -> None:
        """Count optimizer step ``bad`` (skipped or not) and open the next accumulation window."""
        self.nonfinite_steps.add_(bad)
        self.consecutive_nonfinite.add_(1).mul_(bad)  # +1 if bad, else back to 0
        self.window_bad = torch.zeros_like(self.window_bad)

    def snapshot(self, bad: torch.Tensor) -> torch.Tensor:
        """[bad, nonfinite_steps, consecutive_nonfinite, skipped_images]: the fields of ``train.loop.StepFlags``."""
        return torch.stack([bad.long(), self.nonfinite_steps, self.consecutive_nonfinite, self.skipped_images])


@dataclass
class Window:
    """Where the loop stands inside an optimizer step, for the out-of-memory path (``train.loop.stop_after_oom``)."""

    micro_batches: int = 0  # micro-batches of the current accumulation window entered so far
    updating: bool = False  # inside an optimizer or EMA update: parameters may be half-updated

    @contextlib.contextmanager
    def update(self) -> Iterator[None]:
        """Mark an update in progress; an error inside leaves it marked (no ``finally``), so no checkpoint is saved."""
        self.updating = True
        yield
        self.updating = False


def guarded_step(optimizer, bad: torch.Tensor) -> None:
    """``optimizer.step()`` that changes nothing where the 0-dim device flag ``bad`` is set, with no host sync.

    Stands in for ``optimizer.step()`` guarded by ``if not bad`` (a host sync).  Fused AdamW skips its
    update, and its step count, where its ``found_inf`` attribute is 1: the mechanism torch's GradScaler
    uses, with no public API (tests/test_robustness.py fails if torch changes it).  Under fp16
    accelerate's GradScaler finds non-finite gradients itself.
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
    """``EMAModel.step(params)`` that leaves the EMA unchanged where ``bad`` is set, with no host sync.

    shadow += (1 - decay) * (param - shadow) for trainable parameters (frozen ones never move, so
    their shadows stay equal to them).  diffusers has no skip flag, so this advances EMAModel's public
    fields itself; tests/test_robustness.py checks it against ``EMAModel.step``.
    """
    ema.optimization_step += 1
    decay = ema.get_decay(ema.optimization_step)
    ema.cur_decay_value = decay
    pairs = [(s, p.detach()) for s, p in zip(ema.shadow_params, params) if p.requires_grad]
    shadow = [s for s, _ in pairs]
    delta = torch._foreach_sub([p for _, p in pairs], shadow)
    torch._foreach_mul_(delta, (~bad).to(shadow[0].dtype) * (1.0 - decay))
    torch._foreach_add_(shadow, delta)


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


def train_step(run: "Run", counters: DeviceCounters, window: Window, batch: dict) -> tuple[dict, torch.Tensor] | None:
    """One micro-batch: forward and backward, and at the end of its accumulation window the guarded updates.

    Returns the step's logs (device tensors) and its flag ``bad`` when an optimizer step was taken,
    None inside an accumulation window.
    """
    acc, step = run.accelerator, run.state.global_step
    run.state.batches_in_epoch += 1
    window.micro_batches += 1
    x = batch["pixel_values"].to(acc.device, non_blocking=True)  # [B,3,H,W]; prepared loaders already moved it
    counters.add_skipped(batch["num_skipped"])
    use_disc = run.disc is not None and disc_factor_at(step, run.cfg.loss) > 0
    # fp16: the adaptive GAN weight differentiates at the scaler's scale (no fp16 underflow)
    grad_scale = acc.scaler.get_scale() if use_disc and acc.scaler is not None else 1.0
    bad = None
    eq = draw(run.cfg.loss, run.parts.equivariance_scales, run.cfg.train.seed, step)  # host-side, no sync
    with acc.accumulate(*run.trained_modules()):
        recon, posterior, *pair = run.model(x, equivariance=eq)  # one forward through DDP; pair: [Scaled] or []
        with acc.autocast():  # LPIPS in the run's precision (its accuracy: tests/test_lpips.py)
            loss, logs = run.loss_fn(
                x,
                recon,
                posterior,
                step,
                discriminator=run.raw_disc if use_disc else None,
                last_layer=run.last_layer,
                grad_scale=grad_scale,
                scaled=next(iter(pair), None),
            )
        counters.note_loss(loss)
        acc.backward(loss)  # a non-finite loss gives non-finite gradients: skipped in update_vae
        if acc.sync_gradients:
            bad = update_vae(run, counters, window, logs)
        run.optimizer.zero_grad(set_to_none=True)
        if use_disc:  # after the VAE step, so the D step runs on the same (updated) scaler scale
            logs.update(discriminator_step(run, window, x, recon, step, bad))
    return (logs, bad) if acc.sync_gradients else None


def update_vae(run: "Run", counters: DeviceCounters, window: Window, logs: dict) -> torch.Tensor:
    """Clip and step the VAE's optimizer and schedule; the update is skipped on the device where ``bad``."""
    acc = run.accelerator
    # every rank must take the same decision: the loss flags are summed over ranks (a device
    # collective), the gradient norm is already global after DDP's all-reduce
    loss_bad = counters.window_bad
    if acc.num_processes > 1:
        loss_bad = acc.reduce(loss_bad.float(), "sum") > 0
    grad_norm = clip_vae_gradients(acc, run.model, run.loss_fn, run.cfg, logs)
    # fp16: an overflow is the GradScaler's business (it skips and lowers its scale)
    bad = loss_bad if acc.scaler is not None else loss_bad | ~torch.isfinite(grad_norm)
    with window.update():
        guarded_step(run.optimizer, bad)
        run.scheduler.step()  # a skipped step still advances the LR schedule, as it does global_step
    return bad


def discriminator_step(run: "Run", window: Window, x, recon, step: int, bad: torch.Tensor | None) -> dict:
    """The discriminator's backward and, at the window's end, its update (none where the VAE's was skipped)."""
    acc = run.accelerator
    d_loss, d_logs = run.loss_fn.discriminator_loss(x, recon, run.disc, step)
    acc.backward(d_loss)
    if acc.sync_gradients:
        max_norm = run.cfg.train.max_grad_norm or float("inf")
        d_norm = acc.clip_grad_norm_(run.disc.parameters(), max_norm)
        with window.update():
            guarded_step(run.disc_optimizer, bad | ~torch.isfinite(d_norm))
            run.disc_scheduler.step()
    run.disc_optimizer.zero_grad(set_to_none=True)
    return d_logs
