"""A diffusion probe: how well does a small diffusion model learn on a VAE's latents, in a fixed number of steps?

    python benchmarks/diffusion_probe.py --vae outputs/vae-cifar10-f4/vae --seeds 0,1,2 --steps 3000 \\
        --output_dir outputs/probe-base [--checkerboard] [--fid_weights FILE]

For each seed: a class-conditional DiT (fixed size, below) is trained with the DDPM ε objective for ``--steps``
optimizer steps on the VAE's CIFAR-10 training latents, normalised with the VAE's own statistics (the sd3
convention: (z − shift_factor)·scaling_factor, from ``python -m diffusion_bridge stats --write``); then
``--num_samples`` images are sampled (DDIM, 50 steps, no guidance, classes in turn), decoded with the VAE, and
scored against the CIFAR-10 test set (10,000 images) on the FID Inception: **KID** (unbiased at this size: the
primary figure) and FID (biased at 2,000 samples: compare only at equal counts).  Two floors per VAE: real
training images (sampling noise alone) and the VAE's reconstructions of them (what the decoder allows).

``--checkerboard`` runs the control with the same information: the normalised latents multiplied by a ±1
checkerboard, (−1)^(i+j)·u, undone before decoding (identical reconstructions, power moved to the highest
spatial frequencies).  The DiT patch size is 1: a 2×2 patch embedding could undo a fixed sign pattern inside its
patch exactly, and the control would control nothing.

Fixed DiT: patch 1 over the 8×8×4 latent (64 tokens), 6 layers, 4 heads × 64 (width 256), AdamW lr 3e-4 (100-step
warm-up), batch 128, EMA 0.999, DDPM linear betas over 1,000 steps.  Seeded: the DiT's initialisation, its
batches, noise and timesteps, and the sampler's noise come from the seed; a run with the same seed and budget
gives the same samples.  Writes ``results.json``, ``results.md`` and ``samples.png`` (the first seed) to
--output_dir, refusing a folder another command or a person filled.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DIT = dict(patch_size=1, num_layers=6, num_attention_heads=4, attention_head_dim=64)  # the fixed probe size
BATCH, LEARNING_RATE, WARMUP, EMA_DECAY, SAMPLING_STEPS = 128, 3e-4, 100, 0.999, 50
PROBE = "python benchmarks/diffusion_probe.py"  # the command named in its output folder's marker


def parse_args(argv):
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True, help="a diffusers VAE folder with latent statistics (stats --write)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated: one DiT per seed")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps of each DiT (the budget)")
    p.add_argument("--num_samples", type=int, default=2000, help="generated images scored per seed")
    p.add_argument("--checkerboard", action="store_true", help="the control: latents times a ±1 checkerboard")
    p.add_argument("--cifar_dir", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--num_train_images", type=int, default=50000, help="training latents (N spread over the split)")
    p.add_argument(
        "--cache_dir", default=None, help="latent cache (default OUTPUT_DIR/latent-cache; resumed by the same VAE only)"
    )
    p.add_argument("--fid_weights", default=None, help="FID Inception weights (else $FID_WEIGHTS, the hub cache)")
    p.add_argument("--batch_size", type=int, default=BATCH)
    return p.parse_args(argv)


def board(latents: torch.Tensor) -> torch.Tensor:
    """(−1)^(i+j) over the last two dimensions of ``latents``: multiplying by it twice gives them back exactly."""
    from eval.diffusability import checkerboard

    return checkerboard(*latents.shape[-2:]).to(latents)


def training_latents(args) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised training latents [N,4,8,8] and labels: ``diffusion_bridge encode`` (sd3 convention), cached."""
    from diffusion_bridge.cache import load_latent_cache
    from diffusion_bridge.cli import main as bridge_main

    cache = Path(args.cache_dir or Path(args.output_dir) / "latent-cache")
    argv = ["encode", f"--model={args.vae}", f"--train_data_dir={Path(args.cifar_dir) / 'train.parquet'}"]
    argv += ["--resolution=32", f"--num_images={args.num_train_images}", "--batch_size=250", "--shard_size=5000"]
    argv += ["--convention=sd3", "--seed=0", f"--output_dir={cache}"]
    code = bridge_main(argv)  # a cache another VAE or setting wrote is refused (its error line is printed)
    if code:
        raise SystemExit(code)
    rows = load_latent_cache(cache)[:]
    latents = rows["latents"]
    return (latents * board(latents) if args.checkerboard else latents), rows["label"].long()


