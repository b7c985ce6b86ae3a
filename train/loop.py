"""The training loop: epochs of ``train_step``, then logging, checkpoints and validation at their steps.

The host reads the device's per-step flags one step late (``LaggedFlags``), except at logging,
checkpoint and validation steps, which sync anyway ("exact" steps): no host sync per step.
"""

import itertools
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from accelerate import skip_first_batches
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from autoencoder.errors import CatchOutOfMemory, OutOfMemory, UsageError

from . import checkpoints
from .run import Run
from .step import Window, ema_step, train_step
from .validation import ema_weights, summary, validate

logger = get_logger(__name__)


@dataclass
class WaitClock:
    """Seconds the loop's host thread spent blocked, cumulative: on the loader for a batch, on the device.

    On a GPU the loop waits on the device once per step (``LaggedFlags``): a loop that keeps the GPU
    busy spends its spare host time there, and one starved by its data waits on the loader instead.
    """

    data: float = 0.0
    device: float = 0.0


_END = object()


def wait_clock() -> float:
    """The clock the data wait is read from (seconds; a test replaces it with one that counts events)."""
    return time.perf_counter()


def timed_batches(batches: Iterable, clock: WaitClock) -> Iterator:
    """``batches``' items, adding the time spent waiting for each (iterator start included) to ``clock.data``."""
    start = wait_clock()
    iterator = iter(batches)
    while True:
        batch = next(iterator, _END)
        clock.data += wait_clock() - start
        if batch is _END:
            return
        yield batch
        start = wait_clock()


class StepHealth(NamedTuple):
    """What the host learns of one optimizer step, one step late (``LaggedFlags``)."""

    step: int
    bad: int  # 1: its update was skipped (non-finite loss or gradient)
    nonfinite_steps: int  # skipped updates so far
    consecutive_nonfinite: int  # skipped in a row up to this step


class LaggedFlags:
    """Small per-step device tensors read on the host one step later, so it never waits for the step just queued.

    On CUDA each push starts a non-blocking copy into pinned memory and records an event; ``ready``
    waits only for steps the GPU has (nearly) finished, and adds that wait to ``clock.device``.  On
    the CPU the values are ready at once.
    """

    def __init__(self, clock: WaitClock) -> None:
        self.queue: list[tuple[int, torch.Tensor, torch.cuda.Event | None]] = []
        self.clock = clock

    def push(self, step: int, values: torch.Tensor) -> None:
        """Queue ``values`` (a 1-D device tensor: ``StepHealth``'s fields after ``step``) of optimizer step ``step``."""
        if values.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.queue.append((step, host, event))
        else:
            self.queue.append((step, values.clone(), None))

    def ready(self, keep: int) -> Iterator[StepHealth]:
        """The flags of every queued step except the newest ``keep``, oldest first."""
        while len(self.queue) > keep:
            step, host, event = self.queue.pop(0)
            if event is not None:
                start = time.perf_counter()
                event.synchronize()
                self.clock.device += time.perf_counter() - start
            yield StepHealth(step, *(int(v) for v in host.tolist()))


class StopRequest:
    """Records SIGINT/SIGTERM so the loop can checkpoint and exit at the next step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
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


@dataclass
class StepPlan:
    """What follows optimizer step ``step``; on an ``exact`` step the host reads that step's flags at once."""

    step: int
    log: bool
    checkpoint: bool
    validate: bool
    exact: bool  # a step that syncs anyway (or a single process asked to stop)

    @classmethod
    def after(cls, run: Run, stop: StopRequest) -> "StepPlan":
        """The plan after the run's current ``global_step``."""
        t, step = run.cfg.train, run.state.global_step
        log = step % t.log_every == 0 or step == t.max_train_steps
        ckpt = bool(t.checkpointing_steps) and step % t.checkpointing_steps == 0
        val = bool(t.validation_steps) and step % t.validation_steps == 0
        alone_stopping = run.accelerator.num_processes == 1 and stop.signum is not None
        return cls(step, log, ckpt, val, log or ckpt or val or alone_stopping)


@dataclass
class Loop:
    """The loop's own state: the accumulation window, host clocks, progress bar and the last validation."""

    waits: WaitClock
    flags: LaggedFlags
    progress: tqdm
    window: Window = field(default_factory=Window)
    started: float = field(default_factory=time.perf_counter)
    interval_start: float = field(default_factory=time.perf_counter)
    interval_steps: int = 0
    interval_waits: WaitClock = field(default_factory=WaitClock)  # ``waits`` at the start of the logging interval
    # (step, seconds into the loop, seconds waited on data, on the device) at logging steps, after their host sync
    log_marks: list[tuple[int, float, float, float]] = field(default_factory=list)
    results: dict = field(default_factory=dict)  # the last validation's
    interrupted: int | None = None  # the signal that stopped the run
    seconds: float = 0.0  # the loop's wall time, when it is over

    @classmethod
    def start(cls, run: Run) -> "Loop":
        """A loop continuing from the run's (resumed) state."""
        waits = WaitClock()
        progress = tqdm(
            total=run.cfg.train.max_train_steps,
            initial=run.state.global_step,
            desc="train",
            dynamic_ncols=True,
            disable=not run.accelerator.is_local_main_process,
        )
        return cls(waits, LaggedFlags(waits), progress)


