"""FID between CIFAR-10 train (50,000) and test (10,000): the check that ``eval.fid`` computes FID.

    python benchmarks/fid_cifar10.py --data ../shared/data/cifar10 \
        --fid_weights ../shared/weights/fid/inception-2015-12-05-torchscript.pt

Published: 3.15 (the TF reference implementation gives 3.1508; PyTorch ports 3.145–3.153).  The images go
through the project's one FID extractor (``eval.fid.InceptionFeatures``: torch-fidelity's InceptionV3 and its
TF1-compatible resize to 299) as uint8, and the distance through the project's accumulator.  Prints the FID,
the image counts, the wall time and the img/s of the feature pass; ``--save`` keeps the features.
"""

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def images(parquet: Path, limit: int | None):
    """uint8 [N,3,32,32] of a CIFAR-10 parquet split (the stored JPEG re-encodes, decoded by PIL)."""
    from autoencoder.data import spread

    rows = pq.read_table(parquet, columns=["image"]).column("image").to_pylist()
    rows = [rows[i] for i in spread(len(rows), limit or len(rows))]  # the parquet is sorted by class
    arrays = [np.asarray(Image.open(io.BytesIO(r["bytes"])).convert("RGB")) for r in rows]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@torch.inference_mode()
def features(extractor, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, float]:
    """Pool3 features [N,2048] (float64) and the seconds the pass took."""
    t0, out = time.perf_counter(), []
    for i in range(0, len(x), batch):
        out.append(extractor(x[i : i + batch]).double())
        done = min(i + batch, len(x))
        if done % (20 * batch) == 0 or done == len(x):
            print(f"  {done}/{len(x)} images, {done / (time.perf_counter() - t0):.1f} img/s", file=sys.stderr)
    return torch.cat(out), time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--fid_weights", default=None, help="either accepted file (else $FID_WEIGHTS, the hub cache)")
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--limit", type=int, default=None, help="N images of each split, spread over it (a quick look)")
    p.add_argument("--save", default=None, help="write the features and the result to this folder")
    args = p.parse_args(argv)

    from autoencoder.errors import UsageError
    from autoencoder.folders import RunDir
    from eval.fid import InceptionFeatures, distances, resolve_fid_weights

    folder = RunDir(args.save, "python benchmarks/fid_cifar10.py", "--save") if args.save else None
    try:
        if folder is not None:
            folder.check()  # before the hours of feature passes: never a folder another command or a person filled
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
        sets[split], seconds = features(extractor, x, args.batch_size)
        result[split] = {"images": len(x), "seconds": seconds, "img_per_s": len(x) / seconds}
    result.update(distances(sets["train"], sets["test"]))  # fd = FID on these features
    result["fid"] = result.pop("fd")
    print(json.dumps(result, indent=2))
    if folder is not None:
        folder.claim()
        torch.save({k: v.float() for k, v in sets.items()}, folder.path / "features.pt")
        folder.write_text("result.json", json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
