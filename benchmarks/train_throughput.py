"""Training throughput: raw AutoencoderKL vs. a full training step vs. the whole training loop.

    python benchmarks/train_throughput.py --config cpu-small --resolution 64 --batch_size 8
    python benchmarks/train_throughput.py --config sd-f8c4 --resolution 256 --batch_size 8 \
        --mixed_precision bf16 --train_data_dir PHOTOS [--compile]

(a) raw ``AutoencoderKL`` forward + backward with an L1 loss only (no optimizer);
(b) one full training step as the loop runs it: forward through ``VAEForTraining``, every configured
    loss (LPIPS under autocast, KL, GAN if enabled), backward, clipping, fused AdamW step;
    ``--compile`` compiles (a) as one graph (``torch.compile(vae)``, the raw reference) and (b), (c)
    block by block as the loop does (``autoencoder.models.compile_regions``);
(c) the training loop end to end (``train.trainer.train``: data loading and augmentation in the
    configured loader workers, logging), validation and checkpoints off; it also prints how long
    per step the loop's host thread waited for a batch and for the device (on a GPU the loop
    waits for the step before last once per step): a loop that keeps the GPU busy waits on the
    device, one starved by its data waits on the loader.
Each phase runs in its own subprocess so its peak memory (max RSS on CPU, max allocated on CUDA)
is its own.  (a) and (b) time ``--steps`` steps after ``--warmup`` untimed ones; (c) times the
steps between its first logging step (after ``--warmup`` steps, compilation included) and its
last, both host-synchronised.  "s to step W" is what comes before the timed steps: the ``--warmup``
steps (compilation happens in the first) and, for (c), the loop's start-up (data, workers,
prepare); with and without ``--compile`` it gives compilation's cost.  FLOPs come from
``torch.utils.flop_counter`` on one step of (a) and (b) ((c) does (b)'s work); MFU is against the
measured matmul peak of the precision in use (bf16/fp16 under mixed precision, TF32 or fp32
otherwise) on the same device.

``--profile DIR`` times (b) and (c) under ``torch.profiler`` and writes their operator
tables to DIR: device (kernel) time per step in (c) against (b) tells extra GPU work in the loop
(which kernels) from idle gaps (the host or the data not keeping up); its timings are inflated by
the profiler and are not the benchmark's.
"""

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="cpu-small", help="preset name or YAML path")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="override the config's precision (bf16 autocast is slow on CPUs without bf16 units)",
    )
    p.add_argument(
        "--train_data_dir", default=None, help="(c) trains on this folder/parquet (default: the config's data)"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the VAE in every phase")
    p.add_argument("--steps", type=int, default=20, help="timed steps per phase")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--phases", default="abc", help="which phases to run, e.g. 'c' (compiled phases take minutes each)")
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="profile (b) and (c) with torch.profiler, write their operator tables to DIR (timings inflated)",
    )
    p.add_argument("--phase", choices=["a", "b", "c", "peak"], default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _cfg(args):
    from autoencoder.config import parse_config

    overrides = [f"--mixed_precision={args.mixed_precision}"] if args.mixed_precision else []
    if args.train_data_dir:
        overrides.append(f"--train_data_dir={args.train_data_dir}")
    return parse_config(
        [
            f"--config={args.config}",
            f"--resolution={args.resolution}",
            f"--compile={args.compile}",
            f"--train_batch_size={args.batch_size}",
            "--report_to=none",
            *overrides,
        ]
    )


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


def _setup(cfg, device) -> None:
    """TF32 as the training loop sets it."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.train.allow_tf32


@contextlib.contextmanager
def _profiled(args, phase: str | None, steps: int, device) -> Iterator[dict]:
    """Under ``--profile`` (and a ``phase`` name): record the block with torch.profiler, write its tables."""
    result: dict = {}
    if not args.profile or phase is None:
        yield result
        return
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        yield result
        _sync(device)
    events = prof.key_averages()
    # the device-side rows (kernels, memcpys) only: the CPU ops that launched them carry the same time
    device_us = sum(
        e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation
    )
    result["device_ms_per_step"] = device_us / 1e3 / steps
    folder = Path(args.profile)
    folder.mkdir(parents=True, exist_ok=True)
    by_device = events.table(sort_by="self_device_time_total", row_limit=40) if device.type == "cuda" else ""
    (folder / f"profile_{phase}.txt").write_text(
        f"phase {phase}: {steps} steps profiled; device time {device_us / 1e3:.1f} ms in all\n\n"
        f"by self device time:\n{by_device}\n\nby self CPU time:\n"
        f"{events.table(sort_by='self_cpu_time_total', row_limit=40)}\n"
    )


def _time_steps(step, args, device, phase: str | None = None) -> tuple[float, float, dict]:
    """Seconds per step after warm-up, FLOPs of one step, and the warm-up's seconds and profile (``--profile``)."""
    from torch.utils.flop_counter import FlopCounterMode

    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    _sync(device)
    warmup_seconds = time.perf_counter() - start  # compilation happens here
    with FlopCounterMode(display=False) as counter:
        step()
    _sync(device)
    with _profiled(args, phase, args.steps, device) as profiled:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        _sync(device)
        seconds = (time.perf_counter() - start) / args.steps
    return seconds, counter.get_total_flops(), {"warmup_seconds": warmup_seconds, **profiled}


def phase_a(args, device) -> dict:
    from autoencoder.models import build_vae

    cfg = _cfg(args)
    _setup(cfg, device)
    vae = build_vae(cfg.model).to(device).train()
    forward = torch.compile(vae) if args.compile else vae
    x = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=device) * 2 - 1

    def step():
        vae.zero_grad(set_to_none=True)
        with _autocast(cfg, device):
            recon = forward(x).sample
        (recon.float() - x).abs().mean().backward()

    seconds, flops, extra = _time_steps(step, args, device)
    return {"seconds_per_step": seconds, "flops_per_step": flops, **extra}


