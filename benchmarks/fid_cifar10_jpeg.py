"""How far one more JPEG round moves the CIFAR-10 train/test FID that fid_cifar10.py measures on the JPEG copy.

    python benchmarks/fid_cifar10_jpeg.py --features outputs/fid-cifar10 \
        --fid_weights ../shared/weights/fid/inception-2015-12-05-torchscript.pt

The shared CIFAR-10 copy is not the original PNG-equivalent data but a JPEG re-encode of it: quality 75 with
4:2:0 chroma subsampling (PIL's defaults; read from its quantisation tables and sampling factors, checked in
tests/test_fid_cifar10.py).  The published 3.15 is FID between the originals.  This script re-encodes the test
split once more the same way, takes its Inception features, and prints, with the train and test features that
``fid_cifar10.py --save`` kept: FID(train, test) as stored, FID(train, test re-encoded) and FID(test, test
re-encoded).  Nothing is written.
"""

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fid_cifar10  # noqa: E402

REPO = fid_cifar10.REPO


def jpeg_bytes(image: np.ndarray, quality: int) -> bytes:
    """One uint8 [H,W,3] image as JPEG (PIL: ``quality``, 4:2:0 chroma subsampling)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling="4:2:0")
    return buffer.getvalue()


def reencode(x: torch.Tensor, quality: int) -> torch.Tensor:
    """uint8 [N,3,H,W] through one JPEG round (``jpeg_bytes``), decoded back."""
    out = [
        np.asarray(Image.open(io.BytesIO(jpeg_bytes(im, quality))).convert("RGB"))
        for im in x.permute(0, 2, 3, 1).numpy()
    ]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def saved_features(folder: Path, split: str, sha256: str) -> torch.Tensor:
    """The [N,2048] features of ``split`` that fid_cifar10.py --save kept, checked whole and on these weights."""
    parts = sorted(folder.glob(f"features-{split}-*.pt"))
    saved = [torch.load(p) for p in parts]
    if not saved or any(s["key"]["sha256"] != sha256 for s in saved):
        raise SystemExit(f"error: {folder} holds no {split} features on these weights; run fid_cifar10.py --save")
    stops = [s["key"]["start"] for s in saved[1:]] + [saved[-1]["key"]["images"]]
    if [s["key"]["stop"] for s in saved] != stops or saved[0]["key"]["start"] != 0:
        raise SystemExit(f"error: the {split} features in {folder} are incomplete; rerun fid_cifar10.py --save")
    return torch.cat([s["features"].double() for s in saved])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", required=True, help="the --save folder of a finished fid_cifar10.py run")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--fid_weights", default=None, help="either accepted file (else $FID_WEIGHTS, the hub cache)")
    p.add_argument("--quality", type=int, default=75, help="JPEG quality of the extra round (the copy's own: 75)")
    p.add_argument("--batch_size", type=int, default=100)
    args = p.parse_args(argv)

    from eval.fid import InceptionFeatures, frechet_distance, resolve_fid_weights

    weights = resolve_fid_weights(args.fid_weights, download=False)
    if weights.path is None:
        print(f"error: {weights.unavailable}", file=sys.stderr)
        return 2
    train, test = (saved_features(Path(args.features), s, weights.file.sha256) for s in ("train", "test"))
    x = reencode(fid_cifar10.images(Path(args.data) / "test.parquet", len(test)), args.quality)
    t0 = time.perf_counter()
    again = fid_cifar10.features(InceptionFeatures(weights).eval(), x, args.batch_size)
    result = {
        "quality": args.quality,
        "fid_train_test": frechet_distance(train, test),
        "fid_train_test_reencoded": frechet_distance(train, again),
        "fid_test_test_reencoded": frechet_distance(test, again),
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
