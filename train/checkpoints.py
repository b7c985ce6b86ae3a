"""Checkpoint folders: atomic writes, a total limit, and 'latest' lookup.

A checkpoint is written into ``.tmp-checkpoint-N`` by ``accelerator.save_state`` and renamed to
``checkpoint-N`` only when complete, so a run killed while saving leaves the previous
checkpoints intact and never a half-written one that looks finished.
"""

import re
import shutil
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger

from autoencoder.config import Config, save_config

logger = get_logger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """Completed checkpoints under ``root`` as (step, path), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    """The completed checkpoint with the highest step, or None."""
    found = checkpoint_dirs(root)
    return found[-1][1] if found else None


def tmp_path(root: Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before it is complete."""
    return root / f".tmp-checkpoint-{step}"


def final_path(root: Path, step: int) -> Path:
    """Name of the completed checkpoint for ``step``."""
    return root / f"checkpoint-{step}"


def publish(root: Path, step: int) -> Path:
    """Atomically turn the finished temporary folder into ``checkpoint-step`` (main process only)."""
    tmp, final = tmp_path(root, step), final_path(root, step)
    assert tmp.is_dir(), tmp
    if final.exists():  # re-saving the same step (e.g. after a resume): move the old one aside first
        old = root / f".old-checkpoint-{step}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)  # atomic on one filesystem
    return final


def prune(root: Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest completed checkpoints beyond ``total_limit``; returns what was removed."""
    if total_limit is None:
        return []
    found = checkpoint_dirs(root)
    removed = [p for _, p in found[: max(0, len(found) - total_limit)]]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def clean_incomplete(root: Path) -> list[Path]:
    """Remove leftovers of interrupted saves; an ``.old-`` folder whose replacement never landed is restored."""
    if not root.is_dir():
        return []
    for old in [p for p in root.iterdir() if p.is_dir() and p.name.startswith(".old-checkpoint-")]:
        final = root / old.name.removeprefix(".old-")
        if not final.exists():
            old.rename(final)
    stale = [p for p in root.iterdir() if p.is_dir() and p.name.startswith((".tmp-checkpoint-", ".old-checkpoint-"))]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def save(accelerator: Accelerator, model, cfg: Config, step: int) -> Path:
    """``save_state`` into a temporary folder, then publish it atomically and apply the total limit."""
    root = Path(cfg.train.output_dir) / "checkpoints"
    tmp = tmp_path(root, step)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    final = final_path(root, step)
    if accelerator.is_main_process:
        save_config(cfg, tmp / "training_config.yaml")
        accelerator.unwrap_model(model).vae.save_config(tmp)  # config.json: the folder loads with load_vae
        final = publish(root, step)
        removed = prune(root, cfg.train.checkpoints_total_limit)
        logger.info(f"saved {final}" + (f"; removed {[p.name for p in removed]}" if removed else ""))
    accelerator.wait_for_everyone()
    return final
