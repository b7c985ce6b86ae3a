"""Evaluate diffusers VAEs side by side on the same images: ``python -m eval --model A [--model B ...]``.

Every model sees identical inputs (the evaluation policy: resize the shorter side to the resolution,
bicubic antialiased, centre crop), is loaded once and makes one pass over them (``eval.engine``), scored
with the metric code training validation uses: PSNR/SSIM/MS-SSIM on 8-bit images, LPIPS, the colour
shift, rFID and KID on the FID Inception (or "unavailable" with the reason), the latent space (rate,
active units, prior gap, ELBO/IWAE), the diffusability figures (iFID, scale equivariance, spectrum) and,
with ``--probe_labels``, a linear probe.  Writes ``metrics.json``, ``report.md`` and the pictures to
--output_dir.
"""

import json
import sys
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
from autoencoder.errors import OutOfMemory, UsageError, agreement, is_oom, run_cli
from autoencoder.folders import RunDir
from autoencoder.launch import relaunch_cpu, requested_cpu_processes, use_cpu_backend
from autoencoder.lpips_weights import backbone_features, build_lpips
from autoencoder.models import (
    check_resolution,
    load_vae,
    load_vae_config,
    seeded_noise,
)

from .checks import model_checks, peak_memory_mb
from .diffusability import CheckerboardVAE, Diffusability, save_spectrum_figure
from .engine import Metric, Samples, TimedVAE, evaluate
from .fid import (
    FID_MIN_IMAGES,
    FeatureBank,
    FeatureCache,
    FeatureDistances,
    InceptionFeatures,
    VGG16Features,
    default_cache_folder,
    resolve_fid_weights,
)
from .latent import LatentReport, Likelihood, collapse_warning, picture_rows, save_latent_figure
from .metrics import Reconstruction
from .probe import LinearProbe
from .report import render_report

EVAL = "python -m eval"  # the marker of its --output_dir (autoencoder.folders)


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
    num_images: int | None = opt(None, "evaluate N images spread evenly over the split (default: all)")
    batch_size: int | Literal["auto"] = opt("auto", "images per batch; auto = 32 on a GPU (keeps it busy), 8 on a CPU")
    lpips_net: Literal["alex", "vgg"] = opt("alex", "LPIPS backbone; AlexNet as in the LPIPS paper")
    lpips_weights: str | None = opt(None, "local backbone file/folder (else $LPIPS_WEIGHTS/torchvision)")
    fid_weights: str | None = opt(
        None,
        "FID Inception weights: torch-fidelity's .pth or NVlabs' TorchScript (else $FID_WEIGHTS, hub cache, download)",
    )
    no_fid: bool = opt(False, "skip rFID and KID")
    no_fid_download: bool = opt(False, "never try to download the Inception weights")
    no_feature_cache: bool = opt(False, "recompute the real images' features instead of reading them from the cache")
    feature_cache_dir: str | None = opt(None, "where the real images' features are cached (default ~/.cache/...)")
    reference_split: str | None = opt(
        None,
        "reference images from this split (e.g. train): iFID's reference latents and the linear probe's training set;"
        " default: iFID on the evaluation images, each its own left out, and no probe",
    )
    reference_images: int = opt(10000, "images of --reference_split (N spread evenly over it)")
    probe_labels: str | None = opt(None, "column of class labels: fit a linear probe on --reference_split's latents")
    latent_control: Literal["none", "checkerboard"] = opt(
        "none", "evaluate a control instead: 'checkerboard' flips the latents around their mean in a ±1 checkerboard"
    )
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
    if args.probe_labels and not args.reference_split:
        raise UsageError(
            "--probe_labels needs --reference_split (the probe's training images)", "add --reference_split train"
        )
    if args.reference_images < 2:
        raise UsageError(f"--reference_images must be >= 2, got {args.reference_images}", "set it to 2 or more")
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


def build_extractors(args: EvalOptions, need_vgg: bool) -> tuple[dict[str, torch.nn.Module], str | None]:
    """Feature extractors by feature name ('inception', 'vgg16'), and why rFID is unavailable (None if it is not).

    ``need_vgg``: the interpolation FD falls back to VGG16 features where the FID Inception is not found.
    """
    extractors, unavailable = {}, None
    if not args.no_fid:
        weights = resolve_fid_weights(args.fid_weights, download=not args.no_fid_download)
        if weights.path is None:
            unavailable = weights.unavailable
        else:
            extractors["inception"] = InceptionFeatures(weights)
    if "vgg16" in args.fd or need_vgg and "inception" not in extractors:  # offline-available ImageNet features
        extractors["vgg16"] = VGG16Features(backbone_features("vgg", args.lpips_weights))
    return extractors, unavailable


