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
class Window:
    """The accumulation window in progress: its non-finite flag, and whether an update is under way (for OOM)."""

    loss_bad: torch.Tensor | None = None  # 0-dim bool on the device: a non-finite micro-batch loss in this window
    updating: bool = False  # inside an optimizer or EMA update: parameters may be half-updated

    def note_loss(self, loss: torch.Tensor) -> None:
        """Remember a non-finite micro-batch loss until the window's optimizer step (no host sync)."""
        bad = ~torch.isfinite(loss.detach())
        self.loss_bad = bad if self.loss_bad is None else self.loss_bad | bad

    def close(self) -> None:
        """The window's optimizer step is done: the next window starts clean."""
        self.loss_bad = None

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


def train_step(run: "Run", window: Window, batch: dict) -> tuple[dict, torch.Tensor] | None:
    """One micro-batch: forward and backward, and at the end of its accumulation window the guarded updates.

    Returns the step's logs (device tensors) and its flag ``bad`` when an optimizer step was taken,
    None inside an accumulation window.
    """
    acc, step = run.accelerator, run.state.global_step
    x = batch["pixel_values"].to(acc.device, non_blocking=True)  # [B,3,H,W]; prepared loaders already moved it
    use_disc = run.disc is not None and disc_factor_at(step, run.cfg.loss) > 0
    # The generator's adversarial term runs the discriminator outside DDP: a forward through the prepared
    # module would make DDP all-reduce the discriminator's gradients for a loss that never steps it.
    adversary = acc.unwrap_model(run.disc.module) if use_disc else None
    # fp16: the adaptive GAN weight differentiates at the scaler's scale (no fp16 underflow)
    grad_scale = acc.scaler.get_scale() if use_disc and acc.scaler is not None else 1.0
    bad = None
    eq = draw(run.cfg.loss, run.equivariance_scales, run.cfg.train.seed, step)  # host-side, no sync
    model = run.model
    with acc.accumulate(*(t.module for t in run.trained())):
        recon, posterior, *pair = model.module(x, equivariance=eq)  # one forward through DDP; pair: [Scaled] or []
        with acc.autocast():  # LPIPS in the run's precision (its accuracy: tests/test_lpips.py)
            loss, logs = run.loss_fn(
                x,
                recon,
                posterior,
                step,
                discriminator=adversary,
                last_layer=acc.unwrap_model(model.module).last_layer(),
                grad_scale=grad_scale,
                scaled=next(iter(pair), None),
            )
        window.note_loss(loss)
        acc.backward(loss)  # a non-finite loss gives non-finite gradients: skipped in update_vae
        if acc.sync_gradients:
            bad = update_vae(run, window, logs)
        model.optimizer.zero_grad(set_to_none=True)
        if use_disc:  # after the VAE step, so the D step runs on the same (updated) scaler scale
            logs.update(discriminator_step(run, window, x, recon, step, bad))
    return (logs, bad) if acc.sync_gradients else None


def update_vae(run: "Run", window: Window, logs: dict) -> torch.Tensor:
    """Clip and step the VAE's optimizer and schedule; the update is skipped on the device where ``bad``."""
    acc, model = run.accelerator, run.model
    # every rank must take the same decision: the loss flags are summed over ranks (a device
    # collective), the gradient norm is already global after DDP's all-reduce
    loss_bad = window.loss_bad
    if acc.num_processes > 1:
        loss_bad = acc.reduce(loss_bad.float(), "sum") > 0
    grad_norm = clip_vae_gradients(acc, model.module, run.loss_fn, run.cfg, logs)
    # fp16: an overflow is the GradScaler's business (it skips and lowers its scale)
    bad = loss_bad if acc.scaler is not None else loss_bad | ~torch.isfinite(grad_norm)
    with window.update():
        guarded_step(model.optimizer, bad)
        model.scheduler.step()  # a skipped step still advances the LR schedule, as it does global_step
    return bad


def discriminator_step(run: "Run", window: Window, x, recon, step: int, bad: torch.Tensor | None) -> dict:
    """The discriminator's backward and, at the window's end, its update (none where the VAE's was skipped)."""
    acc, disc = run.accelerator, run.disc
    d_loss, d_logs = run.loss_fn.discriminator_loss(x, recon, disc.module, step)
    acc.backward(d_loss)
    if acc.sync_gradients:
        max_norm = run.cfg.train.max_grad_norm or float("inf")
        d_norm = acc.clip_grad_norm_(disc.module.parameters(), max_norm)
        with window.update():
            guarded_step(disc.optimizer, bad | ~torch.isfinite(d_norm))
            disc.scheduler.step()
    disc.optimizer.zero_grad(set_to_none=True)
    return d_logs
