"""Evaluation speed: the whole ``python -m eval`` run vs. the raw encode+decode of the same images.

    python benchmarks/eval_speed.py --model outputs/vae-cpu-small/vae --train_data_dir ../shared/data/cbsd68

(a) raw: ``AutoencoderKL`` encode (mode) + decode of the evaluation batches, no metrics;
(b) the runner end to end in its own process (loading data and models, PSNR/SSIM/MS-SSIM/LPIPS,
    rFID if its weights are there, fp16/bf16 check, tiling check, report and grid).
Reports wall seconds, img/s and peak memory (max RSS of the process on CPU).
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def raw_pass(model: str, data: str, resolution: int, batch_size: int, num_images) -> dict:
    """Encode + decode every evaluation image with nothing else."""
    from diffusers import AutoencoderKL

    from autoencoder.data import ImageDataset, collate, eval_transform, load_image_source

    ds, col, _ = load_image_source(None, data, resolution=resolution, num_images=num_images)
    loader = torch.utils.data.DataLoader(
        ImageDataset(ds, col, eval_transform(resolution)), batch_size=batch_size, collate_fn=collate
    )
    batches = [b["pixel_values"] for b in loader]  # decode images first: time the model only
    vae = AutoencoderKL.from_pretrained(model).eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for x in batches:
            vae.decode(vae.encode(x).latent_dist.mode())
    seconds = time.perf_counter() - t0
    n = sum(len(x) for x in batches)
    return {"images": n, "seconds": seconds, "img_per_s": n / seconds}


def main(argv=None) -> int:
    """Run both phases and print a table row."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--train_data_dir", required=True)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_images", type=int, default=None)
    p.add_argument("--runner_args", default="", help="extra arguments for python -m eval, e.g. '--fd vgg16'")
    args = p.parse_args(argv)
    raw = raw_pass(args.model, args.train_data_dir, args.resolution, args.batch_size, args.num_images)
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable,
            "-m",
            "eval",
            "--model",
            args.model,
            "--train_data_dir",
            args.train_data_dir,
            "--resolution",
            str(args.resolution),
            "--batch_size",
            str(args.batch_size),
            "--output_dir",
            out,
            *(["--num_images", str(args.num_images)] if args.num_images else []),
            *args.runner_args.split(),
        ]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        metrics = json.loads((Path(out) / "metrics.json").read_text())
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    n = metrics["n_images"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {n} images at {args.resolution} px")
    print("| phase | wall s | img/s | peak RSS MB |\n|---|---|---|---|")
    print(f"| (a) raw encode+decode | {raw['seconds']:.1f} | {raw['img_per_s']:.1f} | – |")
    print(f"| (b) `python -m eval` end to end | {wall:.1f} | {n / wall:.1f} | {peak_mb:.0f} |")
    print(f"rFID: {metrics['rfid_status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
