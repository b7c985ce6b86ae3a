"""Training throughput: raw AutoencoderKL vs. a full training step vs. the whole training loop.

    python benchmarks/train_throughput.py --config cpu-small --resolution 64 --batch_size 8

(a) raw ``AutoencoderKL`` forward + backward with an L1 loss only (no optimizer);
(b) one full training step: forward through ``VAEForTraining``, every configured loss (LPIPS,
    KL, GAN if enabled), backward, clipping, AdamW step;
(c) the training loop end to end (``train.trainer.train``: data loading, augmentation,
    logging), validation and checkpoints off.
Each phase runs in its own subprocess so its peak memory (max RSS on CPU, max allocated on
CUDA) is its own.  GFLOP/s come from ``torch.utils.flop_counter`` on one step, against a
measured fp32 matmul peak of the same machine.
"""

import argparse
import json
import os
import resource
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
    p.add_argument("--config", default="cpu-small", help="preset name or YAML path")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="override the config's precision (bf16 autocast is slow on CPUs without bf16 units)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per phase")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--phase", choices=["a", "b", "c", "peak"], default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _cfg(args):
    from autoencoder.config import parse_config

    overrides = [f"--mixed_precision={args.mixed_precision}"] if args.mixed_precision else []
    return parse_config([f"--config={args.config}", f"--resolution={args.resolution}",
                         f"--train_batch_size={args.batch_size}", "--report_to=none", *overrides])  # fmt: skip


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _autocast(cfg, device):
    """The configured mixed precision as an autocast context (what accelerate applies in (c))."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _time_steps(step, args, device) -> tuple[float, float]:
    """Seconds per step after warm-up, and FLOPs of one step."""
    from torch.utils.flop_counter import FlopCounterMode

    for _ in range(args.warmup):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / args.steps, counter.get_total_flops()


def phase_a(args, device) -> dict:
    from autoencoder.models import build_vae

    cfg = _cfg(args)
    vae = build_vae(cfg.model).to(device).train()
    x = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=device) * 2 - 1

    def step():
        vae.zero_grad(set_to_none=True)
        with _autocast(cfg, device):
            recon = vae(x).sample
        (recon.float() - x).abs().mean().backward()

    seconds, flops = _time_steps(step, args, device)
    return {"seconds_per_step": seconds, "flops_per_step": flops}


def phase_b(args, device) -> dict:
    from autoencoder.losses import VAELoss, build_discriminator
    from autoencoder.models import VAEForTraining, build_vae

    cfg = _cfg(args)
    model = VAEForTraining(build_vae(cfg.model)).to(device).train()
    loss_fn = VAELoss(cfg.loss).to(device)
    disc = build_discriminator(cfg.loss)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    disc_opt = torch.optim.AdamW(disc.parameters(), lr=1e-4) if disc is not None else None
    disc = disc.to(device) if disc is not None else None
    x = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=device) * 2 - 1
    step_index = max(cfg.loss.disc_start, 0)  # measure the step with every configured loss active

    def step():
        with _autocast(cfg, device):
            recon, posterior = model(x)
        recon = recon.float()
        loss, _ = loss_fn(x, recon, posterior, step_index, discriminator=disc, last_layer=model.last_layer())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if disc is not None:
            d_loss, _ = loss_fn.discriminator_loss(x, recon, disc)
            d_loss.backward()
            disc_opt.step()
            disc_opt.zero_grad(set_to_none=True)

    seconds, flops = _time_steps(step, args, device)
    return {"seconds_per_step": seconds, "flops_per_step": flops}


def phase_c(args, device) -> dict:
    from train.trainer import train

    with tempfile.TemporaryDirectory() as out:
        cfg = _cfg(args)
        cfg.train.output_dir = out
        cfg.train.max_train_steps = args.warmup + args.steps
        cfg.train.validation_steps = cfg.train.checkpointing_steps = 0
        cfg.train.validate_at_start = False
        cfg.train.log_every = 1
        cfg.loss.disc_start = 0  # every configured loss active, as in (b)
        cfg.data.num_validation_images = 2  # the final validation is outside the timed loop: keep it short
        metrics = train(cfg)
    # train_seconds_this_run covers the loop only (warm-up steps included, so this is conservative)
    return {"seconds_per_step": metrics["train_seconds_this_run"] / cfg.train.max_train_steps, "flops_per_step": None}


def matmul_peak(device, n: int = 2048, reps: int = 10) -> float:
    """Measured fp32 matmul GFLOP/s of this machine (the practical peak)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def run_phase(args, phase: str) -> dict:
    """Run one phase in a fresh interpreter and parse its JSON line."""
    cmd = [sys.executable, __file__, f"--phase={phase}", f"--config={args.config}", f"--resolution={args.resolution}",
           f"--batch_size={args.batch_size}", f"--steps={args.steps}", f"--warmup={args.warmup}"]  # fmt: skip
    if args.mixed_precision:
        cmd.append(f"--mixed_precision={args.mixed_precision}")
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if out.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.phase:
        result = {"a": phase_a, "b": phase_b, "c": phase_c}[args.phase](args, device) if args.phase != "peak" else {}
        if args.phase == "peak":
            result["gflops"] = matmul_peak(device)
        result["peak_bytes"] = _peak_bytes(device)
        print(json.dumps(result))
        return 0
    peak = run_phase(args, "peak")["gflops"]
    rows = {p: run_phase(args, p) for p in ("a", "b", "c")}
    names = {"a": "(a) raw AutoencoderKL fwd+bwd, L1", "b": "(b) full training step, all losses",
             "c": "(c) training loop end to end"}  # fmt: skip
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"config={args.config} resolution={args.resolution} batch={args.batch_size} steps={args.steps} "
          f"mixed_precision={_cfg(args).train.mixed_precision} "
          f"device={where}; measured fp32 matmul peak {peak:.1f} GFLOP/s")  # fmt: skip
    print("| phase | img/s | s/step | peak memory (MB) | GFLOP/s | % of matmul peak |\n|---|---|---|---|---|---|")
    for p, r in rows.items():
        ips = args.batch_size / r["seconds_per_step"]
        gflops = r["flops_per_step"] / r["seconds_per_step"] / 1e9 if r["flops_per_step"] else None
        g = f"{gflops:.1f} | {100 * gflops / peak:.0f}%" if gflops else "– | –"
        print(f"| {names[p]} | {ips:.2f} | {r['seconds_per_step']:.3f} | {r['peak_bytes'] / 2**20:.0f} | {g} |")
    a, b, c = (args.batch_size / rows[p]["seconds_per_step"] for p in "abc")
    print(f"\nratios (img/s): b/a = {b / a:.2f}, c/b = {c / b:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