def phase_b(args, device) -> dict:
    from autoencoder.losses import VAELoss, build_discriminator
    from autoencoder.models import VAEForTraining, build_vae, compile_regions

    cfg = _cfg(args)
    _setup(cfg, device)
    model = VAEForTraining(build_vae(cfg.model)).to(device).train()
    if args.compile:  # as the loop compiles: block by block, the decoder's last layer eager (the GAN's weight)
        compile_regions(model.vae)
    loss_fn = VAELoss(cfg.loss).to(device)
    disc = build_discriminator(cfg.loss)
    disc = disc.to(device) if disc is not None else None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    disc_opt = torch.optim.AdamW(disc.parameters(), lr=1e-4, fused=True) if disc is not None else None
    x = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=device) * 2 - 1
    step_index = max(cfg.loss.disc_start, 0)  # measure the step with every configured loss active

    def step():
        with _autocast(cfg, device):
            recon, posterior = model(x)
            loss, _ = loss_fn(x, recon, posterior, step_index, discriminator=disc, last_layer=model.last_layer())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if disc is not None:
            with _autocast(cfg, device):
                d_loss, _ = loss_fn.discriminator_loss(x, recon, disc, step_index)
            d_loss.backward()
            disc_opt.step()
            disc_opt.zero_grad(set_to_none=True)

    seconds, flops, extra = _time_steps(step, args, device, "b")
    return {"seconds_per_step": seconds, "flops_per_step": flops, **extra}


def phase_c(args, device) -> dict:
    from train.trainer import train

    with tempfile.TemporaryDirectory() as out:
        cfg = _cfg(args)
        cfg.train.output_dir = out
        cfg.train.max_train_steps = args.warmup + args.steps
        cfg.train.validation_steps = cfg.train.checkpointing_steps = 0
        cfg.train.validate_at_start = cfg.train.latent_stats = False
        cfg.train.log_every = args.warmup  # the first logging step ends the warm-up
        cfg.loss.disc_start = 0  # every configured loss active, as in (b)
        cfg.data.num_validation_images = 2  # the final validation is outside the timed loop: keep it short
        # profiled whole, start-up and the short final validation included: its device ms/step is an upper bound
        with _profiled(args, "c", cfg.train.max_train_steps, device) as profiled:
            metrics = train(cfg)
    first, last = metrics["log_marks"][0], metrics["log_marks"][-1]  # (step, seconds, data wait, device wait)
    assert first[0] == args.warmup and last[0] == cfg.train.max_train_steps, metrics["log_marks"]
    steps = last[0] - first[0]
    # start-up (checks, data, loader workers, prepare) and the warm-up steps (compilation included)
    warmup_seconds = metrics["startup_seconds"] + first[1]
    return {
        "seconds_per_step": (last[1] - first[1]) / steps,
        "flops_per_step": None,
        "warmup_seconds": warmup_seconds,
        "data": metrics["data"],
        "data_wait_per_step": (last[2] - first[2]) / steps,
        "device_wait_per_step": (last[3] - first[3]) / steps,
        **profiled,
    }