def train_loop(run: Run) -> Loop:
    """Train until ``max_train_steps`` or a stop request; out of memory checkpoints and raises ``OutOfMemory``."""
    loop = Loop.start(run)
    run.model.module.train()
    with StopRequest() as stop, CatchOutOfMemory() as oom:
        while run.state.global_step < run.cfg.train.max_train_steps and not loop.interrupted:
            if run_epoch(run, loop, stop):  # the epoch ran to its end
                run.state.next_epoch()
        check_health(run, loop, keep=0)  # the last steps' flags, still under the signal handlers
    loop.progress.close()
    if oom.message is not None:  # the failed step's tensors were released with the exception
        check_health(run, loop, keep=0)  # the completed steps, before the checkpoint
        stop_after_oom(run, loop.window, oom.message)
    loop.seconds = time.perf_counter() - loop.started
    return loop


def epoch_batches(run: Run, epoch: int) -> Iterable:
    """The batches of ``epoch`` not yet trained on (after a resume, the rest of the epoch)."""
    run.train_set_epoch(epoch)  # data order and augmentation of this epoch
    skip = run.state.batches_in_epoch
    if run.data.streaming:  # a stream cannot seek: re-read and drop the batches already trained on
        return itertools.islice(run.train_dl, skip, None)
    return skip_first_batches(run.train_dl, skip) if skip else run.train_dl


def run_epoch(run: Run, loop: Loop, stop: StopRequest) -> bool:
    """Train on the rest of the run's current epoch; False if it stopped early (max steps or a stop request)."""
    yielded = 0
    for batch in timed_batches(epoch_batches(run, run.state.epoch), loop.waits):
        yielded += 1
        stepped = train_step(run, loop.window, batch)
        run.state.count_batch(batch["num_skipped"])  # counted once trained on: a resume replays the rest
        if stepped is None:  # inside an accumulation window
            continue
        if after_step(run, loop, stop, *stepped):
            return False
    if not yielded and not run.state.batches_in_epoch:
        t = run.cfg.train
        raise UsageError(
            f"the training data yielded no batch of {t.train_batch_size} images",
            "add images or lower --train_batch_size",
        )
    return True


def after_step(run: Run, loop: Loop, stop: StopRequest, logs: dict, bad: torch.Tensor) -> bool:
    """Count the step, update the EMA, then log, checkpoint and validate where due; True to stop the epoch."""
    s = run.state
    loop.window.close()
    s.count_step(bad)
    loop.interval_steps += 1
    loop.progress.update(1)
    if run.ema is not None:
        with loop.window.update():
            ema_step(run.ema, run.vae_params, bad)
    loop.flags.push(s.global_step, torch.stack([bad.long(), s.nonfinite_steps, s.consecutive_nonfinite]))
    plan = StepPlan.after(run, stop)
    check_health(run, loop, keep=0 if plan.exact else 1)
    stop_now = stop_agreed(run, stop, plan.exact)
    if plan.log:
        log_step(run, loop, logs)
    if stop_now:
        loop.interrupted = stop.signum or signal.SIGTERM  # another rank was signalled
        return True
    if plan.checkpoint:
        checkpoints.save(run.accelerator, run.model.module, run.cfg, run.folder, plan.step)
    if plan.validate:
        with ema_weights(run.ema, run.vae_params):
            loop.results = validate(run, plan.step)
        loop.results["step"] = plan.step
        logger.info(f"step {plan.step}: {summary(loop.results)}")
    return plan.step >= run.cfg.train.max_train_steps


def stop_agreed(run: Run, stop: StopRequest, exact: bool) -> bool:
    """Whether to stop now: one process as soon as it is signalled; many only at exact steps, if any rank was."""
    acc = run.accelerator
    if acc.num_processes == 1:
        return stop.signum is not None
    if not exact:  # ranks agree at steps every rank syncs at anyway (SIGTERM is seen within log_every steps)
        return False
    signalled = torch.tensor(float(stop.signum is not None), device=acc.device)
    return bool(acc.reduce(signalled, "sum") > 0)


def log_step(run: Run, loop: Loop, logs: dict) -> None:
    """The logging step's host sync: loss terms, LR, throughput and where the host's time went since the last."""
    elapsed = max(time.perf_counter() - loop.interval_start, 1e-9)
    s, waits, since = run.state, loop.waits, loop.interval_waits
    logs = {k: float(v) for k, v in logs.items()}  # the host sync of a logging step
    health = s.health()
    loop.log_marks.append((s.global_step, time.perf_counter() - loop.started, waits.data, waits.device))
    # where the host's time went: waiting for a batch (the data too slow) or for the device
    logs["train/data_wait_frac"] = (waits.data - since.data) / elapsed
    logs["train/device_wait_frac"] = (waits.device - since.device) / elapsed
    logs["train/lr"] = run.model.scheduler.get_last_lr()[0]
    logs["train/images_per_sec"] = loop.interval_steps * run.images_per_step() / elapsed
    logs["train/skipped_images"] = health["skipped_images"]
    logs["train/nonfinite_steps"] = health["nonfinite_steps"]
    if run.ema is not None:
        logs["train/ema_decay"] = run.ema.cur_decay_value or 0.0
    run.accelerator.log(logs, step=s.global_step)
    loop.progress.set_postfix(loss=f"{logs['train/loss']:.4f}", img_s=f"{logs['train/images_per_sec']:.1f}")
    loop.interval_start, loop.interval_steps = time.perf_counter(), 0
    loop.interval_waits = WaitClock(waits.data, waits.device)


def check_health(run: Run, loop: Loop, keep: int) -> None:
    """Warn of each skipped update among the queued steps (all but the newest ``keep``); stop the run when too many
    came in a row (a usage error: the data or the settings, not a bug)."""
    limit = run.cfg.train.max_consecutive_nonfinite
    for health in loop.flags.ready(keep):
        if not health.bad:
            continue
        logger.warning(
            f"step {health.step}: non-finite loss or gradient, update skipped "
            f"({health.consecutive_nonfinite} in a row, {health.nonfinite_steps} in total)"
        )
        if health.consecutive_nonfinite >= limit:
            last = checkpoints.latest_checkpoint(run.folder.path / "checkpoints")
            raise UsageError(
                f"{health.consecutive_nonfinite} consecutive steps with a non-finite loss or gradient (up to step "
                f"{health.step}); stopping. Last good checkpoint: {last or 'none'}",
                f"resume from it with --resume_from_checkpoint {last or 'PATH'} and e.g. a lower --learning_rate or "
                "--mixed_precision=bf16/no",
            )


def stop_after_oom(run: Run, window: Window, what: str) -> None:
    """Out of memory in the loop: checkpoint the last completed step where that is safe, then raise OutOfMemory.

    Safe means one process (a collective save cannot be joined by ranks stuck in a collective), no update
    half done, and an accumulation-window boundary: without gradient accumulation every micro-batch is its
    own window, and the failed one is not counted as trained on (``TrainingState.count_batch``), so a resume
    replays it.  Inside a longer window the micro-batches already accumulated would be lost to a checkpoint:
    then the last periodic checkpoint (always at a window's end) is the one to resume from.
    """
    t, acc, step = run.cfg.train, run.accelerator, run.state.global_step
    for trained in run.trained():
        trained.optimizer.zero_grad(set_to_none=True)
    if acc.device.type == "cuda":
        torch.cuda.empty_cache()
    last = checkpoints.latest_checkpoint(run.folder.path / "checkpoints")
    saved = None
    fresh = last is None or not last.name.endswith(f"-{step}")
    boundary = t.gradient_accumulation_steps == 1
    if acc.num_processes == 1 and not window.updating and boundary and step > 0 and fresh:
        try:
            saved = checkpoints.save(acc, run.model.module, run.cfg, run.folder, step)
        except Exception as exc:  # noqa: BLE001 - the OOM is the error to report
            logger.error(f"could not write a checkpoint after running out of memory: {exc}")
    last = saved or last
    resume = f"; resume with --resume_from_checkpoint {last}" if last else ""
    precision = t.mixed_precision if t.mixed_precision != "no" else "fp32"
    checkpointing = "on" if run.cfg.model.gradient_checkpointing else "off"
    raise OutOfMemory(
        f"out of memory at step {step + 1} on {acc.device} with --train_batch_size {t.train_batch_size} x "
        f"--gradient_accumulation_steps {t.gradient_accumulation_steps} at --resolution {run.cfg.data.resolution} "
        f"({precision}, gradient checkpointing {checkpointing}; {what[:120]})"
        + (f"; saved {saved} at step {step}" if saved else ""),
        "lower --train_batch_size (raise --gradient_accumulation_steps to keep the global batch), add "
        "--gradient_checkpointing, or use --mixed_precision=bf16" + resume,
    )
