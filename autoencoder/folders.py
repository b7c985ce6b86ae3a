"""Output folders: one owner object, ``RunDir``, for which command writes a folder and how it writes it.

* **Ownership.** Every command that fills a folder (``train --output_dir``, ``train.sweep --sweep_dir``,
  ``eval --output_dir``, ``diffusion_bridge encode --output_dir``, ``publish --dry_run/--folder``) writes a
  small marker, ``.written-by.json``, naming itself.  It accepts a folder that is missing, empty, or marked
  by the same command, and refuses anything else with one line: so it never replaces a file it did not
  write (a training run's ``metrics.json``, a user's model folder).
* **One run per folder.** The lock is an operating-system file lock (``filelock``: ``flock`` on Unix)
  held by the main process for the run's lifetime, with the holder's pid, host and start time beside it.
  The kernel drops the lock when its process dies, however it dies (SIGKILL included), so a stale lock
  never blocks the resume of a killed run.
* **Manifests.** A sub-folder written in several steps (a checkpoint) is sealed with ``manifest.json``
  (size and sha256 of every file), written last: a folder with an intact manifest was written whole.
* **Atomic writes and full disks.** Files and sub-folders are written beside their target and renamed
  into place, so a kill leaves the old one or the new one; ``guard`` turns ``ENOSPC``, torch's zip-writer
  failure and unwritable folders into one usage error naming the path, the free space and what complete
  work survives, after removing the partial write.
"""

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import UsageError, check_output_writable, is_disk_full

MARKER = ".written-by.json"
LOCK, HOLDER = ".run.lock", ".run-holder.json"
MANIFEST = "manifest.json"
OURS = (MARKER, LOCK, HOLDER)  # bookkeeping files: a folder holding only these counts as empty


