"""Shared fixtures: the verified assets in ../shared (LPIPS backbones, real images)."""

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch

from autoencoder.folders import MARKER

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SHARED_DIR", REPO.parent / "shared"))


def free_port() -> str:
    """A TCP port free right now, so concurrent multi-process tests (pytest-xdist) don't share 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope="session")
def shared() -> Path:
    """The ../shared folder; its absence is a test failure, not a silent skip."""
    if not (SHARED / "weights" / "lpips").is_dir():
        pytest.fail(f"../shared assets not found at {SHARED}; set SHARED_DIR to the folder holding weights/ and data/")
    return SHARED


@pytest.fixture(scope="session")
def lpips_dir(shared: Path) -> Path:
    """Folder with the torchvision-format LPIPS backbones (features only)."""
    return shared / "weights" / "lpips"


@pytest.fixture(scope="session")
def fid_weights(shared: Path) -> Path:
    """NVlabs' TorchScript of the FID Inception (one of the two files eval.fid accepts)."""
    return shared / "weights" / "fid" / "inception-2015-12-05-torchscript.pt"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items) -> None:
    """``cuda`` tests are skipped, with the reason, on a machine without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA GPU (torch.cuda.is_available() is False here); "
        "run `python -m pytest -m cuda` on a GPU machine (../shared/gpu/README.md)"
    )
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def reset_accelerate() -> None:
    """Forget the Accelerator singletons of an earlier run in this process (as accelerate's own tests do)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# --- shared helpers of the end-to-end tests ------------------------------------------------------

TINY_FAST = ["--config=tiny", "--report_to=none", "--validation_steps=0", "--validate_at_start=false"]


def _metrics(out: Path) -> dict:
    """A run's metrics.json."""
    return json.loads((out / "metrics.json").read_text())


def _run_inprocess(out: Path, lpips_dir: Path, monkeypatch, *args: str) -> int:
    """``python -m train`` in this process on the tiny preset, into ``out``; its exit status."""
    import train.trainer

    monkeypatch.setenv("LPIPS_WEIGHTS", str(lpips_dir))
    reset_accelerate()
    return train.trainer.main([*TINY_FAST, f"--output_dir={out}", *args])


def same(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bit-identical on CPU; on CUDA within 1e-3 relative (cuDNN's backward kernels are not bit-reproducible)."""
    if not torch.cuda.is_available():  # the in-process runs train on the GPU where there is one
        return torch.equal(x, y)
    return torch.allclose(x.double(), y.double(), rtol=1e-3, atol=1e-6)


def deterministic_cudnn(monkeypatch) -> None:
    """Deterministic cuDNN algorithms for resume comparisons on a GPU (no effect on CPU)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


def _nan_at(steps: set[int], monkeypatch) -> None:
    """Make the training loss NaN at the given optimizer steps."""
    from autoencoder.losses import VAELoss

    original = VAELoss.forward

    def poisoned(self, inputs, reconstructions, posterior, step, *args, **kwargs):
        loss, logs = original(self, inputs, reconstructions, posterior, step, *args, **kwargs)
        if kwargs.get("split", "train") == "train" and step in steps:
            loss = loss * float("nan")
        return loss, logs

    monkeypatch.setattr(VAELoss, "forward", poisoned)


def stopped_at(run: Path, step: int, into: Path) -> Path:
    """A run "stopped" after ``step``: a fresh output folder ``into`` holding only ``run``'s checkpoint of that step."""
    (into / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / f"checkpoint-{step}", into / "checkpoints" / f"checkpoint-{step}")
    shutil.copy2(run / MARKER, into / MARKER)  # a run's folder: python -m train writes into it
    return into


def accelerate_launch(module: str, *args: str, processes: int = 2, launcher_args: tuple[str, ...] = ()) -> list[str]:
    """The command ``accelerate launch --num_processes N --cpu [LAUNCHER_ARGS] -m MODULE ARGS`` on a free port."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    launch = ["launch", "--num_processes", str(processes), "--main_process_port", free_port(), "--cpu"]
    return [accelerate, *launch, *launcher_args, "-m", module, *args]


def record_batches(monkeypatch) -> list[tuple[list[int], bool]]:
    """A list that fills with (image indices, gradients synchronised?) of each micro-batch trained on to its end."""
    import train.loop

    seen, original = [], train.loop.train_step

    def recording(run, window, batch):
        result = original(run, window, batch)
        seen.append((batch["index"].tolist(), run.accelerator.sync_gradients))
        return result

    monkeypatch.setattr(train.loop, "train_step", recording)
    return seen


@pytest.fixture
def fresh_accelerator():
    """An Accelerator on the CPU, made after forgetting earlier ones (accelerate keeps process-wide state)."""
    from accelerate import Accelerator

    def make(**kwargs) -> Accelerator:
        reset_accelerate()
        return Accelerator(cpu=True, **kwargs)

    yield make
    reset_accelerate()


def out_of_memory_at(monkeypatch, micro_batch: int) -> None:
    """The training loss raises torch's out-of-memory error at its ``micro_batch``-th call (validation uncounted)."""
    from autoencoder.losses import VAELoss

    real_forward, calls = VAELoss.forward, {"train": 0}

    def forward(self, *args, split="train", **kwargs):
        calls[split] = calls.get(split, 0) + 1
        if split == "train" and calls["train"] == micro_batch:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(self, *args, split=split, **kwargs)

    monkeypatch.setattr(VAELoss, "forward", forward)
