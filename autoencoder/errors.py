"""One error type for what the user can fix, and the wrapper that turns it into one line at every entry point.

Every command (``python -m train``, ``eval``, ``diffusion_bridge``, ``train.sweep``) exits with

====  ==========================================================================================
0     done
1     a crash we did not foresee (a bug): one ``error: unexpected ...`` line; rerun with --debug
2     bad input: flags, config, paths, datasets, columns, models, offline resources, unwritable output
3     out of memory (GPU or host): the line names the batch that failed and the remedies
128+N interrupted by signal N (130 for Ctrl-C, 143 for SIGTERM); training checkpoints first
====  ==========================================================================================

and prints ``error: <what is wrong>; <how to fix it>`` on stderr, without a traceback unless
``--debug`` is on the command line or ``AUTOENCODER_DEBUG=1`` is set.
"""

import contextlib
import errno
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_CRASH, EXIT_USAGE, EXIT_OOM = 0, 1, 2, 3
DEBUG_ENV = "AUTOENCODER_DEBUG"


class UsageError(ValueError):
    """Something the user can fix. ``str()`` is ``problem; fix``; a ValueError for library-style callers."""

    exit_code = EXIT_USAGE

    def __init__(self, problem: str, fix: str | None = None):
        self.problem, self.fix = problem, fix
        super().__init__(f"{problem}; {fix}" if fix else problem)


class OutOfMemory(UsageError):
    """The device (or host) ran out of memory; the fix names the flags that lower the footprint."""

    exit_code = EXIT_OOM


