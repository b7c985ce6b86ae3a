"""Does the latent space serve diffusion?  Train a small class-conditional DiT on our VAE's cached
CIFAR-10 latents for a bounded CPU budget, sample through diffusers' ``DiTPipeline`` (which decodes
``latents / scaling_factor`` with our VAE), and report a Fréchet distance on VGG16 features.

    python benchmarks/latent_diffusion_cifar10.py --vae outputs/vae-cifar10/vae \\
        --cifar_dir ../shared/data/cifar10 --train_minutes 10 --output_dir outputs/ldm-cifar10

Steps: (1) ``python -m diffusion_bridge encode`` of the training split (scaled posterior samples,
resumable); (2) a ``DiTTransformer2DModel`` trained with the DDPM epsilon objective (linear betas,
1000 steps, 10% class dropout for classifier-free guidance, EMA) until the time budget is spent;
(3) ``DiTPipeline`` with DDIM sampling; (4) ``fd_vgg16`` (Fréchet distance of ImageNet-VGG16 conv5
features, *not* FID: the FID Inception weights are not available offline) of the samples against
real test images, next to two reference points: real training images (the floor from sampling
noise alone) and our VAE's reconstructions of them (the floor the VAE sets).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_args(argv):
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True, help="our diffusers VAE folder (with latent statistics)")
    p.add_argument("--cifar_dir", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--output_dir", default="outputs/ldm-cifar10")
    p.add_argument("--num_train_images", type=int, default=50000)
    p.add_argument("--train_minutes", type=float, default=10.0, help="wall-clock budget of the DiT training")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=32)
    p.add_argument("--patch_size", type=int, default=2)
    p.add_argument("--guidance_scale", type=float, default=2.0)
    p.add_argument("--sampling_steps", type=int, default=50)
    p.add_argument("--num_fd_images", type=int, default=500, help="images per set in the Fréchet distances")
    p.add_argument(
        "--lpips_weights",
        default=str(REPO.parent / "shared" / "weights" / "lpips"),
        help="folder/file with the ImageNet VGG16 features (the FD extractor)",
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def train_dit(latents: torch.Tensor, labels: torch.Tensor, args) -> tuple:
    """DDPM epsilon-prediction training of a DiT on [N,C,h,w] latents until the time budget is spent."""
    from diffusers import DDPMScheduler, DiTTransformer2DModel
    from diffusers.training_utils import EMAModel

    torch.manual_seed(args.seed)
    c, h = latents.shape[1], latents.shape[-1]
    # num_embeds_ada_norm=1000: DiTPipeline's guidance uses class id 1000 as the null class; the
    # transformer drops 10% of the labels to it in training (classifier-free guidance).
    dit = DiTTransformer2DModel(
        in_channels=c,
        out_channels=c,
        sample_size=h,
        patch_size=args.patch_size,
        num_layers=args.layers,
        num_attention_heads=args.heads,
        attention_head_dim=args.head_dim,
        num_embeds_ada_norm=1000,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(dit.parameters(), lr=args.learning_rate, weight_decay=0.0)
    ema = EMAModel(dit.parameters(), decay=0.999, use_ema_warmup=True)
    g = torch.Generator().manual_seed(args.seed)
    losses, step, t0 = [], 0, time.perf_counter()
    dit.train()
    while time.perf_counter() - t0 < args.train_minutes * 60:
        idx = torch.randint(len(latents), (args.batch_size,), generator=g)
        x0, y = latents[idx], labels[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (len(x0),), generator=g)
        pred = dit(scheduler.add_noise(x0, noise, t), timestep=t, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        ema.step(dit.parameters())
        losses.append(loss.item())
        step += 1
        if step % 200 == 0:
            print(f"step {step}: loss {sum(losses[-200:]) / 200:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    ema.copy_to(dit.parameters())
    return (
        dit.eval(),
        scheduler,
        {
            "steps": step,
            "seconds": time.perf_counter() - t0,
            "final_loss_mean_200": sum(losses[-200:]) / min(200, len(losses)),
        },
    )


@torch.no_grad()
def features(extractor, images: torch.Tensor, batch: int = 50) -> torch.Tensor:
    """[N,3,H,W] images in [-1,1] -> [N,D] features of the extractor."""
    from eval.fid import to_uint8

    return torch.cat([extractor(to_uint8(images[i : i + batch])) for i in range(0, len(images), batch)])


def frechet(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance of two feature sets (eval.fid's accumulator, torchmetrics' formula)."""
    from eval.fid import FrechetAccumulator

    acc = FrechetAccumulator(real.shape[1])
    acc.update(real, real=True)
    acc.update(fake, real=False)
    return acc.compute()


def load_images(parquet: Path, n: int, offset: int = 0) -> torch.Tensor:
    """The first n images of a CIFAR-10 parquet after ``offset``, [n,3,32,32] in [-1,1]."""
    from autoencoder.data import ImageDataset, eval_transform, load_image_source

    ds, col, _ = load_image_source(None, str(parquet), split="train", resolution=32)
    ds = ImageDataset(ds.select(range(offset, offset + n)), col, eval_transform(32))
    return torch.stack([ds[i]["pixel_values"] for i in range(n)])


def encode_cache(args, out: Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The training latents [N,C,h,w] and labels through ``diffusion_bridge encode``, and its seconds."""
    from diffusion_bridge.cache import load_latent_cache
    from diffusion_bridge.cli import main as bridge_main

    t0 = time.perf_counter()
    train_file = Path(args.cifar_dir) / "train.parquet"
    argv = [
        "encode",
        f"--model={args.vae}",
        f"--train_data_dir={train_file}",
        "--resolution=32",
        f"--num_images={args.num_train_images}",
        "--batch_size=250",
        "--shard_size=5000",
        f"--output_dir={out / 'latent-cache'}",
        f"--seed={args.seed}",
    ]
    assert bridge_main(argv) == 0, "encoding failed"
    cache = load_latent_cache(out / "latent-cache")[:]  # all rows as torch tensors
    return cache["latents"], cache["label"].long(), time.perf_counter() - t0


def sample(pipe, args) -> tuple[torch.Tensor, float]:
    """``num_fd_images`` class-conditional samples [N,3,32,32] in [-1,1] (classes in turn), and the seconds."""
    n, t1, samples = args.num_fd_images, time.perf_counter(), []
    class_labels = [i % 10 for i in range(n)]
    for i in range(0, n, 100):
        gen = torch.Generator().manual_seed(args.seed + i)
        imgs = pipe(
            class_labels=class_labels[i : i + 100],
            guidance_scale=args.guidance_scale,
            generator=gen,
            num_inference_steps=args.sampling_steps,
            output_type="pt",
        ).images
        samples.append(imgs * 2 - 1)  # [B,3,32,32] in [0,1] -> [-1,1]
    return torch.cat(samples), time.perf_counter() - t1


def fd_table(vae, samples: torch.Tensor, args) -> dict:
    """Fréchet distances on VGG16 features against real test images: samples, VAE reconstructions, real images."""
    from autoencoder.lpips_weights import backbone_features
    from eval.fid import VGG16Features

    n, cifar = args.num_fd_images, Path(args.cifar_dir)
    extractor = VGG16Features(backbone_features("vgg", args.lpips_weights))
    real_test, real_train = load_images(cifar / "test.parquet", n), load_images(cifar / "train.parquet", n)
    with torch.no_grad():
        recons = [vae.decode(vae.encode(real_train[i : i + 100]).latent_dist.mode()).sample for i in range(0, n, 100)]
    f_test = features(extractor, real_test)
    return {
        "samples_vs_test": frechet(f_test, features(extractor, samples)),
        "vae_reconstructions_of_train_vs_test": frechet(f_test, features(extractor, torch.cat(recons).clamp(-1, 1))),
        "real_train_vs_test": frechet(f_test, features(extractor, real_train)),
        "n_images_per_set": n,
        "extractor": "ImageNet VGG16 conv5_3, global average pool (512-d), inputs resized to 224 px; not FID",
    }


def main(argv=None) -> int:
    """Cache, train, sample, measure; writes samples.png, dit/ and results.json to --output_dir."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    if vae.config.scaling_factor == 1.0:
        raise SystemExit(f"{args.vae} has no latent statistics: run `python -m diffusion_bridge stats --write` first")
    latents, labels, encode_s = encode_cache(args, out)
    print(
        f"latent cache: {tuple(latents.shape)}, mean {latents.mean():.3f}, std {latents.std():.3f} ({encode_s:.0f} s)"
    )
    dit, ddpm, train_info = train_dit(latents, labels, args)
    dit.save_pretrained(out / "dit")
    pipe = DiTPipeline(transformer=dit, vae=vae, scheduler=DDIMScheduler.from_config(ddpm.config))
    pipe.set_progress_bar_config(disable=True)
    samples, sample_s = sample(pipe, args)
    # 10 x 10 grid: column = class (airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck)
    save_image(make_grid(samples[:100] * 0.5 + 0.5, nrow=10, padding=1), out / "samples.png")
    sampling = {
        "scheduler": "DDIM",
        "steps": args.sampling_steps,
        "guidance_scale": args.guidance_scale,
        "images": args.num_fd_images,
        "seconds": sample_s,
    }
    results = {
        "vae": args.vae,
        "latent_shape": list(latents.shape[1:]),
        "num_train_latents": len(latents),
        "encode_seconds": encode_s,
        "dit_parameters": sum(p.numel() for p in dit.parameters()),
        "train": train_info,
        "sampling": sampling,
        "fd_vgg16": fd_table(vae, samples, args),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"wrote {out / 'samples.png'}, {out / 'dit'}, {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