def build_dit(seed: int):
    """The fixed-size class-conditional DiT, initialised from ``seed``."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(in_channels=4, out_channels=4, sample_size=8, num_embeds_ada_norm=10, **DIT)


def train_dit(latents: torch.Tensor, labels: torch.Tensor, seed: int, args) -> tuple:
    """``args.steps`` DDPM ε-prediction steps; the EMA weights, the schedule and what the training did."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    dit = build_dit(seed)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(dit.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / WARMUP))
    ema = EMAModel(dit.parameters(), decay=EMA_DECAY, use_ema_warmup=True)
    g = torch.Generator().manual_seed(seed)
    losses, wall, cpu = [], time.perf_counter(), time.process_time()
    dit.train()
    for step in range(args.steps):
        idx = torch.randint(len(latents), (args.batch_size,), generator=g)
        x0, y = latents[idx], labels[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (len(x0),), generator=g)
        loss = torch.nn.functional.mse_loss(
            dit(scheduler.add_noise(x0, noise, t), timestep=t, class_labels=y).sample, noise
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        warmup.step()
        ema.step(dit.parameters())
        losses.append(loss.item())
        if (step + 1) % 500 == 0:
            print(f"seed {seed} step {step + 1}: loss {sum(losses[-500:]) / 500:.4f}", file=sys.stderr, flush=True)
    ema.copy_to(dit.parameters())
    info = {"steps": args.steps, "final_loss_mean_500": sum(losses[-500:]) / min(500, len(losses))}
    info.update(seconds=time.perf_counter() - wall, cpu_seconds=time.process_time() - cpu)
    return dit.eval(), scheduler, info


@torch.no_grad()
def sample(dit, ddpm, vae, seed: int, args) -> torch.Tensor:
    """``num_samples`` images [N,3,32,32] in [-1,1]: DDIM from seeded noise, classes in turn, decoded by the VAE."""
    from diffusers import DDIMScheduler

    from diffusion_bridge.stats import LatentScaling

    ddim = DDIMScheduler.from_config(ddpm.config)
    ddim.set_timesteps(SAMPLING_STEPS)
    scaling = LatentScaling.from_config(vae.config, "sd3")
    g, images = torch.Generator().manual_seed(10_000 + seed), []
    for start in range(0, args.num_samples, 250):
        n = min(250, args.num_samples - start)
        u = torch.randn(n, 4, 8, 8, generator=g)
        y = torch.arange(start, start + n) % 10
        for t in ddim.timesteps:
            eps = dit(u, timestep=t.expand(n), class_labels=y).sample
            u = ddim.step(eps, t, u).prev_sample
        if args.checkerboard:
            u = u * board(u)
        images.append(vae.decode(scaling.unscale(u)).sample.clamp(-1, 1))
    return torch.cat(images)


def cifar_dataset(args, split: str, n: int):
    """(``n`` images spread over a CIFAR-10 split under the evaluation transform, their source's description)."""
    from autoencoder.data import ImageDataset, eval_transform, load_image_source

    ds, column, source = load_image_source(None, str(Path(args.cifar_dir) / f"{split}.parquet"), num_images=n)
    return ImageDataset(ds, column, eval_transform(32)), source


def stacked(dataset) -> torch.Tensor:
    """A dataset's images as one tensor [n,3,32,32] in [-1,1]."""
    return torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])


class Scorer:
    """KID and FID against the CIFAR-10 test set on the FID Inception; the real features cached on disk."""

    def __init__(self, args):
        from eval.fid import InceptionFeatures, default_cache_folder, resolve_fid_weights

        weights = resolve_fid_weights(args.fid_weights, download=False)
        if weights.path is None:
            raise SystemExit(f"error: {weights.unavailable}")
        self.inception = InceptionFeatures(weights).eval()
        self.args, self.cache_folder = args, default_cache_folder()
        self.test = self.real("test", 10000)

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        from eval.fid import to_uint8

        return torch.cat([self.inception(to_uint8(images[i : i + 100])).double() for i in range(0, len(images), 100)])

    def real(self, split: str, n: int) -> torch.Tensor:
        """Features of ``n`` images spread over ``split``, from the cache when it has them."""
        from eval.fid import FeatureCache

        dataset, source = cifar_dataset(self.args, split, n)
        facts = {"images": dataset.fingerprint(), "source": source, "count": n}
        cache = FeatureCache(self.cache_folder, {**facts, "resolution": 32, "preprocessing": "8-bit, as stored"})
        found = cache.load(self.inception)
        if found is None:
            found = self.features(stacked(dataset))
            cache.save(self.inception, found)
        return found

    def score(self, images: torch.Tensor) -> dict:
        """KID (mean ± std over subsets) and FID of ``images`` against the test set."""
        from eval.fid import distances

        found = distances(self.test, self.features(images))
        return {
            "kid": found["kid"]["mean"],
            "kid_std_subsets": found["kid"]["std"],
            "fid": found["fd"],
            "n": found["n_fake"],
        }