class AgreedError(UsageError):
    """Raised on every rank after one rank failed in a collective check (see ``agree``)."""

    def __init__(self, message: str, exit_code: int, rank: int):
        super().__init__(message)
        self.exit_code, self.rank = exit_code, rank


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error of torch (any device) or of the host."""
    import torch

    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), torch.cuda.OutOfMemoryError) if t)
    if isinstance(exc, (MemoryError, *oom_types)):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)  # torch's CPU allocator


class CatchOutOfMemory:
    """Context manager: suppresses an out-of-memory error raised in its block and keeps its first line."""

    def __enter__(self) -> "CatchOutOfMemory":
        self.message: str | None = None
        return self

    def __exit__(self, tp: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or not is_oom(exc):
            return False
        self.message = _first_line(exc)
        return True


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed write for lack of space: ENOSPC, torch's zip writer, safetensors' IoError."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    zip_writer = "inline_container.cc" in text or "PytorchStreamWriter failed" in text  # torch.save's writer
    return zip_writer or "No space left on device" in text or "StorageFull" in text


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library messages run to many lines)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _is_offline(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) says the Hub could not be reached."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen = exc
    while seen is not None:
        if isinstance(seen, (OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError)):
            return True
        text = str(seen).lower()
        if "offline" in text or "couldn't connect" in text or "couldn't reach" in text or "connection" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def translate(exc: BaseException, flag: str | None = None, value: Any = None) -> UsageError | None:
    """Our sentence for a library error we can foresee (naming ``flag``), or None for a real crash."""
    from datasets.data_files import EmptyDatasetError
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError
    from PIL import UnidentifiedImageError

    if isinstance(exc, UsageError):
        return exc
    what = f"{flag} {value!r}" if flag else "a required file"
    if is_oom(exc):
        return OutOfMemory(f"out of memory ({_first_line(exc)[:160]})", "lower the batch size or the resolution")
    if isinstance(exc, EmptyDatasetError):
        return UsageError(
            f"{what} holds no data files (images, .parquet, .csv or .json)",
            f"point {flag or 'the data flag'} at a folder of images or parquet files",
        )
    if isinstance(exc, (RepositoryNotFoundError, DatasetNotFoundError, HFValidationError)):
        return UsageError(
            f"{what} is neither a local path nor a repository on the Hugging Face Hub",
            "check the spelling: a local folder, or a Hub id USER/NAME",
        )
    if isinstance(exc, (OSError, ConnectionError)) and _is_offline(exc):
        dataset = flag == "--dataset_name"
        fetch = f"hf download {value or 'REPO'}{' --repo-type dataset' if dataset else ''} --local-dir DIR"
        return UsageError(
            f"{what} is not on this machine and the Hugging Face Hub cannot be reached (offline or HF_HUB_OFFLINE=1)",
            f"download it where there is network (`{fetch}`) and pass DIR to "
            f"{'--train_data_dir' if dataset else flag or 'the flag'}",
        )
    if is_disk_full(exc):
        return UsageError(
            f"no space left on the device ({getattr(exc, 'filename', None) or _first_line(exc)})",
            "free space or choose another output folder",
        )
    if isinstance(exc, PermissionError):
        return UsageError(f"permission denied: {exc.filename or _first_line(exc)}", "choose a location you can write")
    if (weights := damaged_weights_file(exc)) is not None:
        return damaged_weights(weights, exc)
    if isinstance(exc, UnidentifiedImageError):
        return UsageError(f"unreadable image: {_first_line(exc)}", "remove or re-encode the file")
    if isinstance(exc, FileNotFoundError) and flag:
        return UsageError(f"{what}: {_first_line(exc)}", f"check the path given to {flag}")
    if (
        isinstance(exc, OSError)
        and flag
        and ("config.json" in str(exc) or "not a valid model identifier" in str(exc) or "no file named" in str(exc))
    ):
        return UsageError(
            f"{what} is not a diffusers AutoencoderKL ({_first_line(exc)[:200]})",
            "give a folder written by save_pretrained (config.json + weights), or add --subfolder vae "
            "for a pipeline repository",
        )
    return None


def damaged_weights_file(exc: BaseException) -> str | None:
    """The weights file diffusers could not read (a copy cut short, a corrupt header), named in its OSError."""
    import re

    seen = exc
    while seen is not None:
        found = re.search(r"Unable to load weights from checkpoint file for '([^']+)'", str(seen))
        if isinstance(seen, OSError) and found:
            return found.group(1)
        seen = seen.__cause__ or seen.__context__
    return None


def damaged_weights(path: str | os.PathLike, exc: BaseException) -> UsageError:
    """The usage error for a weights file that cannot be read, naming it and the library's reason."""
    root = exc
    while root.__cause__ or root.__context__:
        root = root.__cause__ or root.__context__
    return UsageError(
        f"the weights file {str(path)!r} is damaged or incomplete: it cannot be read ({_first_line(root)[:160]})",
        "copy or download the model again, or export it again from its run "
        "(python -m train --config OUT/config.yaml --resume_from_checkpoint latest)",
    )


@contextlib.contextmanager
def about(flag: str, value: Any) -> Iterator[None]:
    """Translate foreseeable library errors raised while loading ``value`` into a UsageError naming ``flag``."""
    try:
        yield
    except UsageError:
        raise
    except Exception as exc:
        usage = translate(exc, flag, value)
        if usage is None or isinstance(usage, OutOfMemory):
            raise
        raise usage from exc