class RunDir:
    """An output folder and the one command that writes it: its marker, lock, manifests and atomic writes.

    ``flag`` names the option the folder came from (for messages); ``only``: the names the command writes
    where it replaces the folder whole (then even its own folder may hold nothing else); ``error``: the
    usage-error type a refusal raises.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        command: str,
        flag: str,
        only: Callable[[str], bool] | None = None,
        error: type[UsageError] = UsageError,
    ):
        self.path, self.command, self.flag = Path(path), command, flag
        self.only, self.error = only, error
        self._lock = None  # filelock.FileLock while this process holds the run's lock

    # --- ownership ---------------------------------------------------------------------------------

    def owner(self) -> str | None:
        """The command named by the folder's marker, or None (no marker, or an unreadable one)."""
        try:
            return json.loads((self.path / MARKER).read_text())["command"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def check(self) -> None:
        """Refuse a folder this command did not write, then make sure it can be written (created if missing)."""
        if self.path.is_dir():
            entries = _entries(self.path)
            owner, fix = self.owner(), f"give {self.flag} an empty or new folder"
            where = f"{self.flag} {str(self.path)!r}"
            if owner is not None and owner != self.command:
                raise self.error(f"{where} was written by `{owner}`, not `{self.command}`; it would overwrite it", fix)
            if owner is None and entries:
                raise self.error(
                    f"{where} holds files {self.command} did not write ({_shown(entries)}); "
                    "it would overwrite or delete them",
                    fix,
                )
            foreign = [p for p in entries if self.only is not None and not self.only(p.name)]
            if foreign:
                raise self.error(
                    f"{where} holds files {self.command} did not write ({_shown(foreign)}); it replaces the "
                    "folder whole and would delete them",
                    fix + " (or move those files out)",
                )
        check_output_writable(self.flag, self.path)  # created if missing

    def claim(self) -> None:
        """Create the folder if needed and record that this command writes it (kept if already there)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.owner() != self.command:
            write_atomic(self.path / MARKER, json.dumps({"command": self.command, "created": _now()}, indent=2))

    # --- one run at a time -------------------------------------------------------------------------

    def used_by_a_run(self) -> bool:
        """Whether a run has held this folder's lock before (its lock file exists)."""
        return (self.path / LOCK).exists()

    def lock(self) -> "RunDir":
        """Take the folder's lock or raise a usage error naming its holder; write the holder file.

        Decided by the lock, not by the holder file: a holder file left by a killed run is only read to name
        who holds a lock that is really held.  Where the filesystem has no ``flock``, filelock falls back to
        a marker file that it breaks when its pid is dead on the same host (README, "One run per folder").
        """
        from filelock import FileLock, Timeout

        if self._lock is not None:
            return self  # already held by this process
        lock = FileLock(str(self.path / LOCK), timeout=0)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise self.error(
                f"{self.flag} {str(self.path)!r} is in use by another run ({self.holder()})",
                f"wait for it to end, or give another {self.flag}",
            ) from None
        self._lock = lock
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "command": self.command}
        (self.path / HOLDER).write_text(json.dumps(holder, indent=2))
        return self

    def holder(self) -> str:
        """'pid 123 on host h, started ...' from the holder file, as far as it can be read."""
        try:
            h = json.loads((self.path / HOLDER).read_text())
            return f"pid {h['pid']} on host {h['host']}, started {h['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown: it has not written its details yet"

    def release(self) -> None:
        """Remove the holder file and drop the lock (safe to call twice, and when never locked)."""
        if self._lock is not None and self._lock.is_locked:
            with contextlib.suppress(OSError):
                (self.path / HOLDER).unlink()
            self._lock.release(force=True)
        self._lock = None

    # --- writes --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def guard(
        self, target: str | os.PathLike, survives: Callable[[], str], then: str = "rerun", partial: Path | None = None
    ) -> Iterator[None]:
        """Turn a failed write of ``target`` (full disk, read-only or unwritable folder) into one usage error,
        after removing ``partial`` (if any).  ``survives()`` says what complete work is left (called only on
        failure), e.g. 'checkpoint-10 is the newest complete checkpoint'; ``then``: what to run once fixed."""
        try:
            yield
        except Exception as exc:
            unwritable = isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
            if not (is_disk_full(exc) or unwritable):
                raise
            if partial is not None:
                remove(Path(partial))
            removed = "; the partial write was removed" if partial is not None else ""
            if unwritable:
                what, fix = f"cannot write {target} ({exc.strerror}{removed})", f"make the folder writable, then {then}"
            else:
                what = f"no space left on the device writing {target} ({free_space(target)} free{removed})"
                fix = f"free space, then {then}"
            raise self.error(f"{what}; {survives()}", fix) from exc

    def write_text(self, name: str, text: str, survives: Callable[[], str] | None = None, then: str = "rerun") -> Path:
        """Write file ``name`` whole (a temporary file and a rename), under ``guard``."""
        path = self.path / name
        kept = survives or (lambda: f"{path} is unchanged")
        with self.guard(path, kept, then):
            write_atomic(path, text)
        return path

    def replace(self, tmp: Path, name: str) -> Path:
        """Put the complete folder ``tmp`` in place of sub-folder ``name`` (see ``swap_in``)."""
        return swap_in(tmp, self.path / name)

    def rewrite(self, fill: Callable[[Path], None]) -> Path:
        """Write the whole folder anew beside it (``fill`` writes into the new folder, already claimed), then swap
        it in: a kill or a full disk leaves the old folder as it was."""
        finish_swap(self.path)  # a command killed between swap_in's two renames
        tmp = self.path.with_name(f".tmp-{self.path.name}")
        remove(tmp)
        kept = f"{self.path} is unchanged" if self.path.is_dir() else "nothing was written"
        with self.guard(tmp, lambda: kept, "rerun", partial=tmp):
            RunDir(tmp, self.command, self.flag).claim()
            fill(tmp)
        return swap_in(tmp, self.path)

    def settle(self, name: str) -> None:
        """Finish a replacement of sub-folder ``name`` that a kill interrupted (see ``finish_swap``)."""
        finish_swap(self.path / name)

    # --- manifests -----------------------------------------------------------------------------------

    @staticmethod
    def seal(folder: Path, **facts) -> None:
        """Write ``manifest.json`` into ``folder``: size and sha256 of every other file, plus ``facts``; last."""
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
        entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files}
        (folder / MANIFEST).write_text(json.dumps({**facts, "files": entries}, indent=2))

    @staticmethod
    def damage(folder: Path, hashes: bool = True) -> str | None:
        """What is wrong with sealed ``folder`` ('optimizer.bin is 0 bytes, 81234 were written'), or None."""
        try:
            files = json.loads((folder / MANIFEST).read_text())["files"]
        except FileNotFoundError:
            return f"{MANIFEST} is missing (the folder was never completed)"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{MANIFEST} is unreadable ({type(exc).__name__})"
        for name, want in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            size = path.stat().st_size
            if size != want["bytes"]:
                return f"{name} is {size} bytes, {want['bytes']} were written"
            if hashes and sha256(path) != want["sha256"]:
                return f"{name} differs from what was written (sha256)"
        return None


def _entries(folder: Path) -> list[Path]:
    """What ``folder`` holds besides our bookkeeping files and write probes."""
    return sorted(p for p in folder.iterdir() if p.name not in OURS and not p.name.startswith(".write-test-"))


def _shown(paths: list[Path]) -> str:
    """At most four names, folders with a trailing slash."""
    names = [p.name + ("/" if p.is_dir() else "") for p in paths]
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _now() -> str:
    """UTC wall-clock time, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# --- the write primitives RunDir is made of ------------------------------------------------------


def free_space(path: str | os.PathLike) -> str:
    """Free space on the filesystem holding ``path`` (or its nearest existing parent), e.g. '12.0 kB'."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(path).free
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if free < 1000 or unit == "TB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1000
    raise AssertionError  # unreachable


def remove(path: Path) -> None:
    """Remove a partial file or folder that we were writing."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def swap_in(tmp: Path, final: Path) -> Path:
    """Replace folder ``final`` by the complete folder ``tmp`` (two renames: the old one is moved aside first)."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)  # atomic on one filesystem
    return final


def finish_swap(final: Path) -> None:
    """After a kill between ``swap_in``'s two renames: put the old folder back if the new one never landed."""
    old = final.with_name(f".old-{final.name}")
    if old.is_dir():
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(final)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: the old file or the new, never half."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise
