"""Evaluate diffusers VAEs side by side on the same images: ``python -m eval --model A [--model B ...]``.

Every model sees identical inputs — the evaluation policy: resize the shorter side to the
resolution (bicubic, antialiased), centre crop — and is scored with the metric code training
validation uses (``eval.metrics``): PSNR/SSIM/MS-SSIM on 8-bit images, LPIPS, rFID (standard
FID Inception, or "unavailable" with the reason) and optionally Fréchet distances on named
extractors.  Writes ``metrics.json``, ``report.md`` and ``reconstructions.png`` to --output_dir.
"""

import contextlib
import json
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from torchvision.utils import make_grid, save_image

from autoencoder.config import check_one_source, opt, options_help, parse_options, required
from autoencoder.data import (
    ImageDataset,
    check_enough_images,
    collate,
    data_flag,
    eval_transform,
    load_image_source,
    loader_workers,
)
from autoencoder.errors import (
    OutOfMemory,
    UsageError,
    agreement,
    is_oom,
    run_cli,
)
from autoencoder.folders import RunDir
from autoencoder.launch import relaunch_cpu, requested_cpu_processes, use_cpu_backend
from autoencoder.lpips_weights import backbone_features, build_lpips
from autoencoder.models import (
    check_resolution,
    downsampling_factor,
    half_check_latents,
    half_precision_decode_check,
    load_vae,
    load_vae_config,
)

from .diffusability import Diffusability, save_spectrum_figure
from .fid import FrechetAccumulator, InceptionFeatures, VGG16Features, resolve_fid_weights, to_uint8
from .latent import (
    LEVELS,
    LatentAccumulator,
    LikelihoodAccumulator,
    collapse_warning,
    log_weights,
    picture_rows,
    save_latent_figure,
    to_levels,
)
from .metrics import MeanAccumulator, psnr_per_image, quantize_01, reconstruction_metrics

METRIC_COLUMNS = ("psnr", "ssim", "ms_ssim", "lpips")
EVAL = "python -m eval"  # the marker of its --output_dir (autoencoder.folders)
EVAL_FILES = ("metrics.json", "report.md", "reconstructions.png", "latent_*.png", "spectrum_*.png")


@dataclass(kw_only=True)
class EvalOptions:
    """Command-line options of the evaluation runner."""

    model: list[str] = required("diffusers VAE folder, Hub id, or training checkpoint folder (repeatable)")
    subfolder: str | None = opt(None, "subfolder inside each model repo, e.g. 'vae'")
    dataset_name: str | None = opt(None, "Hub dataset id")
    train_data_dir: str | None = opt(None, "local image folder or parquet file(s)")
    image_column: str = opt("image", "column holding the images")
    split: str | None = opt(None, "split to evaluate (default: validation/test if present, else train)")
    resolution: int = opt(256, "evaluation resolution (resize shorter side, centre crop)")
    num_images: int | None = opt(None, "evaluate the first N images (default: all)")
    batch_size: int | Literal["auto"] = opt("auto", "images per batch; auto = 32 on a GPU (keeps it busy), 8 on a CPU")
    lpips_net: Literal["alex", "vgg"] = opt("alex", "LPIPS backbone; AlexNet as in the LPIPS paper")
    lpips_weights: str | None = opt(None, "local backbone file/folder (else $LPIPS_WEIGHTS/torchvision)")
    fid_weights: str | None = opt(None, "FID Inception weights file (else $FID_WEIGHTS, hub cache, download)")
    no_fid: bool = opt(False, "skip rFID")
    no_fid_download: bool = opt(False, "never try to download the Inception weights")
    fd: list[Literal["vgg16"]] = opt(
        [], "also a Fréchet distance on these features, reported as fd_<name> (never 'fid')"
    )
    no_half_check: bool = opt(False, "skip the fp16/bf16 decode finiteness check")
    no_tiling_check: bool = opt(False, "skip the tiled-vs-untiled decode comparison")
    no_diffusability: bool = opt(
        False, "skip the diffusability report (scale equivariance, latent spectrum, interpolation FD)"
    )
    grid_images: int = opt(8, "columns of reconstructions.png")
    iwae_samples: int = opt(8, "posterior samples k of the importance-weighted likelihood bound (0: skip ELBO/IWAE)")
    seed: int = opt(0, "posterior samples of the latent report")
    output_dir: str = opt("outputs/eval", "where metrics.json, report.md and the pictures go")


