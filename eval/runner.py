"""Evaluate diffusers VAEs on the same images: ``python -m eval --model DIR [--model DIR ...] ...``.

Every model sees identical inputs (resize shorter side, antialiased bicubic, centre crop) and is
scored with the metric code training validation uses (``eval.metrics``).
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL

from autoencoder.config import DataConfig
from autoencoder.data import ImageDataset, collate, eval_transform, load_local_dataset, load_splits
from autoencoder.lpips_weights import LPIPSWeightsError, build_lpips

from .metrics import MeanAccumulator, reconstruction_metrics


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    """Command-line options of the evaluation runner."""
    p = argparse.ArgumentParser(prog="python -m eval", description=__doc__)
    p.add_argument("--model", action="append", required=True, help="diffusers VAE folder or Hub id (repeatable)")
    p.add_argument("--subfolder", default=None, help="subfolder inside each model repo, e.g. 'vae'")
    p.add_argument("--dataset_name", default=None, help="Hub dataset id")
    p.add_argument("--train_data_dir", default=None, help="local image folder or parquet file(s)")
    p.add_argument("--image_column", default="image")
    p.add_argument("--split", default=None, help="split to evaluate (default: validation/test if present, else train)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--num_images", type=int, default=None, help="evaluate the first N images (default: all)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lpips_net", choices=["alex", "vgg"], default="alex", help="AlexNet as in the LPIPS paper")
    p.add_argument("--lpips_weights", default=None, help="local backbone file/folder (else $LPIPS_WEIGHTS/torchvision)")
    p.add_argument("--output_dir", default="outputs/eval")
    return p.parse_args(argv)


def eval_dataset(args: argparse.Namespace) -> tuple[ImageDataset, str]:
    """The evaluation images under the evaluation transform, and a description of them."""
    import datasets

    if args.dataset_name or args.train_data_dir:
        dd = (
            datasets.load_dataset(args.dataset_name)
            if args.dataset_name
            else load_local_dataset(args.train_data_dir, cache_dir=None)
        )
        split = args.split or next((s for s in ("validation", "test", "train") if s in dd), next(iter(dd)))
        ds = dd[split]
        if args.image_column not in ds.column_names:
            raise SystemExit(f"error: image column {args.image_column!r} not in {ds.column_names}; set --image_column")
        ds = ds.cast_column(args.image_column, datasets.Image(decode=False))
        source = f"{args.dataset_name or args.train_data_dir} [{split}]"
    else:  # the held-out embedded photographs, tiled at the resolution
        ds = load_splits(DataConfig(resolution=args.resolution, num_validation_images=10**9)).validation
        source = "embedded held-out photographs"
    if args.num_images is not None:
        ds = ds.select(range(min(args.num_images, len(ds))))
    return ImageDataset(ds, args.image_column, eval_transform(args.resolution)), source


@torch.no_grad()
def evaluate(accelerator: Accelerator, model_id: str, subfolder: Optional[str], loader, lpips_model) -> dict:
    """Mean per-image PSNR/SSIM/LPIPS of one VAE's deterministic (posterior-mode) reconstructions."""
    vae = AutoencoderKL.from_pretrained(model_id, subfolder=subfolder).to(accelerator.device).eval()
    acc = MeanAccumulator()
    for batch in loader:
        x = batch["pixel_values"].to(accelerator.device)
        recon = vae(x, sample_posterior=False).sample
        acc.update(accelerator.gather_for_metrics(reconstruction_metrics(recon, x, lpips_model)))
    return {**acc.compute(), "n_images": acc.count("psnr")}


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``python -m eval``."""
    args = parse_args(argv)
    accelerator = Accelerator()
    try:
        lpips_model = build_lpips(args.lpips_net, args.lpips_weights).to(accelerator.device)
    except LPIPSWeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dataset, source = eval_dataset(args)
    loader = accelerator.prepare(torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate))
    results = {m: evaluate(accelerator, m, args.subfolder, loader, lpips_model) for m in args.model}
    if accelerator.is_main_process:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"data": source, "resolution": args.resolution, "lpips_net": args.lpips_net, "models": results}
        (out / "metrics.json").write_text(json.dumps(payload, indent=2))
        print(f"{source}, {args.resolution} px, LPIPS-{args.lpips_net}")
        print("| model | PSNR | SSIM | LPIPS | images |\n|---|---|---|---|---|")
        for m, r in results.items():
            print(f"| {m} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['lpips']:.4f} | {r['n_images']} |")
    return 0
