"""Output folders: which command owns one, one run per folder at a time, and writes a full disk cannot half-do.

* **Ownership.** Every command that fills a folder (``train --output_dir``, ``train.sweep --sweep_dir``,
  ``eval --output_dir``, ``diffusion_bridge encode --output_dir``, ``publish --dry_run/--folder``) writes a
  small marker, ``.written-by.json``, naming itself.  It accepts a folder that is missing, empty, or marked
  by the same command, and refuses anything else with one line: so it never replaces a file it did not
  write (a training run's ``metrics.json``, a user's model folder).
* **One run per folder.** ``RunLock`` is an operating-system file lock (``filelock``: ``flock`` on Unix)
  held by the main process for the run's lifetime, with the holder's pid, host and start time beside it.
  The kernel drops the lock when its process dies, however it dies (SIGKILL included), so a stale lock
  never blocks the resume of a killed run.
* **Full disks.** ``write_guard`` turns ``ENOSPC`` and torch's zip-writer failure into one usage error
  naming the path, the free space and what complete work survives, after removing the partial write.
"""

import contextlib
import errno
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import UsageError, is_disk_full

MARKER = ".written-by.json"
LOCK, HOLDER = ".run.lock", ".run-holder.json"
OURS = (MARKER, LOCK, HOLDER)  # bookkeeping files: a folder holding only these counts as empty


def _entries(folder: Path) -> list[Path]:
    """What ``folder`` holds besides our bookkeeping files and write probes."""
    return sorted(p for p in folder.iterdir() if p.name not in OURS and not p.name.startswith(".write-test-"))


def _shown(paths: list[Path]) -> str:
    """At most four names, folders with a trailing slash."""
    names = [p.name + ("/" if p.is_dir() else "") for p in paths]
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def written_by(folder: str | os.PathLike) -> str | None:
    """The command named by ``folder``'s marker, or None (no marker, or an unreadable one)."""
    try:
        return json.loads((Path(folder) / MARKER).read_text())["command"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_folder(
    flag: str,
    folder: str | os.PathLike,
    command: str,
    only: Callable[[str], bool] | None = None,
    legacy: Callable[[Path], bool] | None = None,
    error: type = UsageError,
) -> None:
    """Refuse an output ``folder`` that ``command`` (e.g. 'python -m eval') did not write.

    ``only``: the names ``command`` writes, where it replaces the folder whole (then even its own folder
    may not hold anything else).  ``legacy``: recognises a folder this command wrote before markers existed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    entries = _entries(folder)
    owner = written_by(folder)
    fix = f"give {flag} an empty or new folder"
    if owner is not None and owner != command:
        raise error(f"{flag} {str(folder)!r} was written by `{owner}`, not `{command}`; it would overwrite it", fix)
    if owner is None and entries and not (legacy is not None and legacy(folder)):
        raise error(
            f"{flag} {str(folder)!r} holds files {command} did not write ({_shown(entries)}); "
            "it would overwrite or delete them",
            fix,
        )
    foreign = [p for p in entries if only is not None and not only(p.name)]
    if foreign:
        raise error(
            f"{flag} {str(folder)!r} holds files {command} did not write ({_shown(foreign)}); it replaces "
            "the folder whole and would delete them",
            fix + " (or move those files out)",
        )


def mark_folder(folder: str | os.PathLike, command: str) -> None:
    """Create ``folder`` if needed and record that ``command`` writes it (kept if already there)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if written_by(folder) != command:
        write_atomic(folder / MARKER, json.dumps({"command": command, "created": _now()}, indent=2))


def _now() -> str:
    """UTC wall-clock time, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


class RunLock:
    """The main process's hold on a run's folder for the run's lifetime (an OS file lock, via filelock).

    Decided by the lock, not by the holder file: a holder file left by a killed run is only read to name
    who holds a lock that is really held.  Where the filesystem has no ``flock``, filelock falls back to
    a marker file that it breaks when its pid is dead on the same host (see the README, "One run per folder").
    """

    def __init__(self, folder: str | os.PathLike):
        from filelock import FileLock

        self.folder = Path(folder)
        self.lock = FileLock(str(self.folder / LOCK), timeout=0)

    def acquire(self, flag: str, command: str) -> "RunLock":
        """Take the lock or raise a usage error naming its holder; write the holder file."""
        from filelock import Timeout

        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            raise UsageError(
                f"{flag} {str(self.folder)!r} is in use by another run ({self.holder()})",
                f"wait for it to end, or give another {flag}",
            ) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "command": command}
        (self.folder / HOLDER).write_text(json.dumps(holder, indent=2))
        return self

    def holder(self) -> str:
        """'pid 123 on host h, started ...' from the holder file, as far as it can be read."""
        try:
            h = json.loads((self.folder / HOLDER).read_text())
            return f"pid {h['pid']} on host {h['host']}, started {h['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown: it has not written its details yet"

    def release(self) -> None:
        """Remove the holder file and drop the lock (safe to call twice)."""
        if self.lock.is_locked:
            with contextlib.suppress(OSError):
                (self.folder / HOLDER).unlink()
            self.lock.release(force=True)


# --- full disks ---------------------------------------------------------------------------------


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


@contextlib.contextmanager
def write_guard(
    path: str | os.PathLike, survives: Callable[[], str], then: str = "rerun", partial: Path | None = None
) -> Iterator[None]:
    """Turn a failed write of ``path`` (full disk, read-only or unwritable folder) into one usage error, after
    removing ``partial`` (if any).  ``survives()`` says what complete work is left (called only on failure),
    e.g. 'checkpoint-10 is the newest complete checkpoint'; ``then``: what to run once the cause is fixed.
    """
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
            what, fix = f"cannot write {path} ({exc.strerror}{removed})", f"make the folder writable, then {then}"
        else:
            what, fix = (
                f"no space left on the device writing {path} ({free_space(path)} free{removed})",
                f"free space, then {then}",
            )
        raise UsageError(f"{what}; {survives()}", fix) from exc


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
