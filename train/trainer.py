"""The Accelerate training loop for a diffusers ``AutoencoderKL``: ``python -m train``.

Standard shape: ``prepare`` once (``train.run.build``); forward through the *prepared* model inside
``accelerator.accumulate``, clip under ``sync_gradients`` (``train.step``); ``save_state`` /
``load_state`` + ``skip_first_batches`` to resume (``train.checkpoints``, ``train.loop``);
``gather_for_metrics`` for validation (``train.validation``); ``unwrap_model(...).vae.save_pretrained``
to export (fp32, safetensors; ``train.finish``).
"""

import time

from accelerate.logging import get_logger

from autoencoder.config import Config, help_text, parse_config
from autoencoder.errors import UsageError, run_cli
from autoencoder.launch import relaunch_cpu, requested_cpu_processes

from .finish import finish, interrupted
from .loop import train_loop
from .run import build, make_accelerator, resume
from .validation import ema_weights, summary, validate

logger = get_logger(__name__)


def train(cfg: Config) -> dict:
    """Run training as configured; returns the metrics written to metrics.json.

    On SIGINT/SIGTERM it checkpoints and returns early with ``metrics["interrupted"]`` set to the
    signal number.
    """
    called = time.perf_counter()
    run = build(cfg, make_accelerator(cfg), called)
    try:  # the output folder's lock is held until the end, however it ends
        resume(run)
        initial = {}
        if cfg.train.validate_at_start and run.state.global_step == 0:
            with ema_weights(run.ema, run.vae_params):
                initial = validate(run, 0)
            logger.info(f"untrained: {summary(initial)}")
        loop = train_loop(run)
        if loop.interrupted:
            return interrupted(run, loop)
        return finish(run, loop, initial)
    except UsageError:  # stopped for what the user can fix (e.g. repeated non-finite steps): keep its logs
        for tracker in run.accelerator.trackers:
            tracker.finish()
        raise
    finally:
        run.folder.release()


def main(argv: list[str] | None = None) -> int:
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