def looks_like_path(value: str) -> bool:
    """Whether a model/dataset argument is meant as a local path rather than a Hub id USER/NAME."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or os.sep != "/" and os.sep in value


def check_model_source(flag: str, value: str, subfolder: str | None = None) -> None:
    """Fail in seconds on a model path that does not exist or is not a diffusers VAE folder or checkpoint."""
    path = Path(value).expanduser()
    if path.exists():
        folder = path / (subfolder or "")
        if not path.is_dir():
            raise UsageError(
                f"{flag} {value!r} is a file, not a model folder",
                "give the folder written by save_pretrained (config.json + weights)",
            )
        if not (folder / "config.json").is_file():
            hint = " or add --subfolder vae" if (path / "vae" / "config.json").is_file() else ""
            raise UsageError(
                f"{flag} {value!r} has no config.json" + (f" in {subfolder!r}" if subfolder else ""),
                f"give a diffusers VAE folder (written by save_pretrained) or a training checkpoint{hint}",
            )
        return
    if looks_like_path(value):
        raise UsageError(f"{flag} {value!r} does not exist", "check the path, or give a Hub id USER/NAME")


def check_output_writable(flag: str, path: str | os.PathLike) -> None:
    """Fail at start-up, not after the work, if ``path`` (a folder, created if missing) cannot be written."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {str(path)!r} is a file, not a folder", f"choose another {flag}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as exc:
        raise UsageError(
            f"{flag} {str(path)!r} is not writable ({exc.strerror or exc})", f"choose another {flag}"
        ) from None


def _rank() -> tuple[int, int]:
    """(rank, world size) of this process (from the launcher's environment)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def agree(error: BaseException | None) -> None:
    """Collective: if any rank failed, raise on every rank (the lowest failing rank's message, one printer).

    Called by all ranks at the same point, after checks that contain no collective, so a mistake
    seen by one rank ends every rank at once instead of leaving the others waiting in a collective.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return
    mine = None
    if error is not None:
        usage = translate(error)
        mine = (
            (str(usage), usage.exit_code)
            if usage
            else (f"unexpected {type(error).__name__}: {_first_line(error)}", EXIT_CRASH)
        )
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    failed = [(rank, r) for rank, r in enumerate(everyone) if r is not None]
    if not failed:
        return
    rank, (message, code) = failed[0]
    # Leave together: a rank exiting while its peers still hold gloo/NCCL connections to it can make
    # them abort (SIGABRT) instead of exiting with our status.
    me = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    if error is not None and rank == me:
        raise error  # the first failing rank reports its own error (with its traceback under --debug)
    raise AgreedError(message, code, rank)


@contextlib.contextmanager
def agreement() -> Iterator[None]:
    """Collective: run the block (which must hold no collective) on every rank; if it raised on any rank,
    raise on every rank (see ``agree``).  The block's checks and loads are what bad input can break."""
    error = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - every rank must reach the agreement below
        error = exc
    agree(error)


def report(exc: BaseException, debug: bool) -> int:
    """Print the one-line message of ``exc`` on stderr (once across ranks); return its exit status."""
    rank, world = _rank()
    usage = translate(exc)
    if isinstance(exc, AgreedError):
        if debug:
            print(f"[rank {rank}] stopped because rank {exc.rank} failed", file=sys.stderr)
        return exc.exit_code
    if debug:
        traceback.print_exception(exc)
    where = f"[rank {rank}] " if world > 1 else ""
    if usage is not None:
        print(f"error: {where}{usage}", file=sys.stderr, flush=True)
        return usage.exit_code
    print(
        f"error: {where}unexpected {type(exc).__name__}: {_first_line(exc)}; this is a bug: rerun with --debug "
        "(or AUTOENCODER_DEBUG=1) for the traceback and report it",
        file=sys.stderr,
        flush=True,
    )
    return EXIT_CRASH


def run_cli(main: Callable[[list[str]], int], argv: list[str] | None) -> int:
    """Run an entry point's body with the contract above: one line per error, documented exit statuses."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")
    argv = [a for a in argv if a != "--debug"]
    if debug:
        os.environ[DEBUG_ENV] = "1"  # ranks started by our CPU launcher inherit it
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(
            "error: interrupted (Ctrl-C); a training run continues with --resume_from_checkpoint latest",
            file=sys.stderr,
        )
        return 128 + 2
    except SystemExit:
        raise  # argparse's usage errors (exit 2) and --help
    except BrokenPipeError:  # the reader of our output went away (`| head`): nothing to report to anyone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's documented remedy
        return EXIT_OK
    except Exception as exc:
        return report(exc, debug)