def matmul_peak(device, dtype: torch.dtype, n: int, reps: int = 10) -> float:
    """Measured matmul TFLOP/s of this device in ``dtype`` (the practical peak MFU is quoted against)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def precision_peak(args, device) -> dict:
    """The matmul peak of the precision the run computes in, and its name."""
    cfg = _cfg(args)
    _setup(cfg, device)
    mp = cfg.train.mixed_precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp, torch.float32)
    name = {"bf16": "bf16", "fp16": "fp16"}.get(
        mp, "tf32" if device.type == "cuda" and cfg.train.allow_tf32 else "fp32"
    )
    n = 8192 if device.type == "cuda" else 1024
    return {"tflops": matmul_peak(device, dtype, n), "precision": name}


def run_phase(args, phase: str) -> dict:
    """Run one phase in a fresh interpreter and parse its JSON line."""
    cmd = [
        sys.executable,
        __file__,
        f"--phase={phase}",
        f"--config={args.config}",
        f"--resolution={args.resolution}",
        f"--batch_size={args.batch_size}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
    ]
    for flag in ("mixed_precision", "train_data_dir", "profile"):
        if getattr(args, flag):
            cmd.append(f"--{flag}={getattr(args, flag)}")
    if args.compile:
        cmd.append("--compile")
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if out.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(args, peak: dict, rows: dict, where: str) -> str:
    """The markdown table and ratio line of one benchmark run."""
    names = {
        "a": "(a) raw AutoencoderKL fwd+bwd, L1",
        "b": "(b) full training step, all losses",
        "c": "(c) training loop end to end",
    }
    data = f"; (c) data: {rows['c']['data']}" if "c" in rows else ""
    lines = [
        f"config={args.config} resolution={args.resolution} batch={args.batch_size} steps={args.steps} "
        f"warmup={args.warmup} mixed_precision={_cfg(args).train.mixed_precision} compile={args.compile} "
        f"device={where}; measured {peak['precision']} matmul peak {peak['tflops']:.2f} TFLOP/s{data}",
        f"| phase | img/s | s/step | peak memory (MB) | TFLOP/s | MFU | s to step {args.warmup} |",
        "|---|---|---|---|---|---|---|",
    ]
    for p, r in rows.items():
        flops = r["flops_per_step"] or rows.get("b", {}).get("flops_per_step")  # (c) does (b)'s work per step
        ips = args.batch_size / r["seconds_per_step"]
        util = "– | –"
        if flops:
            tflops = flops / r["seconds_per_step"] / 1e12
            util = f"{tflops:.2f} | {100 * tflops / peak['tflops']:.1f}%"
        lines.append(
            f"| {names[p]} | {ips:.2f} | {r['seconds_per_step']:.4f} | {r['peak_bytes'] / 2**20:.0f} | {util} "
            f"| {r['warmup_seconds']:.1f} |"
        )
    ips = {p: args.batch_size / r["seconds_per_step"] for p, r in rows.items()}
    ratios = [f"{x}/{y} = {ips[x] / ips[y]:.2f}" for x, y in (("b", "a"), ("c", "b")) if x in ips and y in ips]
    lines.append("\nratios (img/s): " + (", ".join(ratios) or "–"))
    if "c" in rows:  # the loop's host thread, per timed step: the rest of its time is its own work (launches)
        c = rows["c"]
        lines.append(
            f"(c) per step, the loop waited {1e3 * c['data_wait_per_step']:.1f} ms for data and "
            f"{1e3 * c['device_wait_per_step']:.1f} ms for the device, of {1e3 * c['seconds_per_step']:.1f} ms"
        )
    if args.profile:  # wall ms/step against kernel ms/step: the difference is the device idle
        busy = [
            f"({p}) wall {1e3 * r['seconds_per_step']:.1f} ms/step, device {r['device_ms_per_step']:.1f} ms/step"
            for p, r in rows.items()
            if "device_ms_per_step" in r
        ]
        lines.append(
            f"profiled (torch.profiler; (b) and (c) timings above are inflated by it; tables in "
            f"{args.profile}): " + "; ".join(busy)
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.phase:
        phases = {"a": phase_a, "b": phase_b, "c": phase_c, "peak": precision_peak}
        result = phases[args.phase](args, device)
        result["peak_bytes"] = _peak_bytes(device)
        print(json.dumps(result))
        return 0
    peak = run_phase(args, "peak")
    rows = {p: run_phase(args, p) for p in "abc" if p in args.phases}
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(table(args, peak, rows, where))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "device": where, "peak": peak, "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
