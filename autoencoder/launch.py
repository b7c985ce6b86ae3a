"""Make `accelerate launch --cpu --num_processes N -m PKG` really start N processes (train, eval, diffusion_bridge).

accelerate's simple launcher starts a single process for ``--cpu`` unless it is given an MPI
hostfile (huggingface/accelerate#2741), so a "2-process" CPU run would silently train alone.
When we detect that case we start the N ranks ourselves with ``torch.distributed.run`` (gloo
backend on CPU), exactly as ``accelerate launch --multi_gpu`` would with GPUs.
"""

import os
import sys

import psutil
import torch

MPI_ENV = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _flag(name: str) -> bool:
    """An environment flag in accelerate's spelling (true/1/yes)."""
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def has_accelerator() -> bool:
    """Whether torch sees a GPU or other accelerator."""
    probe = getattr(torch, "accelerator", None)
    return bool(probe.is_available()) if probe is not None else torch.cuda.is_available()


def use_cpu_backend() -> bool:
    """Distributed ranks on a machine without accelerator must ask accelerate for the CPU (gloo) backend.

    Without this, ``accelerate launch --multi_gpu`` or ``torchrun`` on a CPU-only machine would start
    N independent single-process runs instead of one N-process job; and ``accelerate launch --cpu``
    ranks on a GPU machine must stay on the CPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    return _flag("ACCELERATE_USE_CPU") or not has_accelerator()


def requested_cpu_processes() -> int:
    """N if ``accelerate launch --cpu --num_processes N`` started this single process, else 1."""
    if not _flag("ACCELERATE_USE_CPU") or "WORLD_SIZE" in os.environ or any(k in os.environ for k in MPI_ENV):
        return 1
    try:
        cmdline = psutil.Process(os.getppid()).cmdline()
    except psutil.Error:
        return 1
    if not any("accelerate" in part for part in cmdline[:4]) or "launch" not in " ".join(cmdline[:4]):
        return 1
    for i, arg in enumerate(cmdline):
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag and i + 1 < len(cmdline):
                return int(cmdline[i + 1])
            if arg.startswith(flag + "="):
                return int(arg.split("=", 1)[1])
    return 1


def relaunch_cpu(num_processes: int, module: str, argv: list[str]) -> int:
    """Run ``python -m module argv`` as ``num_processes`` CPU ranks under torch's elastic launcher.

    Returns the first failing rank's exit status (our documented codes), so a rank's one-line error
    is not followed by the launcher's own traceback; SIGINT/SIGTERM reach every rank.
    """
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    print(
        f"accelerate launch --cpu started 1 process for --num_processes {num_processes}: starting "
        f"{num_processes} CPU ranks with torch.distributed",
        file=sys.stderr,
    )
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # ranks report their own errors
    os.environ["ACCELERATE_USE_CPU"] = "true"
    # --cpu ranks on a GPU machine: hide the GPUs, or libraries that bind rank r to cuda:r (r >= 1) fail
    # with "invalid device ordinal" on a one-GPU machine
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: N ranks must not each take every core
    endpoint = f"{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', '29500')}"
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=num_processes,
        run_id=str(uuid.uuid4()),
        rdzv_backend="static",
        rdzv_endpoint=endpoint,
        rdzv_configs={"rank": 0},
        max_restarts=0,
        monitor_interval=0.1,
    )
    try:
        elastic_launch(config, sys.executable)("-m", module, *argv)
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        ours = [c for c in codes if c > 0]  # a rank's own status outranks peers stopped by the launcher
        return min(ours) if ours else 128 - min(codes)  # killed by signal N: 128+N as a shell reports it
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0
