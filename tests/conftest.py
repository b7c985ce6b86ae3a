"""Shared fixtures: the verified assets in ../shared (LPIPS backbones, real images)."""

import os
import socket
from pathlib import Path

import pytest
import torch

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
