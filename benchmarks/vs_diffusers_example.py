"""Our training loop against diffusers' research example, on the same model, data, batch, precision and steps.

    python benchmarks/vs_diffusers_example.py --example PATH/train_autoencoderkl.py --train_data_dir PHOTOS \
        [--config sd-f8c4 --resolution 256 --batch_size 8 --mixed_precision bf16 --steps 50 --warmup 10 --compile]

The example is not a dependency.  Get it from diffusers at the commit this was measured with:

    https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/examples/research_projects/autoencoderkl/train_autoencoderkl.py

(last changed in c9c82173068d628b0569ccb6d656adfa37a389e8); it imports ``taming`` (pip install
taming-transformers) and ``lpips``.  Each contender runs in its own process: the example as published
(its ``main``, its loss, its weight casting), and ``python -m train`` with the given config.  Both get
the same ``AutoencoderKL`` config (written from ``--config``'s preset), the same image folder, batch,
resolution, precision, learning rate, loss weights (L1 + LPIPS + KL; the discriminator's start),
loader workers and number of steps.  Each is timed by the same clock: its training progress bar
(``tqdm.auto``) is wrapped so that the step counter reaching ``--warmup`` and ``--warmup + --steps``
synchronises the GPU and reads the time; img/s = batch x steps / that interval, so start-up,
compilation, validation and export are outside it.  "s to step W" is the time from the
contender's start (after the interpreter's imports of this script) to its first timed step:
start-up and the warm-up steps, compilation included.

Offline, the example's LPIPS (``lpips.LPIPS(net="vgg")``) cannot download torchvision's VGG-16; with
``--lpips_weights`` (or ``$LPIPS_WEIGHTS``) its ``torchvision.models.vgg16`` is given the verified
ImageNet features from that file (the classifier, which LPIPS does not use, stays random).  The
example's experiment tracker is switched off (``init_trackers`` does nothing), as ours runs with
``--report_to=none``; its TensorBoard set-up fails on its own list-valued ``--validation_image``.
"""

import argparse
import json
import os
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--example", required=True, help="path to diffusers' train_autoencoderkl.py")
    p.add_argument("--train_data_dir", required=True, help="a folder of images, read by both")
    p.add_argument("--config", default="sd-f8c4", help="our preset/YAML: the model and loss weights both use")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="bf16")
    p.add_argument("--steps", type=int, default=50, help="timed steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens here)")
    p.add_argument("--workers", type=int, default=None, help="loader workers for both (default: our 'auto')")
    p.add_argument(
        "--compile", action="store_true", help="also time ours with torch.compile (the example has no such option)"
    )
    p.add_argument(
        "--contenders",
        default=None,
        help="comma-separated subset of example,ours,ours_compile (default: all that apply)",
    )
    p.add_argument("--lpips_weights", default=os.environ.get("LPIPS_WEIGHTS"), help="folder/file of LPIPS backbones")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--child", choices=["example", "ours"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--child_args", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def timed_progress_bar(marks: dict, first: int, last: int):
    """``tqdm.auto.tqdm`` whose training bar (desc 'Steps' or 'train') records the time at steps first and last."""
    from tqdm.auto import tqdm

    class Timed(tqdm):
        def update(self, n=1):
            result = super().update(n)
            if self.desc in ("Steps", "train") and self.n in (first, last) and self.n not in marks:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                marks[self.n] = time.perf_counter()
            return result

    return Timed


def offline_vgg16(weights: str) -> None:
    """Give ``torchvision.models.vgg16`` the verified ImageNet features (for the example's ``lpips.LPIPS``)."""
    import torchvision.models as tvm

    from autoencoder.lpips_weights import backbone_features

    real = tvm.vgg16
    features = {k.removeprefix("features."): v for k, v in backbone_features("vgg", weights).items()}

    def vgg16(*args, **kwargs):
        model = real(weights=None)
        model.features.load_state_dict(features)
        return model

    tvm.vgg16 = vgg16


def child(args) -> int:
    """Run one contender in this process with the timed progress bar; print its JSON line."""
    import tqdm.auto

    started = time.perf_counter()
    spec = json.loads(args.child_args)
    marks: dict = {}
    crashed = None
    tqdm.auto.tqdm = timed_progress_bar(marks, spec["first"], spec["last"])
    if args.child == "example":
        if args.lpips_weights:
            offline_vgg16(args.lpips_weights)
        # no experiment tracker, as ours runs with --report_to=none (and its TensorBoard init rejects its
        # own list-valued --validation_image in the hparams)
        from accelerate import Accelerator

        Accelerator.init_trackers = lambda self, *a, **k: None
        sys.argv = [args.example, *spec["argv"]]
        try:
            runpy.run_path(args.example, run_name="__main__")
        except Exception as exc:  # its final validation loads the export on the CPU and feeds it CUDA tensors
            if len(marks) < 2:
                raise
            crashed = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    else:
        from train.trainer import main as train_main

        assert train_main(spec["argv"]) == 0
    seconds = marks[spec["last"]] - marks[spec["first"]]
    steps = spec["last"] - spec["first"]
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")
    print(
        json.dumps(
            {
                "img_per_s": args.batch_size * steps / seconds,
                "seconds_per_step": seconds / steps,
                "peak_memory_mb": peak,
                "seconds_to_first_timed_step": marks[spec["first"]] - started,
                "crashed_after_the_timed_steps": crashed,
            }
        )
    )
    return 0


