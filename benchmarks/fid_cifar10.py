"""FID between CIFAR-10 train (50,000) and test (10,000): the check that ``eval.fid`` computes FID.

    python benchmarks/fid_cifar10.py --data ../shared/data/cifar10 \
        --fid_weights ../shared/weights/fid/inception-2015-12-05-torchscript.pt

Published: 3.15 (the TF reference implementation gives 3.1508; PyTorch ports 3.145–3.153); measured on the
shared JPEG copy: 3.1163 (docs/benchmarks.md, "FID on CIFAR-10").  The images go
through the project's one FID extractor (``eval.fid.InceptionFeatures``: torch-fidelity's InceptionV3 and its
TF1-compatible resize to 299) as uint8, and the distance through the project's accumulator.  Prints the FID,
the image counts, the wall time and the img/s of the feature pass.  ``--save DIR`` keeps the features in chunks
of ``CHUNK`` images as they are computed (``features-<split>-<start>.pt``, each written whole), so a killed run
resumes from its last complete chunk, and the result in ``result.json``.
"""

import argparse
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CHUNK = 5000  # images per saved feature chunk: a kill loses at most this many passes (~6 min on 2 CPU cores)


def images(parquet: Path, limit: int | None):
    """uint8 [N,3,32,32] of a CIFAR-10 parquet split (the stored JPEG re-encodes, decoded by PIL)."""
    from autoencoder.data import spread

    rows = pq.read_table(parquet, columns=["image"]).column("image").to_pylist()
    rows = [rows[i] for i in spread(len(rows), limit or len(rows))]  # the parquet is sorted by class
    arrays = [np.asarray(Image.open(io.BytesIO(r["bytes"])).convert("RGB")) for r in rows]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@torch.inference_mode()
def features(extractor, x: torch.Tensor, batch: int) -> torch.Tensor:
    """Pool3 features [N,2048] (float64) of uint8 images [N,3,H,W]."""
    t0, out = time.perf_counter(), []
    for i in range(0, len(x), batch):
        out.append(extractor(x[i : i + batch]).double())
        done = min(i + batch, len(x))
        if done % (20 * batch) == 0 or done == len(x):
            print(f"  {done}/{len(x)} images, {done / (time.perf_counter() - t0):.1f} img/s", file=sys.stderr)
    return torch.cat(out)


def chunked_features(extractor, x: torch.Tensor, batch: int, folder, key: dict) -> tuple[torch.Tensor, dict]:
    """Features of ``x`` chunk by chunk; with a folder, each chunk is saved and a saved one with the same
    ``key`` (weights, split, count), position and images is loaded instead.  Returns the features and the pass's timing
    (computed images only)."""
    parts, computed, seconds = [], 0, 0.0
    for start in range(0, len(x), CHUNK):
        stop = min(start + CHUNK, len(x))
        images = hashlib.sha256(x[start:stop].contiguous().numpy()).hexdigest()  # another --data: recomputed
        tag = {**key, "start": start, "stop": stop, "images_sha256": images}
        path = folder.path / f"features-{key['split']}-{start:05d}.pt" if folder is not None else None
        if path is not None and path.is_file() and (saved := torch.load(path))["key"] == tag:
            print(f"  {key['split']} {start}-{stop}: from {path.name}", file=sys.stderr)
            parts.append(saved["features"].double())
            continue
        t0 = time.perf_counter()
        parts.append(features(extractor, x[start:stop], batch))
        seconds, computed = seconds + time.perf_counter() - t0, computed + stop - start
        if path is not None:
            tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
            torch.save({"key": tag, "features": parts[-1]}, tmp)
            tmp.replace(path)  # whole or absent: a kill mid-write leaves no half chunk
    timing = {"computed": computed, "seconds": seconds, "img_per_s": computed / seconds if seconds else None}
    return torch.cat(parts), timing


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--fid_weights", default=None, help="either accepted file (else $FID_WEIGHTS, the hub cache)")
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--limit", type=int, default=None, help="N images of each split, spread over it (a quick look)")
    p.add_argument("--save", default=None, help="keep features (resumable) and result.json in this folder")
    args = p.parse_args(argv)

    from autoencoder.errors import UsageError
    from autoencoder.folders import RunDir
    from eval.fid import InceptionFeatures, distances, resolve_fid_weights

    folder = RunDir(args.save, "python benchmarks/fid_cifar10.py", "--save") if args.save else None
    try:
        if folder is not None:
            folder.check()  # before the hours of feature passes: never a folder another command or a person filled
            folder.claim()
            folder.lock()  # one run per folder: two would write the same chunks
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    weights = resolve_fid_weights(args.fid_weights, download=False)
    if weights.path is None:
        print(f"error: {weights.unavailable}", file=sys.stderr)
        return 2
    extractor = InceptionFeatures(weights).eval()
    result = {"weights": weights.file.name, "sha256": weights.file.sha256, "threads": torch.get_num_threads()}
    sets = {}
    for split in ("train", "test"):
        x = images(Path(args.data) / f"{split}.parquet", args.limit)
        key = {"sha256": weights.file.sha256, "split": split, "images": len(x)}
        sets[split], timing = chunked_features(extractor, x, args.batch_size, folder, key)
        result[split] = {"images": len(x), **timing}
    result.update(distances(sets["train"], sets["test"]))  # fd = FID on these features
    result["fid"] = result.pop("fd")
    print(json.dumps(result, indent=2))
    if folder is not None:
        folder.write_text("result.json", json.dumps(result, indent=2))
        folder.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