def eval_dataset(args: EvalOptions) -> tuple[ImageDataset, str]:
    """The evaluation images under the evaluation transform (probed: some must decode), and their description."""
    check_one_source(args.dataset_name, args.train_data_dir)
    ds, column, source = load_image_source(
        args.dataset_name, args.train_data_dir, args.image_column, args.split, args.resolution, args.num_images
    )
    dataset = ImageDataset(ds, column, eval_transform(args.resolution))
    flag = data_flag(args.dataset_name, args.train_data_dir)
    check_enough_images(
        dataset,
        2,
        "evaluation",
        flag,
        need="the 2 that the latent report's active units (a variance over images) need",
        fix="add images or raise --num_images",
    )
    return dataset, source


def resolve_batch_size(value: int | str, device: torch.device) -> int:
    """'auto': 32 images per batch on an accelerator, 8 on a CPU (where larger batches gain nothing)."""
    if value != "auto":
        return int(value)
    return 8 if device.type == "cpu" else 32


def check_args(args: EvalOptions) -> None:
    """Refuse bad options in seconds: numbers, output folder, and every model (config only) vs the resolution."""
    for name in ("resolution", "batch_size", "grid_images"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}", f"set --{name} to 1 or more")
    if args.num_images is not None and args.num_images < 1:
        raise UsageError(f"--num_images must be >= 1, got {args.num_images}", "set it to 1 or more, or leave it out")
    RunDir(args.output_dir, EVAL, "--output_dir").check()  # never a training run's, nor anyone's
    for model_id in args.model:
        config = load_vae_config(model_id, args.subfolder)
        factor = 2 ** (len(config["block_out_channels"]) - 1)
        check_resolution(args.resolution, factor, f"{model_id}'s")


def dataset_facts(args: EvalOptions, dataset: ImageDataset) -> dict:
    """Name, Hub id and split of the evaluation images (what a model card's eval results cite)."""
    if args.dataset_name:
        name = args.dataset_name
    elif args.train_data_dir:
        name = Path(args.train_data_dir).name.removesuffix(".parquet")
    else:
        name = "embedded held-out photographs (scikit-image: chelsea, coffee, rocket)"
    return {"name": name, "hub_id": args.dataset_name, "split": str(dataset.ds.split) if dataset.ds.split else None}


def build_extractors(args: EvalOptions) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """Feature extractors keyed by metric name ('rfid', 'fd_vgg16'), and reasons for those unavailable."""
    extractors, unavailable = {}, {}
    if not args.no_fid:
        weights = resolve_fid_weights(args.fid_weights, download=not args.no_fid_download)
        if weights.path is None:
            unavailable["rfid"] = weights.unavailable
        else:
            extractors["rfid"] = InceptionFeatures(weights.path)
    for name in args.fd:  # only vgg16 today: the one ImageNet network available offline here
        extractors[f"fd_{name}"] = VGG16Features(backbone_features("vgg", args.lpips_weights))
    return extractors, unavailable


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory and what it measures: CUDA max allocated, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"


@torch.no_grad()
def real_pass(accelerator: Accelerator, loader, extractors: dict, grid_images: int) -> tuple[dict, torch.Tensor]:
    """Feature accumulators holding the real images' statistics, and the first originals for the grid."""
    accs = {name: FrechetAccumulator(ex.num_features) for name, ex in extractors.items()}
    originals = []
    for batch in loader:
        x = batch["pixel_values"]
        for name, ex in extractors.items():
            accs[name].update(accelerator.gather_for_metrics(ex(to_uint8(x))), real=True)
        if sum(len(o) for o in originals) < grid_images:
            originals.append(accelerator.gather_for_metrics(x).cpu())
    return accs, torch.cat(originals)[:grid_images]