def floors(vae, scorer: Scorer, args) -> dict:
    """KID/FID of real training images and of the VAE's reconstructions of them, against the test set."""
    real = stacked(cifar_dataset(args, "train", args.num_samples)[0])
    with torch.no_grad():
        recon = torch.cat(
            [vae.decode(vae.encode(real[i : i + 250]).latent_dist.mode()).sample for i in range(0, len(real), 250)]
        )
    from eval.fid import distances

    real_found = distances(scorer.test, scorer.real("train", args.num_samples))  # cached across VAEs
    return {
        "real_train": {"kid": real_found["kid"]["mean"], "fid": real_found["fd"], "n": args.num_samples},
        "vae_reconstructions": scorer.score(recon.clamp(-1, 1)),
    }


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation over seeds (std 0 for one seed)."""
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def markdown(results: dict) -> str:
    """results.md: one row per seed, the mean ± std, the floors, and what it cost."""
    lines = [
        f"# Diffusion probe: `{results['vae']}`" + (" (checkerboard control)" if results["checkerboard"] else ""),
        "",
        f"DiT {results['dit']}, {results['dit_parameters']:,} parameters; {results['steps']} steps of batch "
        f"{results['batch_size']}; {results['num_samples']} samples (DDIM {SAMPLING_STEPS}, no guidance) against "
        "the 10,000 CIFAR-10 test images on the FID Inception.",
        "",
        "| seed | gKID ↓ | gFID ↓ | final loss | train CPU s |",
        "|---|---|---|---|---|",
    ]
    for seed, r in results["seeds"].items():
        cells = [seed, f"{r['kid']:.5f}", f"{r['fid']:.2f}", f"{r['train']['final_loss_mean_500']:.4f}"]
        lines.append("| " + " | ".join(cells + [f"{r['train']['cpu_seconds']:.0f}"]) + " |")
    kid, fid = results["gkid"], results["gfid"]
    lines += [f"| mean ± std | {kid['mean']:.5f} ± {kid['std']:.5f} | {fid['mean']:.2f} ± {fid['std']:.2f} | | |", ""]
    for name, f in results["floors"].items():
        lines.append(f"- floor, {name.replace('_', ' ')}: KID {f['kid']:.5f}, FID {f['fid']:.2f}")
    cost = f"{results['seconds']:.0f} s wall, {results['cpu_seconds']:.0f} s CPU ({results['threads']} threads)"
    lines.append(f"- cost: {cost}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Cache the latents, train and sample one DiT per seed, score them; write the results."""
    from diffusers import AutoencoderKL

    from autoencoder.errors import UsageError
    from autoencoder.folders import RunDir

    args = parse_args(argv)
    wall, cpu = time.perf_counter(), time.process_time()
    out = Path(args.output_dir)
    folder = RunDir(out, PROBE, "--output_dir")
    try:
        folder.check()  # never a folder another command (or a person) filled
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    folder.claim()
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    if vae.config.scaling_factor == 1.0:
        raise SystemExit(f"error: {args.vae} has no latent statistics; run `python -m diffusion_bridge stats --write`")
    latents, labels = training_latents(args)
    scorer = Scorer(args)
    results = {"vae": args.vae, "checkerboard": args.checkerboard, "steps": args.steps, "batch_size": args.batch_size}
    results.update(num_samples=args.num_samples, dit=DIT, num_train_latents=len(latents), seeds={})
    results["dit_parameters"] = sum(p.numel() for p in build_dit(0).parameters())
    results["floors"] = floors(vae, scorer, args)
    for i, seed in enumerate(int(s) for s in args.seeds.split(",")):
        dit, ddpm, train = train_dit(latents, labels, seed, args)
        images = sample(dit, ddpm, vae, seed, args)
        if i == 0:  # the first seed's 10 x 10: column = class
            save_image(make_grid(images[:100] * 0.5 + 0.5, nrow=10, padding=1), out / "samples.png")
        results["seeds"][str(seed)] = {**scorer.score(images), "train": train}
        print(f"seed {seed}: {results['seeds'][str(seed)]}", file=sys.stderr, flush=True)
    results["gkid"] = mean_std([r["kid"] for r in results["seeds"].values()])
    results["gfid"] = mean_std([r["fid"] for r in results["seeds"].values()])
    results.update(
        seconds=time.perf_counter() - wall, cpu_seconds=time.process_time() - cpu, threads=torch.get_num_threads()
    )
    folder.write_text("results.json", json.dumps(results, indent=2))
    folder.write_text("results.md", markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
