"""benchmarks/fid_cifar10.py: a killed run resumes from its saved feature chunks; fid_cifar10_jpeg.py's extra JPEG
round is the stored copy's own encoding, and it reads only complete saved features."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import fid_cifar10  # noqa: E402
import fid_cifar10_jpeg  # noqa: E402

from autoencoder.folders import RunDir  # noqa: E402


class CountingExtractor(torch.nn.Module):
    """Stand-in for the Inception: [N,3,H,W] uint8 -> [N,3] channel means; counts the images it saw."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        return x.float().mean(dim=(2, 3))


def test_a_killed_run_recomputes_only_the_chunks_it_had_not_saved(tmp_path, monkeypatch):
    monkeypatch.setattr(fid_cifar10, "CHUNK", 4)
    x = torch.randint(0, 256, (10, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    folder = RunDir(tmp_path / "run", "python benchmarks/fid_cifar10.py", "--save")
    folder.claim()
    key = {"sha256": "abc", "split": "test", "images": 10}

    first, timing = fid_cifar10.chunked_features(CountingExtractor(), x, 3, folder, key)
    assert timing["computed"] == 10 and sorted(p.name for p in folder.path.glob("features-*")) == [
        "features-test-00000.pt",
        "features-test-00004.pt",
        "features-test-00008.pt",
    ]
    (folder.path / "features-test-00004.pt").unlink()  # the kill came during the second chunk
    extractor = CountingExtractor()
    again, timing = fid_cifar10.chunked_features(extractor, x, 3, folder, key)
    assert (extractor.seen, timing["computed"]) == (4, 4)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(first, x.double().mean(dim=(2, 3)), rtol=0, atol=1e-12)

    other = CountingExtractor()  # other weights: nothing saved is theirs
    fid_cifar10.chunked_features(other, x, 3, folder, {**key, "sha256": "def"})
    assert other.seen == 10
    changed = x.clone()
    changed[5] = 255 - changed[5]  # another copy of the data, one image different: its chunk is recomputed
    fresh = CountingExtractor()
    features, _ = fid_cifar10.chunked_features(fresh, changed, 3, folder, {**key, "sha256": "def"})
    assert fresh.seen == 4 and torch.equal(features, changed.double().mean(dim=(2, 3)))


def test_the_extra_jpeg_round_is_encoded_as_the_stored_copy_was(shared):
    """Quality 75 with 4:2:0 chroma: the quantisation tables and sampling factors of the stored CIFAR-10 JPEGs."""
    import io

    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image, JpegImagePlugin

    rows = pq.read_table(shared / "data" / "cifar10" / "test.parquet", columns=["image"]).column("image")
    for row in rows.to_pylist()[::2000]:
        stored = Image.open(io.BytesIO(row["bytes"]))
        again = Image.open(io.BytesIO(fid_cifar10_jpeg.jpeg_bytes(np.asarray(stored.convert("RGB")), 75)))
        assert again.quantization == stored.quantization
        assert JpegImagePlugin.get_sampling(again) == JpegImagePlugin.get_sampling(stored) == 2  # 4:2:0


def test_saved_features_are_read_only_when_complete(tmp_path, monkeypatch):
    import pytest

    monkeypatch.setattr(fid_cifar10, "CHUNK", 4)
    x = torch.randint(0, 256, (10, 3, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    folder = RunDir(tmp_path / "run", "python benchmarks/fid_cifar10.py", "--save")
    folder.claim()
    whole, _ = fid_cifar10.chunked_features(
        CountingExtractor(), x, 3, folder, {"sha256": "a", "split": "test", "images": 10}
    )
    torch.testing.assert_close(fid_cifar10_jpeg.saved_features(folder.path, "test", "a"), whole, rtol=0, atol=0)
    with pytest.raises(SystemExit, match="no test features on these weights"):
        fid_cifar10_jpeg.saved_features(folder.path, "test", "b")
    (folder.path / "features-test-00004.pt").unlink()
    with pytest.raises(SystemExit, match="incomplete"):
        fid_cifar10_jpeg.saved_features(folder.path, "test", "a")
