"""Evaluation speed: the feature pass, the raw model, and ``python -m eval`` without and with its feature cache.

    python benchmarks/eval_speed.py --model outputs/vae-cifar10-f4/vae --train_data_dir ../shared/data/cifar10 \
        --resolution 32 --num_images 500 --fid_weights ../shared/weights/fid/inception-2015-12-05-torchscript.pt

(a) the FID Inception's feature pass over the evaluation images (the slow part on a CPU): img/s;
(b) raw: ``AutoencoderKL`` encode (mode) + decode of the evaluation batches, no metrics: img/s;
(c) the runner end to end in its own process with an empty feature cache (rFID, KID and iFID on the Inception,
    the latent report, the likelihood bound, the diffusability figures, the checks, report and pictures);
(d) the same command again: the real images' features come from the cache.
Each ``--model`` (give one twice to see the first model is not charged the start-up) reports its encode and
decode img/s, both timed after an untimed warm-up.  Wall seconds and peak memory (max RSS on CPU).
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


def evaluation_batches(data: str, resolution: int, batch_size: int, num_images) -> list[torch.Tensor]:
    """The evaluation images [B,3,R,R] in [-1, 1], decoded first: the timings below are the model's only."""
    from autoencoder.data import ImageDataset, collate, eval_transform, load_image_source

    ds, col, _ = load_image_source(None, data, resolution=resolution, num_images=num_images)
    dataset = ImageDataset(ds, col, eval_transform(resolution))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    return [b["pixel_values"] for b in loader]


@torch.inference_mode()
def timed(step, batches: list[torch.Tensor]) -> dict:
    """Seconds and img/s of ``step`` over every batch (after one untimed batch)."""
    step(batches[0])
    t0 = time.perf_counter()
    for x in batches:
        step(x)
    seconds = time.perf_counter() - t0
    n = sum(len(x) for x in batches)
    return {"images": n, "seconds": seconds, "img_per_s": n / seconds}


def run_eval(args, output_dir: str, cache_dir: str) -> tuple[float, dict]:
    """``python -m eval`` in its own process: (wall seconds, metrics.json)."""
    cmd = [sys.executable, "-m", "eval", *[f"--model={m}" for m in args.model]]
    cmd += [f"--train_data_dir={args.train_data_dir}", f"--resolution={args.resolution}"]
    cmd += [f"--batch_size={args.batch_size}", f"--output_dir={output_dir}", f"--feature_cache_dir={cache_dir}"]
    cmd += [f"--num_images={args.num_images}"] if args.num_images else []
    cmd += [f"--fid_weights={args.fid_weights}"] if args.fid_weights else []
    cmd += args.runner_args.split()
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    return time.perf_counter() - t0, json.loads((Path(output_dir) / "metrics.json").read_text())


def main(argv=None) -> int:
    """Run the four phases and print a table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--train_data_dir", required=True)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_images", type=int, default=None)
    p.add_argument("--fid_weights", default=None)
    p.add_argument("--runner_args", default="", help="extra arguments for python -m eval, e.g. '--fd vgg16'")
    args = p.parse_args(argv)
    from diffusers import AutoencoderKL

    from eval.fid import InceptionFeatures, resolve_fid_weights, to_uint8

    batches = evaluation_batches(args.train_data_dir, args.resolution, args.batch_size, args.num_images)
    weights = resolve_fid_weights(args.fid_weights, download=False)
    features = None
    if weights.path is not None:
        inception = InceptionFeatures(weights).eval()
        features = timed(lambda x: inception(to_uint8(x)), batches)
    vae = AutoencoderKL.from_pretrained(args.model[0]).eval()
    raw = timed(lambda x: vae.decode(vae.encode(x).latent_dist.mode()), batches)
    with tempfile.TemporaryDirectory() as tmp:
        first, metrics = run_eval(args, f"{tmp}/first", f"{tmp}/cache")
        cached, _ = run_eval(args, f"{tmp}/cached", f"{tmp}/cache")
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    n = metrics["n_images"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {n} images at {args.resolution} px")
    print("| phase | wall s | img/s |\n|---|---|---|")
    if features:
        print(f"| (a) Inception feature pass | {features['seconds']:.1f} | {features['img_per_s']:.1f} |")
    print(f"| (b) raw encode+decode | {raw['seconds']:.1f} | {raw['img_per_s']:.1f} |")
    print(f"| (c) `python -m eval`, first | {first:.1f} | {n / first:.1f} |")
    print(f"| (d) `python -m eval`, features cached | {cached:.1f} | {n / cached:.1f} |")
    for i, (model, m) in enumerate(metrics["models"].items()):
        print(
            f"model {i} ({model}): encode {m['encode_img_per_s']:.1f} img/s, decode {m['decode_img_per_s']:.1f} img/s"
        )
    print(f"peak RSS of the runs: {peak_mb:.0f} MB; rFID: {metrics['rfid_status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