@contextlib.contextmanager
def tiles_of(vae: AutoencoderKL, tile: int) -> Iterator[None]:
    """``enable_tiling()`` with ``tile``-pixel tiles (the config's ``sample_size`` may exceed the test image)."""
    saved = vae.tile_sample_min_size, vae.tile_latent_min_size
    vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // downsampling_factor(vae)
    vae.enable_tiling()
    try:
        yield
    finally:
        vae.disable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size = saved


@torch.no_grad()
def tiling_check(vae: AutoencoderKL, image: torch.Tensor) -> dict:
    """PSNR (dB, 8-bit) between tiled and untiled decoding — and full round trips — of one image [1,3,H,W].

    The tiles are half the image's side (the VAE's own tile size when that is smaller), so the
    image is always cut into several overlapping tiles and the figure measures real seams.
    """
    tile = min(vae.tile_sample_min_size, min(image.shape[-2:]) // 2)
    assert tile < min(image.shape[-2:]), "the tiling check must tile"
    z = vae.encode(image).latent_dist.mode()
    plain = vae.decode(z).sample
    with tiles_of(vae, tile):
        tiled = vae.decode(z).sample
        tiled_roundtrip = vae.decode(vae.encode(image).latent_dist.mode()).sample
    q = quantize_01
    return {
        "image_size": list(image.shape[-2:]),
        "tile_size": tile,
        "decode_psnr": psnr_per_image(q(tiled), q(plain)).item(),
        "roundtrip_psnr": psnr_per_image(q(tiled_roundtrip), q(plain)).item(),
    }


@torch.no_grad()
def evaluate_model(
    accelerator, args, model_id, loader, lpips_model, feature_accs, extractors, large_image
) -> tuple[dict, torch.Tensor, dict]:
    """All metrics of one VAE's deterministic (posterior-mode) reconstructions and latent space, its grid row
    and its latent pictures (eval.latent)."""
    device = accelerator.device
    vae = load_vae(model_id, args.subfolder).to(device).eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    acc, row = MeanAccumulator(), []
    t_enc = t_dec = 0.0
    n_local = 0
    first_latents = None
    latent_acc, generator = LatentAccumulator(), torch.Generator().manual_seed(args.seed)
    abs_err, n_err, picture_means = 0.0, 0, []
    for acc_f in feature_accs.values():
        acc_f.reset_fake()
    # Untimed warm-up on the first batch: CUDA context, cuDNN autotuning and allocator growth are not throughput.
    # (A batch built from the dataset: an abandoned iterator of the prepared loader would confuse
    # gather_for_metrics' end-of-data bookkeeping.)
    warm = loader.dataset[0]["pixel_values"][None].repeat(args.batch_size, 1, 1, 1).to(device)
    vae.decode(vae.encode(warm).latent_dist.mode())
    _sync(device)
    for batch in loader:
        x = batch["pixel_values"]
        _sync(device)
        t0 = time.perf_counter()
        posterior = vae.encode(x).latent_dist
        z = posterior.mode()
        _sync(device)
        t1 = time.perf_counter()
        recon = vae.decode(z).sample
        _sync(device)
        t_enc, t_dec, n_local = t_enc + t1 - t0, t_dec + time.perf_counter() - t1, n_local + len(x)
        if first_latents is None:
            first_latents = z[:2]
        mean, logvar = accelerator.gather_for_metrics((posterior.mean.float(), posterior.logvar.float()))
        latent_acc.update(mean, logvar, tuple(x.shape[-2:]), generator=generator)
        picture_means += list(mean[: max(0, 2 - len(picture_means))].cpu())
        # mean |x - x̂| in 8-bit levels per image: the ML scale of the Laplace decoder likelihood
        err = accelerator.gather_for_metrics(
            (to_levels(x.float()) - (recon.float() + 1) * (LEVELS / 2)).abs().flatten(1).mean(1)
        )
        abs_err, n_err = abs_err + float(err.sum()), n_err + len(err)
        acc.update(accelerator.gather_for_metrics(reconstruction_metrics(recon, x, lpips_model)))
        for name, ex in extractors.items():
            feature_accs[name].update(accelerator.gather_for_metrics(ex(to_uint8(recon))), real=False)
        if sum(len(r) for r in row) < args.grid_images:
            row.append(accelerator.gather_for_metrics(recon).cpu())
    peak, peak_kind = peak_memory_mb(device)
    result = {
        **acc.compute(),
        "n_images": acc.count("psnr"),
        "resolution": args.resolution,
        "encode_img_per_s": n_local / t_enc,  # per process
        "decode_img_per_s": n_local / t_dec,
        "peak_memory_mb": peak,
        "peak_memory_kind": peak_kind,
        "num_processes": accelerator.num_processes,
        "latent_shape": list(first_latents.shape[1:]),
    }
    for name in extractors:
        result[name] = feature_accs[name].compute()
    if not args.no_half_check:  # the SDXL-VAE problem: does fp16/bf16 decoding overflow to inf/NaN?
        result["half_precision_decode"] = {
            str(dtype).removeprefix("torch."): half_precision_decode_check(
                vae, half_check_latents(first_latents), dtype
            )
            for dtype in (torch.float16, torch.bfloat16)
        }
    if not args.no_tiling_check:
        result["tiling"] = tiling_check(vae, large_image.to(device))
    result["latent"] = latent_acc.compute()
    if args.iwae_samples:
        result["latent"].update(likelihood(accelerator, vae, loader, args, max(abs_err / n_err, 0.05)))
    z_a, z_b = picture_means[0], picture_means[-1]
    pictures = picture_rows(vae, z_a, z_b, result["latent"], seed=args.seed)
    return result, torch.cat(row)[: args.grid_images], pictures


def diffusability_of(accelerator, args, model_id, loader, lpips_model, extractors) -> dict | None:
    """eval.diffusability's report for one model (computed on the main process from gathered batches)."""
    vae = load_vae(model_id, args.subfolder).to(accelerator.device).eval()
    if "rfid" in extractors:
        features = ("ifid", extractors["rfid"])
    else:  # the VGG16 features of fd_vgg16: an FD, never called FID
        vgg = extractors.get("fd_vgg16") or VGG16Features(backbone_features("vgg", args.lpips_weights))
        features = ("ifd_vgg16", vgg.to(accelerator.device))

    main = accelerator.is_main_process
    acc = Diffusability(
        lambda x: vae.encode(x).latent_dist.mode(), lambda z: vae.decode(z).sample, lpips_model, features
    )
    for batch in loader:  # main computes on the gathered batches; a failure there ends every rank (agreement)
        x = accelerator.gather_for_metrics(batch["pixel_values"])
        with agreement():
            if main:
                acc.update(x)
    with agreement():
        return acc.compute(args.batch_size) if main else None


@torch.no_grad()
def likelihood(accelerator, vae, loader, args: EvalOptions, scale: float) -> dict:
    """−ELBO and the IWAE bound in bits per dimension (eval.latent), over the same images."""
    acc, generator, hw = LikelihoodAccumulator(), torch.Generator().manual_seed(args.seed + 1), None
    for batch in loader:
        x = batch["pixel_values"]
        hw = tuple(x.shape[-2:])
        weights = log_weights(vae, x, args.iwae_samples, scale, generator)  # [k, B]
        acc.update(accelerator.gather_for_metrics(weights.T.contiguous()).T)
    return acc.compute(hw, args.iwae_samples, scale)


def _fmt(value, digits: int) -> str:
    """A table cell: a number, or '–' when absent."""
    return "–" if value is None else f"{value:.{digits}f}"


def _half_cell(check: dict | None) -> str:
    """'finite (NN dB)' / 'NON-FINITE' / 'error' for the fp16/bf16 columns."""
    if check is None:
        return "–"
    if check.get("finite") is None:
        return "error"
    return f"finite ({check['psnr_vs_fp32']:.0f} dB)" if check["finite"] else "**NON-FINITE**"


def render_report(payload: dict) -> str:
    """report.md: the side-by-side table and how the numbers were made."""
    models = payload["models"]
    fd_names = sorted({k for r in models.values() for k in r if k.startswith("fd_")})
    head = [
        "model",
        "PSNR ↑",
        "SSIM ↑",
        "MS-SSIM ↑",
        f"LPIPS-{payload['lpips_net']} ↓",
        "rFID ↓",
        *[f"{n} ↓" for n in fd_names],
        "enc img/s",
        "dec img/s",
        "peak MB",
        "fp16 decode",
        "bf16 decode",
        "tiled vs untiled (dB)",
    ]
    lines = [
        "# VAE reconstruction report",
        "",
        f"- data: {payload['data']} — {payload['n_images']} images at {payload['resolution']} px "
        f"(resize shorter side, bicubic antialiased, centre crop)",
        "- PSNR/SSIM/MS-SSIM on 8-bit images (data range 255), mean over images; reconstructions use the "
        "posterior mode",
        f"- rFID: {payload['rfid_status']}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, r in models.items():
        half = r.get("half_precision_decode", {})
        tiling = r.get("tiling")
        cells = [
            f"`{name}`",
            _fmt(r.get("psnr"), 2),
            _fmt(r.get("ssim"), 4),
            _fmt(r.get("ms_ssim"), 4),
            _fmt(r.get("lpips"), 4),
            _fmt(r.get("rfid"), 2),
            *[_fmt(r.get(n), 2) for n in fd_names],
            _fmt(r["encode_img_per_s"], 1),
            _fmt(r["decode_img_per_s"], 1),
            _fmt(r["peak_memory_mb"], 0),
            _half_cell(half.get("float16")),
            _half_cell(half.get("bfloat16")),
            _fmt(tiling and tiling["decode_psnr"], 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    first = next(iter(models.values()))
    lines += [
        "",
        f"Throughput is per process ({first['num_processes']}), including host-to-device time; peak memory is "
        f"{first['peak_memory_kind'].replace('_', ' ')}. fp16/bf16 decode: real latents of the first batch decoded "
        "in that dtype (finite? PSNR vs fp32; on CPU one 8x8-latent crop, as CPUs emulate fp16 slowly). Tiled vs "
        "untiled: one image at twice the resolution decoded with "
        "`enable_tiling()` and without (PSNR between the two; higher = fewer seams).",
        "",
        "`reconstructions.png`: first row the originals, then one row per model in the order above.",
        *latent_section(models),
        *diffusability_section(models),
    ]
    return "\n".join(lines) + "\n"


def diffusability_section(models: dict) -> list[str]:
    """report.md's diffusability table: equivariance next to the plain reconstruction, HF fraction, iFD."""
    reports = {m: r["diffusability"] for m, r in models.items() if r.get("diffusability")}
    if not reports:
        return []
    fd = "ifid" if any("ifid" in d for d in reports.values()) else "ifd_vgg16"
    head = ["model", "PSNR", "PSNR ↓2", "PSNR ↓4", "LPIPS", "LPIPS ↓2", "LPIPS ↓4", "HF fraction (image)", f"{fd} ↓"]
    lines = ["", "## Diffusability", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, d in reports.items():
        eq = d["equivariance"]
        cells = [f"`{m}`", _fmt(models[m].get("psnr"), 2)]
        cells += [_fmt(eq.get(s, {}).get("psnr"), 2) for s in ("2", "4")]
        cells += [_fmt(models[m].get("lpips"), 4)] + [_fmt(eq.get(s, {}).get("lpips"), 4) for s in ("2", "4")]
        cells += [f"{d['hf_fraction']:.4f} ({d['image_hf_fraction']:.4f})", _fmt(d.get(fd), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [
        "",
        "PSNR ↓s / LPIPS ↓s: D(↓ₛz) against ↓ₛx (z the posterior mode, the same antialiased bilinear downsampling "
        "for both; LPIPS on both resized back to the evaluation size) next to the plain reconstruction: how far a "
        "downsampled latent is from decoding to the downsampled image (scale equivariance, Skorokhodov et al. 2025). "
        "HF fraction: share of the latents' power above half the Nyquist radius (DC removed; the images resized to "
        f"the latent size in brackets). {fd}: Fréchet distance of decoded nearest-neighbour latent midpoints to the "
        "real images (" + ("FID Inception" if fd == "ifid" else "VGG16 features, not FID") + "). `spectrum_N.png`: "
        "both radial spectra on log axes.",
    ]


def _per_channel(values: list[float], digits: int = 3) -> str:
    """A per-channel list as 'c0 v, c1 v, ...'."""
    return ", ".join(f"{v:.{digits}g}" for v in values)


def latent_section(models: dict) -> list[str]:
    """report.md's latent-space part: rate, active units, prior gap, likelihood, per-channel detail, pictures."""
    head = [
        "model",
        "rate (bits/px)",
        "KL/elem (nats)",
        "active units",
        "active channels",
        "collapsed",
        "prior FD",
        "−ELBO (bpd)",
        "IWAE NLL (bpd)",
    ]
    lines = ["", "## Latent space", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in models.items():
        lat = r["latent"]
        lines.append(
            "| "
            + " | ".join(
                [
                    f"`{name}`",
                    f"{lat['rate_bpp']:.4f}",
                    f"{lat['kl_per_latent_nats']:.4f}",
                    f"{lat['active_units']}/{lat['units']}",
                    f"{lat['active_channels']}/{lat['latent_shape'][0]}",
                    str(lat["collapsed_channels"] or "none"),
                    f"{lat['prior_fd']:.3f}",
                    _fmt(lat.get("neg_elbo_bpd"), 4),
                    _fmt(lat.get("iwae_nll_bpd"), 4),
                ]
            )
            + " |"
        )
    first = next(iter(models.values()))["latent"]
    lines += [
        "",
        "- rate: KL(q(z|x) ‖ N(0, I)) per latent element, and per image in bits per input pixel (KL / (H·W·ln 2))",
        "- active unit (Burda et al. 2016): Var over images of the posterior mean of one latent unit (channel, "
        "row, column) > 0.01; a channel active at < 1 % of its positions is collapsed",
        "- prior FD: Gaussian Fréchet distance between the aggregate posterior of the C-dim latent vector at a "
        "position (posterior samples pooled over images and positions) and N(0, I); 0 = the prior's moments",
        "- likelihood: "
        + (
            "discretised Laplace decoder over the 256 levels with each model's maximum-likelihood "
            "scale (mean |x − x̂| of its mode reconstructions, listed below), prior N(0, I); IWAE with "
            f"k = {first['iwae_samples']} posterior samples; bits per dimension over the 3·H·W 8-bit values"
            if "iwae_samples" in first
            else "not computed (--iwae_samples 0)"
        ),
        "",
    ]
    for name, r in models.items():
        lat = r["latent"]
        lines += [
            f"`{name}` per channel: KL (nats/elem) {_per_channel(lat['kl_per_channel_nats'])}; active fraction "
            f"{_per_channel(lat['active_fraction_per_channel'], 2)}; posterior std "
            f"{_per_channel(lat['posterior_std_per_channel'])}; aggregate mean "
            f"{_per_channel(lat['aggregate_mean_per_channel'])}, std {_per_channel(lat['aggregate_std_per_channel'])}"
            + (f"; Laplace scale {lat['laplace_scale_levels']:.3g} levels" if "laplace_scale_levels" in lat else "")
            + (f". Pictures: `{lat['figure']}`" if "figure" in lat else ""),
            "",
        ]
    lines.append(
        "Pictures: traversals (one row per channel, moved over ±2σ of its aggregate distribution), linear and "
        "spherical interpolation between two held-out images, samples from the aggregate-matched prior."
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m eval``; exit 0 done, 1 crash, 2 bad input, 3 out of memory (autoencoder.errors)."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    """The body of ``main`` (errors are reported by ``run_cli``)."""
    if "-h" in argv or "--help" in argv:
        print(options_help(EvalOptions, "python -m eval --model A [--model B ...] [--key=value ...]", __doc__))
        return 0
    args = parse_options(EvalOptions, argv)
    n = requested_cpu_processes()
    if n > 1:
        return relaunch_cpu(n, "eval", argv)
    accelerator = Accelerator(cpu=use_cpu_backend())
    args.batch_size = resolve_batch_size(args.batch_size, accelerator.device)
    with agreement():  # no collective in here: a failure on one rank ends every rank
        check_args(args)
        lpips_model = build_lpips(args.lpips_net, args.lpips_weights).to(accelerator.device)
        extractors, unavailable = build_extractors(args)
        dataset, source = eval_dataset(args)
    extractors = {name: ex.to(accelerator.device) for name, ex in extractors.items()}
    # One image at 2x the resolution (at least 2 tiles per side for any tile size up to the resolution).
    large_image = ImageDataset(dataset.ds, dataset.column, eval_transform(2 * args.resolution))[0]["pixel_values"][None]
    workers = loader_workers("auto", accelerator.device, accelerator.num_processes)  # decoding off the main process
    loader = accelerator.prepare(
        torch.utils.data.DataLoader(
            dataset, batch_size=args.batch_size, collate_fn=collate, num_workers=workers, pin_memory=workers > 0
        )
    )
    feature_accs, originals = real_pass(accelerator, loader, extractors, args.grid_images)
    results, rows, pictures = {}, [originals], {}
    for model_id in args.model:
        try:
            results[model_id], row, pictures[model_id] = evaluate_model(
                accelerator, args, model_id, loader, lpips_model, feature_accs, extractors, large_image
            )
            if not args.no_diffusability:
                results[model_id]["diffusability"] = diffusability_of(
                    accelerator, args, model_id, loader, lpips_model, extractors
                )
        except Exception as exc:
            if not is_oom(exc):
                raise
            raise OutOfMemory(
                f"out of memory evaluating {model_id} at --batch_size {args.batch_size}, "
                f"--resolution {args.resolution} (tiling check at {2 * args.resolution} px)",
                "lower --batch_size, or add --no_tiling_check",
            ) from exc
        if "rfid" in unavailable:
            results[model_id]["rfid"] = None
            results[model_id]["rfid_unavailable"] = unavailable["rfid"]
        rows.append(row)
    if accelerator.is_main_process:
        folder = RunDir(args.output_dir, EVAL, "--output_dir")
        folder.claim()
        out = folder.path
        rfid_status = (
            "skipped (--no_fid)"
            if args.no_fid
            else f"unavailable — {unavailable['rfid']}"
            if "rfid" in unavailable
            else "standard FID InceptionV3 (TF 2015-12-05 weights, sha256 verified), pool3 2048-d"
        )
        payload = {
            "data": source,
            "dataset": dataset_facts(args, dataset),
            "n_images": len(dataset),
            "resolution": args.resolution,
            "preprocessing": "resize shorter side (bicubic, antialiased) + centre crop",
            "lpips_net": args.lpips_net,
            "rfid_status": rfid_status,
            "models": results,
        }
        for i, (model_id, rows_of) in enumerate(pictures.items()):
            latent = results[model_id]["latent"]
            latent["figure"] = f"latent_{i}.png"
            save_latent_figure(rows_of, latent, out / latent["figure"], f"{model_id}: latent space")
            if warning := collapse_warning(latent):
                print(f"warning: {model_id}: {warning}", file=sys.stderr)
            if report := results[model_id].get("diffusability"):
                report["figure"] = f"spectrum_{i}.png"
                save_spectrum_figure(report, out / report["figure"], f"{model_id}: radial power spectra")
        folder.write_text("metrics.json", json.dumps(payload, indent=2))
        folder.write_text("report.md", render_report(payload))
        n = min(len(r) for r in rows)
        grid = make_grid(torch.cat([r[:n] for r in rows]), nrow=n, normalize=True, value_range=(-1, 1), padding=2)
        save_image(grid, out / "reconstructions.png")
        print(render_report(payload))
        print(f"wrote {out}/metrics.json, report.md, reconstructions.png")
    return 0