@dataclass
class Shared:
    """What every model's evaluation shares: the data, LPIPS, the real images' features and the tiling image."""

    accelerator: Accelerator
    loader: torch.utils.data.DataLoader  # prepared
    lpips_model: torch.nn.Module
    bank: FeatureBank  # read from the cache, or filled by the first model's pass
    large_image: torch.Tensor  # [1,3,2R,2R]: one image at twice the resolution, for the tiling check
    rfid_unavailable: str | None
    reference: torch.utils.data.DataLoader | None  # prepared: --reference_split's images
    labels: torch.Tensor | None  # --probe_labels of the evaluation images, by index
    reference_labels: torch.Tensor | None  # and of the reference images


def model_metrics(args: EvalOptions, shared: Shared, vae: AutoencoderKL) -> dict[str, Metric]:
    """Everything one pass over the images measures of a model."""
    acc, bank = shared.accelerator, shared.bank
    metrics: dict[str, Metric] = {
        "bank": bank,  # the real images' features: the first model's pass fills them
        "reconstruction": Reconstruction(acc, shared.lpips_model),
        "latent": LatentReport(acc, args.seed),
        "grid": Samples(acc, args.grid_images),
    }
    if "inception" in bank.extractors:
        metrics["rfid"] = FeatureDistances(acc, bank, "inception")
    if "vgg16" in args.fd:
        metrics["fd_vgg16"] = FeatureDistances(acc, bank, "vgg16")
    if args.iwae_samples:
        metrics["likelihood"] = Likelihood(acc, vae, args.iwae_samples, args.seed)
    if shared.labels is not None:
        metrics["probe"] = LinearProbe(acc, shared.labels)
    if not args.no_diffusability:
        features = "inception" if "inception" in bank.extractors else "vgg16"  # VGG16: an FD, never called FID
        name = "ifid" if features == "inception" else "ifd_vgg16"
        metrics["diffusability"] = Diffusability(
            acc, vae, shared.lpips_model, bank, features, name, args.batch_size, args.seed
        )
    return metrics


@torch.no_grad()
def evaluate_model(args: EvalOptions, shared: Shared, model_id: str) -> tuple[dict, dict, dict]:
    """One model, loaded once, over one pass of the images: (its figures, its grid images, its latent pictures)."""
    device = shared.accelerator.device
    vae = load_vae(model_id, args.subfolder)
    vae = (CheckerboardVAE(vae) if args.latent_control == "checkerboard" else vae).to(device).eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    forward = TimedVAE(vae, device)
    first = shared.loader.dataset[0]["pixel_values"][None]  # not the prepared loader: see gather_for_metrics
    forward.warm_up(first.repeat(args.batch_size, 1, 1, 1))
    metrics = model_metrics(args, shared, vae)
    if shared.reference is not None and ("diffusability" in metrics or "probe" in metrics):  # else nothing reads it
        samples, means = reference_latents(args, shared, vae)
        if "diffusability" in metrics:
            metrics["diffusability"].reference = samples
        if "probe" in metrics:
            metrics["probe"].train = (means, shared.reference_labels[: len(means)])
    figures = evaluate(shared.loader, forward, metrics)
    result = {**figures["reconstruction"], "resolution": args.resolution, **forward.throughput()}
    result.update(zip(("peak_memory_mb", "peak_memory_kind"), peak_memory_mb(device)))
    result.update(num_processes=shared.accelerator.num_processes, latent_shape=figures["latent"]["latent_shape"])
    if "rfid" in figures:
        result.update(feature_figures(figures["rfid"]))
    if "fd_vgg16" in figures:
        result["fd_vgg16"] = figures["fd_vgg16"]["fd"]
    if shared.rfid_unavailable:
        result.update(rfid=None, rfid_unavailable=shared.rfid_unavailable)
    z_a, z_b = metrics["latent"].first_means  # posterior means [C,h,w] of the first two images
    tiling = not args.no_tiling_check and args.latent_control == "none"  # the control has no tiled decoder
    large = shared.large_image.to(device) if tiling else None
    result.update(model_checks(vae, torch.stack([z_a, z_b]).to(device), large, half=not args.no_half_check))
    result["latent"] = {**figures["latent"], **figures.get("likelihood", {})}
    if "probe" in figures:
        result["linear_probe"] = figures["probe"]
    if args.latent_control != "none":
        result["latent_control"] = args.latent_control
    if "diffusability" in figures:
        result["diffusability"] = figures["diffusability"]
    return result, figures["grid"], picture_rows(vae, z_a, z_b, result["latent"], seed=args.seed)