def contender_argv(args, cfg, model_dir: Path, out: Path, workers: int) -> dict:
    """Both command lines, from one config: the same model, data, batch, precision, LR, loss weights and steps."""
    total = args.warmup + args.steps
    images = sorted(p for p in Path(args.train_data_dir).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    # the example's loader keeps a last partial batch (no drop_last): give it whole batches only, as ours has
    whole = len(images) // args.batch_size * args.batch_size
    example = [
        "--model_config_name_or_path",
        str(model_dir),
        "--train_data_dir",
        args.train_data_dir,
        "--output_dir",
        str(out / "example"),
        "--resolution",
        str(args.resolution),
        "--train_batch_size",
        str(args.batch_size),
        "--max_train_steps",
        str(total),
        "--mixed_precision",
        args.mixed_precision,
        "--learning_rate",
        str(cfg.train.learning_rate),
        "--rec_loss",
        cfg.loss.rec_loss,
        "--perceptual_scale",
        str(cfg.loss.lpips_weight),
        "--kl_scale",
        str(cfg.loss.kl_weight),
        "--disc_start",
        str(cfg.loss.disc_start),
        "--dataloader_num_workers",
        str(workers),
        "--validation_image",
        str(images[0]),
        "--max_train_samples",
        str(whole),
        "--validation_steps",
        str(10**9),
        "--checkpointing_steps",
        str(10**9),
        "--seed",
        "0",
    ]
    ours = [
        f"--config={args.config}",
        f"--train_data_dir={args.train_data_dir}",
        f"--output_dir={out / 'ours'}",
        f"--resolution={args.resolution}",
        f"--train_batch_size={args.batch_size}",
        f"--max_train_steps={total}",
        f"--mixed_precision={args.mixed_precision}",
        f"--dataloader_num_workers={workers}",
        "--validation_steps=0",
        "--validate_at_start=false",
        "--checkpointing_steps=0",
        "--latent_stats=false",
        "--report_to=none",
        f"--log_every={10**9}",
        "--scale_lr=false",
    ]
    if args.lpips_weights:
        ours.append(f"--lpips_weights={args.lpips_weights}")
    return {
        "example": example,
        "ours": ours,
        "ours_compile": [*ours, "--compile=true"],
        "first": args.warmup,
        "last": total,
    }


def run_child(args, which: str, spec: dict) -> dict:
    """One contender in a fresh interpreter."""
    cmd = [
        sys.executable,
        __file__,
        f"--child={which.split('_')[0]}",
        f"--child_args={json.dumps({**spec, 'argv': spec[which]})}",
        f"--example={args.example}",
        f"--train_data_dir={args.train_data_dir}",
        f"--batch_size={args.batch_size}",
    ]
    if args.lpips_weights:
        cmd.append(f"--lpips_weights={args.lpips_weights}")
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_MININTERVAL": "5"})
    if result.returncode != 0:
        raise SystemExit(f"{which} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    from autoencoder.config import parse_config
    from autoencoder.data import loader_workers
    from autoencoder.models import build_vae

    cfg = parse_config([f"--config={args.config}", f"--resolution={args.resolution}"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workers = args.workers if args.workers is not None else loader_workers("auto", device, 1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_vae(cfg.model).save_config(model_dir)  # the same AutoencoderKL config for both
        spec = contender_argv(args, cfg, model_dir, Path(tmp), workers)
        where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
        print(
            f"{args.config} at {args.resolution} px, batch {args.batch_size}, {args.mixed_precision}, {args.steps} "
            f"timed steps after {args.warmup}, {workers} loader workers each, data {args.train_data_dir}, on {where}"
        )
        print(
            f"| loop | img/s | s/step | peak memory (MB) | x example | s to step {args.warmup} |\n"
            "|---|---|---|---|---|---|",
            flush=True,
        )
        names = {
            "example": "diffusers train_autoencoderkl.py",
            "ours": "python -m train",
            "ours_compile": "python -m train --compile",
        }
        results: dict = {}
        default = ("example", "ours", "ours_compile") if args.compile else ("example", "ours")
        for which in args.contenders.split(",") if args.contenders else default:
            r = results[which] = run_child(args, which, spec)  # each row as soon as it is measured
            note = (
                f" (then crashed: {r['crashed_after_the_timed_steps']})"
                if r.get("crashed_after_the_timed_steps")
                else ""
            )
            ratio = f"{r['img_per_s'] / results['example']['img_per_s']:.2f}" if "example" in results else "–"
            print(
                f"| {names[which]}{note} | {r['img_per_s']:.1f} | {r['seconds_per_step']:.4f} | "
                f"{r['peak_memory_mb']:.0f} | {ratio} | {r['seconds_to_first_timed_step']:.0f} |",
                flush=True,
            )
            if args.json:
                Path(args.json).write_text(
                    json.dumps({"args": vars(args), "device": where, "results": results}, indent=2)
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
