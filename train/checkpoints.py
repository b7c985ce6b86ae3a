"""Checkpoint folders: atomic writes, a manifest verified on load, a total limit, and 'latest' lookup.

A checkpoint is written into ``.tmp-checkpoint-N`` by ``accelerator.save_state``; then the main process
writes ``manifest.json`` (every file's size and sha256) last, and renames the folder to ``checkpoint-N``.
So a run killed while saving leaves the previous checkpoints intact and never a half-written one that
looks finished, and a checkpoint damaged later (a copy cut short, a bad disk) is recognised on load.
"""

import contextlib
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger

from autoencoder.config import Config, save_config
from autoencoder.errors import UsageError, agreement
from autoencoder.folders import RunDir, finish_swap, swap_in

logger = get_logger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """Completed checkpoints under ``root`` as (step, path), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def damage(folder: Path, hashes: bool = True) -> str | None:
    """What is wrong with checkpoint ``folder`` ('optimizer.bin is 0 bytes, 81234 were written'), or None."""
    return RunDir.damage(folder, hashes)


def moved_aside(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints a kill left moved aside (``.old-checkpoint-N`` without ``checkpoint-N``), as
    (step, path); the next run's ``clean_incomplete`` puts them back (see ``settled``)."""
    if not root.is_dir():
        return []
    old = [(p, root / p.name.removeprefix(".old-")) for p in root.iterdir() if p.name.startswith(".old-checkpoint-")]
    return [(int(p.name.rsplit("-", 1)[1]), p) for p, final in old if p.is_dir() and not final.exists()]


def settled(path: Path) -> Path:
    """Where checkpoint ``path`` is once ``clean_incomplete`` ran (a moved-aside one is renamed back)."""
    return path.with_name(path.name.removeprefix(".old-"))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest intact checkpoint, or None; damaged newer ones are skipped with a warning naming them."""
    for _, path in sorted(checkpoint_dirs(root) + moved_aside(root), reverse=True):
        problem = damage(path)
        if problem is None:
            return path
        logger.warning(f"skipping damaged checkpoint {path}: {problem}")
    return None


def check_intact(path: Path) -> None:
    """Refuse an explicitly named damaged checkpoint, naming the bad file and the intact alternatives."""
    problem = damage(path)
    if problem is None:
        return
    intact = [p.name for _, p in checkpoint_dirs(path.parent) if p != path and damage(p, hashes=False) is None]
    raise UsageError(
        f"--resume_from_checkpoint {str(path)!r} is damaged: {problem}",
        f"resume from an intact checkpoint ({', '.join(intact)} in {path.parent}) or 'latest'"
        if intact
        else "no intact checkpoint is left beside it; start again without --resume_from_checkpoint",
    )


def survivors(out: Path) -> str:
    """What complete work a failed write leaves: the newest intact checkpoint and the export, if any."""
    found = [p for _, p in checkpoint_dirs(out / "checkpoints") if damage(p, hashes=False) is None]
    ckpt = f"{found[-1]} is the newest complete checkpoint" if found else "no complete checkpoint yet"
    vae = out / "vae"
    return ckpt + (f"; {vae} is a complete export" if (vae / "config.json").is_file() else "")


def tmp_path(root: Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before it is complete."""
    return root / f".tmp-checkpoint-{step}"


def final_path(root: Path, step: int) -> Path:
    """Name of the completed checkpoint for ``step``."""
    return root / f"checkpoint-{step}"


def publish(root: Path, step: int) -> Path:
    """Atomically turn the finished temporary folder into ``checkpoint-step`` (main process only)."""
    tmp = tmp_path(root, step)
    assert tmp.is_dir(), tmp
    return swap_in(tmp, final_path(root, step))  # re-saving a step (after a resume) moves the old one aside


def prune(root: Path, total_limit: int | None, keep: Path | None = None) -> list[Path]:
    """Delete the lowest-step completed checkpoints beyond ``total_limit``, never ``keep`` (the one just written)."""
    if total_limit is None:
        return []
    found = [p for _, p in checkpoint_dirs(root) if p != keep]
    removed = found[: max(0, len(found) + (keep is not None) - total_limit)]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def clean_incomplete(root: Path) -> list[Path]:
    """Remove leftovers of interrupted saves; an ``.old-`` folder whose replacement never landed is restored."""
    if not root.is_dir():
        return []
    for old in [p for p in root.iterdir() if p.is_dir() and p.name.startswith(".old-checkpoint-")]:
        finish_swap(root / old.name.removeprefix(".old-"))
    stale = [p for p in root.iterdir() if p.is_dir() and p.name.startswith((".tmp-checkpoint-", ".old-checkpoint-"))]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


@contextlib.contextmanager
def writing(accelerator: Accelerator, tmp: Path, folder: RunDir) -> Iterator[None]:
    """Collective: run a block (with no collective inside) that writes checkpoint ``tmp``; a full disk on any
    rank removes ``tmp`` and ends every rank with the message of ``RunDir.guard``."""
    fix = "rerun with --resume_from_checkpoint latest (a lower --checkpoints_total_limit keeps fewer)"
    partial = tmp if accelerator.is_main_process else None
    with agreement(), folder.guard(tmp, lambda: survivors(folder.path), fix, partial):
        yield


def save(accelerator: Accelerator, model, cfg: Config, folder: RunDir, step: int) -> Path:
    """``save_state`` into a temporary folder, add the configs and the manifest, publish it atomically, prune.

    Collective.  A full disk on any rank removes the partial folder and ends every rank with one message
    naming what survives (see ``autoencoder.folders.RunDir.guard``).
    """
    root = folder.path / "checkpoints"
    tmp, final = tmp_path(root, step), final_path(root, step)
    try:
        with writing(accelerator, tmp, folder):
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
        with writing(accelerator, tmp, folder):  # save_state holds no collective (DDP)
            accelerator.save_state(str(tmp))
        with writing(accelerator, tmp, folder):
            if accelerator.is_main_process:
                save_config(cfg, tmp / "training_config.yaml")
                accelerator.unwrap_model(model).vae.save_config(tmp)  # config.json: the folder loads with load_vae
                RunDir.seal(tmp, step=step)  # last: a folder with a manifest was written whole
                final = publish(root, step)
                removed = prune(root, cfg.train.checkpoints_total_limit, keep=final)
                logger.info(f"saved {final}" + (f"; removed {[p.name for p in removed]}" if removed else ""))
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # the partial checkpoint; every complete one is untouched
        raise
    return final