def feature_figures(found: dict) -> dict:
    """rFID and KID (mean ± std over subsets) on the FID Inception, the image count, and FID's small-N warning."""
    out = {"rfid": found["fd"], "kid": found["kid"], "fid_images": found["n_fake"]}
    if found["n_fake"] < FID_MIN_IMAGES:
        out["fid_warning"] = (
            f"FID from {found['n_fake']} images (< {FID_MIN_IMAGES}) is biased upward and not comparable with "
            "FIDs of other image counts; compare KID, which is unbiased"
        )
    return out


@torch.no_grad()
def reference_latents(args: EvalOptions, shared: Shared, vae: AutoencoderKL) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over --reference_split: posterior samples [M,C,h,w] (iFID's reference, seeded per image) and
    posterior means [M, C·h·w] (the probe's training features), gathered, in dataset order."""
    acc, samples, means = shared.accelerator, [], []
    for batch in shared.reference:
        posterior = vae.encode(batch["pixel_values"].to(acc.device)).latent_dist
        noise = seeded_noise(tuple(posterior.mean.shape[1:]), batch["index"], args.seed + 2).to(posterior.mean)
        sample, mean = acc.gather_for_metrics((posterior.mean + posterior.std * noise, posterior.mean))
        samples.append(sample.float().cpu())
        means.append(mean.float().flatten(1).cpu())
    return torch.cat(samples), torch.cat(means)


def prepare(args: EvalOptions, accelerator: Accelerator) -> tuple[Shared, str, ImageDataset]:
    """Check everything (every rank, no collective), then load what every model shares; (shared, source, data)."""
    with agreement():  # a failure on one rank ends every rank
        check_args(args)
        lpips_model = build_lpips(args.lpips_net, args.lpips_weights).to(accelerator.device)
        extractors, unavailable = build_extractors(args, need_vgg=not args.no_diffusability)
        dataset, source = eval_dataset(args)
        reference = reference_dataset(args)
        labels, reference_labels = label_column(args, dataset), label_column(args, reference)
        # The main process alone reads and writes the cache (its key reads every image's bytes).
        keep = accelerator.is_main_process and extractors and not args.no_feature_cache
        cache = feature_cache(args, dataset, source) if keep else None
    extractors = {name: ex.to(accelerator.device) for name, ex in extractors.items()}
    # One image at 2x the resolution (at least 2 tiles per side for any tile size up to the resolution).
    large_image = ImageDataset(dataset.ds, dataset.column, eval_transform(2 * args.resolution))[0]["pixel_values"][None]
    bank = FeatureBank(accelerator, extractors, cache)
    loader = accelerator.prepare(data_loader(args, dataset, accelerator))
    reference = None if reference is None else accelerator.prepare(data_loader(args, reference, accelerator))
    shared = Shared(
        accelerator, loader, lpips_model, bank, large_image, unavailable, reference, labels, reference_labels
    )
    return shared, source, dataset


def label_column(args: EvalOptions, dataset: ImageDataset | None) -> torch.Tensor | None:
    """--probe_labels of ``dataset`` as integers by index (None without a probe), checked to exist."""
    if dataset is None or args.probe_labels is None:
        return None
    if args.probe_labels not in dataset.ds.column_names:
        raise UsageError(
            f"--probe_labels column {args.probe_labels!r} is not in the data (columns: {dataset.ds.column_names})",
            "give the column that holds the class labels, e.g. --probe_labels label",
        )
    return torch.tensor(dataset.ds[args.probe_labels], dtype=torch.long)


def data_loader(args: EvalOptions, dataset: ImageDataset, accelerator: Accelerator) -> torch.utils.data.DataLoader:
    """Batches of --batch_size in order, decoded off the main process where there are cores for it."""
    workers = loader_workers("auto", accelerator.device, accelerator.num_processes)
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, collate_fn=collate, num_workers=workers, pin_memory=workers > 0
    )


def reference_dataset(args: EvalOptions) -> ImageDataset | None:
    """--reference_split of the same source (iFID's reference, the probe's training images), or None."""
    if args.reference_split is None:
        return None
    ds, column, _ = load_image_source(
        args.dataset_name,
        args.train_data_dir,
        args.image_column,
        args.reference_split,
        args.resolution,
        args.reference_images,
    )
    return ImageDataset(ds, column, eval_transform(args.resolution))


def feature_cache(args: EvalOptions, dataset: ImageDataset, source: str) -> FeatureCache:
    """Where the real images' features are kept, keyed by the images as stored and how they are prepared."""
    facts = {
        "images": dataset.fingerprint(),
        "source": source,
        "count": len(dataset),
        "resolution": args.resolution,
        "preprocessing": "resize shorter side (bicubic, antialiased) + centre crop, 8-bit",
    }
    return FeatureCache(Path(args.feature_cache_dir) if args.feature_cache_dir else default_cache_folder(), facts)


def evaluate_all(args: EvalOptions, shared: Shared) -> tuple[dict, list[torch.Tensor], dict]:
    """Every model in turn: (figures by model, grid rows: the originals then one per model, pictures by model)."""
    results, rows, pictures = {}, [], {}
    for model_id in args.model:
        try:
            results[model_id], grid, pictures[model_id] = evaluate_model(args, shared, model_id)
        except Exception as exc:
            if not is_oom(exc):
                raise
            raise OutOfMemory(
                f"out of memory evaluating {model_id} at --batch_size {args.batch_size}, "
                f"--resolution {args.resolution} (tiling check at {2 * args.resolution} px)",
                "lower --batch_size, or add --no_tiling_check",
            ) from exc
        rows += [grid["inputs"]] * (not rows) + [grid["recons"]]
    return results, rows, pictures


def write_outputs(args: EvalOptions, payload: dict, rows: list[torch.Tensor], pictures: dict) -> None:
    """metrics.json, report.md, reconstructions.png and the pictures of each model (main process)."""
    folder = RunDir(args.output_dir, EVAL, "--output_dir")
    folder.claim()
    results = payload["models"]
    for i, (model_id, rows_of) in enumerate(pictures.items()):
        latent = results[model_id]["latent"]
        latent["figure"] = f"latent_{i}.png"
        save_latent_figure(rows_of, latent, folder.path / latent["figure"], f"{model_id}: latent space")
        if warning := collapse_warning(latent):
            print(f"warning: {model_id}: {warning}", file=sys.stderr)
        if report := results[model_id].get("diffusability"):
            report["figure"] = f"spectrum_{i}.png"
            save_spectrum_figure(report, folder.path / report["figure"], f"{model_id}: radial power spectra")
    folder.write_text("metrics.json", json.dumps(payload, indent=2))
    folder.write_text("report.md", render_report(payload))
    n = min(len(r) for r in rows)
    grid = make_grid(torch.cat([r[:n] for r in rows]), nrow=n, normalize=True, value_range=(-1, 1), padding=2)
    save_image(grid, folder.path / "reconstructions.png")
    print(render_report(payload))
    print(f"wrote {folder.path}/metrics.json, report.md, reconstructions.png")


def rfid_status(args: EvalOptions, unavailable: str | None) -> str:
    """How rFID was computed, or why not."""
    if args.no_fid:
        return "skipped (--no_fid)"
    if unavailable:
        return f"unavailable — {unavailable}"
    return (
        "the FID InceptionV3 (TF inception-2015-12-05, sha256 verified; torch-fidelity's network and its "
        "TF1-compatible bilinear resize to 299), pool3 2048-d; KID: unbiased MMD² with a cubic kernel, mean ± std "
        "over 100 subsets"
    )


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
    shared, source, dataset = prepare(args, accelerator)
    results, rows, pictures = evaluate_all(args, shared)
    if accelerator.is_main_process:
        payload = {
            "data": source,
            "dataset": dataset_facts(args, dataset),
            "n_images": len(dataset),
            "resolution": args.resolution,
            "preprocessing": "resize shorter side (bicubic, antialiased) + centre crop",
            "lpips_net": args.lpips_net,
            "rfid_status": rfid_status(args, shared.rfid_unavailable),
            "models": results,
        }
        write_outputs(args, payload, rows, pictures)
    return 0
