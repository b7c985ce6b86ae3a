"""``python -m diffusion_bridge``: how a trained VAE meets diffusion models.

Subcommands: ``info`` (latent facts from the config), ``stats`` (dataset latent statistics ->
scaling/shift factors, optionally written into the config), ``encode`` (a latent cache for
diffusion training), ``publish`` (a Hub repo with model card).
"""

import dataclasses
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL

from autoencoder.config import DataConfig, check_one_source, opt, options_help, parse_options, plain_text, required
from autoencoder.data import (
    ImageDataset,
    check_enough_images,
    collate,
    data_flag,
    eval_transform,
    load_image_source,
    train_transform,
)
from autoencoder.errors import UsageError, agreement, check_output_writable, run_cli
from autoencoder.folders import RunDir
from autoencoder.launch import relaunch_cpu, requested_cpu_processes, use_cpu_backend
from autoencoder.models import check_resolution, count_parameters, downsampling_factor, is_training_checkpoint, load_vae

from .cache import SETTINGS, check_settings, encode_dataset, weights_sha256
from .publish import prepare_folder, upload
from .stats import LatentScaling, collect_latent_stats, describe, process_shard, too_few_images, write_stats


def vae_info(vae: AutoencoderKL) -> dict:
    """The latent-space facts a diffusion pipeline relies on, read from the VAE's config."""
    c = vae.config
    return {
        "latent_channels": c.latent_channels,
        "downsampling_factor": downsampling_factor(vae),
        "scaling_factor": c.scaling_factor,
        "shift_factor": c.shift_factor,
        "latents_mean": c.latents_mean,
        "latents_std": c.latents_std,
        "force_upcast": c.force_upcast,
        "parameters": count_parameters(vae),
    }


@dataclass(kw_only=True)
class InfoOptions:
    """``info``: print the latent-space facts of a diffusers VAE."""

    model: str = required("diffusers VAE folder or Hub id")
    subfolder: str | None = opt(None, "subfolder inside the model repo, e.g. 'vae'")


@dataclass(kw_only=True)
class DataOptions(InfoOptions):
    """The model and image-source options shared by ``stats`` and ``encode``."""

    model: str = required("diffusers VAE folder, Hub id, or training checkpoint folder")
    dataset_name: str | None = opt(None, "Hub dataset id")
    train_data_dir: str | None = opt(None, "local image folder or parquet file(s)")
    image_column: str = opt("image", "column holding the images")
    split: str | None = opt(None, "split (default: validation, test, then train)")
    resolution: int = opt(256, "image resolution (resize shorter side, then crop)")
    num_images: int | None = opt(None, "N images spread evenly over the split (default: all)")
    batch_size: int = opt(16, "images per batch")
    crop: Literal["center", "random"] = opt(
        "center", "center: the evaluation policy (resize shorter side, antialiased, centre crop); random crops"
    )
    seed: int = opt(0, "posterior sampling and random crops")


@dataclass(kw_only=True)
class StatsOptions(DataOptions):
    """``stats``: latent statistics over a dataset -> scaling_factor, shift_factor, ..."""

    mode: bool = opt(False, "use the posterior mode instead of posterior samples")
    write: bool = opt(False, "store them in the model's config + latent_stats.json")
    convention: Literal["sd", "sd3", "sdxl"] = opt(
        "sd3",
        "config keys --write sets: sd = scaling_factor; sd3 (default) = scaling_factor + shift_factor (serves "
        "SD/DiT and SD3/FLUX); sdxl = latents_mean/latents_std per channel with scaling_factor 1 (SDXL)",
    )
    output: str | None = opt(None, "also write the statistics to this JSON file")


@dataclass(kw_only=True)
class EncodeOptions(DataOptions):
    """``encode``: encode a dataset into a sharded latent cache for diffusion training."""

    split: str | None = opt("train", "split to encode")
    output_dir: str = required("folder of the latent cache (parquet shards)")
    shard_size: int = opt(1000, "images per parquet shard")
    convention: Literal["sd", "sd3", "sdxl"] = opt(
        "sd",
        "sd: latents = z*scale (SD/DiT); sd3: (z-shift)*scale (SD3/FLUX); sdxl: (z-latents_mean)/latents_std*scale "
        "(StableDiffusionXLPipeline)",
    )
    scaling_factor: float | None = opt(None, "override the config's scaling_factor")
    shift_factor: float | None = opt(None, "override the config's shift_factor (sd3)")
    mode: bool = opt(False, "store the posterior mean instead of a posterior sample")
    store_moments: bool = opt(False, "also store posterior mean and log-variance")
    num_workers: int = opt(0, "DataLoader workers for image decoding")


@dataclass(kw_only=True)
class PublishOptions:
    """``publish``: publish a VAE folder to the Hub with an fp16 variant and a model card."""

    model: str = required("exported diffusers VAE folder, e.g. outputs/vae-cpu-small/vae")
    repo_id: str = required("USER/NAME on the Hugging Face Hub")
    private: bool = opt(False, "create the repo as private")
    revision: str | None = opt(None, "branch to upload to (created if missing)")
    commit_message: str | None = opt(None, "the commit message on the Hub")
    eval_dir: str | None = opt(None, "output folder of `python -m eval` for this model")
    dry_run: str | None = opt(None, "write the repo folder to this folder, upload nothing")
    folder: str | None = opt(None, "where to prepare the folder (default: MODEL/../hub-upload)")
    license: str = opt("apache-2.0", "license tag of the model card")
    allow_missing_stats: bool = opt(False, "publish without latent statistics")
    allow_missing_eval: bool = opt(False, "publish without an evaluation")


def image_dataset(args: DataOptions) -> tuple[ImageDataset, str]:
    """The images under the chosen crop policy (probed: some must decode), and their description."""
    check_one_source(args.dataset_name, args.train_data_dir)
    for name in ("resolution", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}", f"set --{name} to 1 or more")
    ds, column, source = load_image_source(
        args.dataset_name, args.train_data_dir, args.image_column, args.split, args.resolution, args.num_images
    )
    if args.crop == "center":
        dataset = ImageDataset(ds, column, eval_transform(args.resolution))
    else:  # training's random-crop transform (resize shorter side, antialiased bicubic, random crop), without flips
        config = DataConfig(resolution=args.resolution, train_crop="random", random_flip=False)
        dataset = ImageDataset(ds, column, train_transform(config, embedded=False), seed=args.seed)
    flag = data_flag(args.dataset_name, args.train_data_dir)
    check_enough_images(dataset, 1, "input", flag, need="{n} image", fix="point the data flags at readable images")
    return dataset, source


def load_checked(args: DataOptions) -> tuple[AutoencoderKL, ImageDataset, str]:
    """The VAE (resolution checked against its downsampling) and the images; no collective inside."""
    vae = load_vae(args.model, args.subfolder).eval()
    factor = downsampling_factor(vae)
    check_resolution(args.resolution, factor)
    dataset, source = image_dataset(args)
    return vae, dataset, source


def cmd_stats(args: StatsOptions) -> int:
    """``stats``: measure, print, and with --write store the latent statistics."""
    if args.write and (not Path(args.model).is_dir() or is_training_checkpoint(args.model)):
        raise UsageError(
            f"--write needs a local diffusers model folder; {args.model!r} is not one",
            "download a Hub model first; export a training checkpoint by finishing or resuming its run",
        )
    accelerator = Accelerator(cpu=use_cpu_backend())
    with agreement():  # no collective in here: a failure on one rank ends every rank
        if args.write:
            check_output_writable("--model", Path(args.model) / (args.subfolder or ""))
        if args.output:
            check_output_writable("--output", Path(args.output).parent)
        vae, dataset, source = load_checked(args)
    vae.to(accelerator.device)
    shard = process_shard(dataset, accelerator.process_index, accelerator.num_processes)
    loader = torch.utils.data.DataLoader(shard, batch_size=args.batch_size, collate_fn=collate)
    stats = collect_latent_stats(vae, loader, accelerator, sample_posterior=not args.mode, seed=args.seed)
    if accelerator.is_main_process:
        drawn = "posterior mode" if args.mode else "posterior samples"
        print(f"{source}, {args.resolution} px, {args.crop} crops, {drawn}")
        print(describe(stats))
        if warning := too_few_images(stats.num_images):
            print(f"warning: {warning}", file=sys.stderr)
        for name in ("sd", "sd3", "sdxl"):  # how the model's current config would scale these latents
            try:
                mean, std = LatentScaling.from_config(vae.config, name).scaled_moments(stats)
            except ValueError:
                continue
            print(
                f"under the model's current config, the {name} convention gives latents of mean {mean:.4f}, "
                f"std {std:.4f}"
            )
        if args.output:
            Path(args.output).write_text(json.dumps(stats.to_json(), indent=2))
        if args.write:
            model_dir = Path(args.model) / (args.subfolder or "")
            write_stats(model_dir, stats, vae.to("cpu"), convention=args.convention)
            written = {k: v for k, v in stats.config_values(args.convention).items() if v is not None}
            print(
                f"wrote the {args.convention} convention ({', '.join(written)}; the other keys cleared) to "
                f"{model_dir / 'config.json'} and {model_dir / 'latent_stats.json'}"
            )
    accelerator.wait_for_everyone()
    return 0


ENCODE = "python -m diffusion_bridge encode"  # the marker of a latent cache folder (autoencoder.folders)


def encode_scaling(args: EncodeOptions, vae: AutoencoderKL) -> LatentScaling:
    """The scaling the cache applies: the VAE config's under --convention, with --scaling_factor/--shift_factor."""
    keys = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")
    config = types.SimpleNamespace(**{k: vae.config[k] for k in keys})
    config.scaling_factor = args.scaling_factor if args.scaling_factor is not None else config.scaling_factor
    config.shift_factor = args.shift_factor if args.shift_factor is not None else config.shift_factor
    scaling = LatentScaling.from_config(config, args.convention)
    if args.convention != "sdxl" and scaling.scaling_factor == 1.0 and args.scaling_factor is None:
        raise UsageError(
            f"{args.model} has scaling_factor 1.0 (no latent statistics)",
            "run `python -m diffusion_bridge stats --model DIR --write` first, or pass --scaling_factor explicitly",
        )
    return scaling


def encode_settings(args: EncodeOptions, vae, dataset: ImageDataset, scaling: LatentScaling) -> dict:
    """What determines the cache's shards (``diffusion_bridge.cache.check_settings``), JSON-typed.

    The weights by their sha256 (not the path they were given by); the images by their source, split and count
    (a local folder or file resolved to its absolute path), not their bytes: those of a large dataset take
    minutes to read, while every other rank waits."""
    data = str(Path(args.train_data_dir).resolve()) if args.train_data_dir else args.dataset_name
    settings = {
        "weights_sha256": weights_sha256(vae),
        "images": {"data": data, "split": args.split, "column": args.image_column, "count": len(dataset)},
        "resolution": args.resolution,
        "crop": args.crop,
        "scaling": dataclasses.asdict(scaling),
        "latents": "posterior mean" if args.mode else "posterior sample",
        "seed": args.seed,
        "store_moments": args.store_moments,
        "shard_size": args.shard_size,
    }
    return json.loads(json.dumps(settings))  # tuples as lists: equal to what the file reads back


def cmd_encode(args: EncodeOptions) -> int:
    """``encode``: write the latent cache a diffusion trainer consumes."""
    if args.shift_factor is not None and args.convention != "sd3":
        raise UsageError("--shift_factor applies to --convention sd3 only", "drop it or add --convention sd3")
    if args.shard_size < 1:
        raise UsageError(f"--shard_size must be >= 1, got {args.shard_size}", "set --shard_size to 1 or more")
    accelerator = Accelerator(cpu=use_cpu_backend())
    folder = RunDir(args.output_dir, ENCODE, "--output_dir")
    with agreement():  # no collective in here: a failure on one rank ends every rank
        folder.check()  # a cache folder of its own, or a new one
        vae, dataset, source = load_checked(args)
        scaling = encode_scaling(args, vae)
        settings = encode_settings(args, vae, dataset, scaling)
        check_settings(folder, settings)  # resume only a cache of these settings (every rank: it reads files)
    vae.to(accelerator.device)
    if accelerator.is_main_process:  # only now: a refused command leaves the folder as it was
        folder.claim()
        folder.write_text(SETTINGS, json.dumps(settings, indent=2))
    info = {"model": args.model, "source": source, "resolution": args.resolution, "crop": args.crop}
    done = encode_dataset(
        vae,
        dataset,
        folder,
        accelerator,
        scaling=scaling,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        sample=not args.mode,
        seed=args.seed,
        store_moments=args.store_moments,
        num_workers=args.num_workers,
        info=info,
    )
    rate = done["img_per_s_this_process"]
    print(
        f"[process {accelerator.process_index}] {done['images_encoded_by_this_process']} images in "
        f"{done['shards_written_by_this_process']} shards ({done['shards_skipped_by_this_process']} already done, "
        f"skipped) in {done['seconds']:.1f} s" + (f" = {rate:.1f} img/s" if rate else "")
    )
    if accelerator.is_main_process:
        print(f"latent cache of {done['num_images']} images in {args.output_dir} ({done['num_shards']} shards)")
    return 0


def cmd_publish(args: PublishOptions) -> int:
    """``publish``: prepare the repo folder (or only that, with --dry_run) and upload it."""
    model_dir = Path(args.model)
    folder = Path(args.dry_run or args.folder or model_dir.parent / "hub-upload")
    prepare_folder(
        model_dir,
        folder,
        args.repo_id,
        eval_dir=args.eval_dir,
        allow_missing_stats=args.allow_missing_stats,
        allow_missing_eval=args.allow_missing_eval,
        license=args.license,
    )
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    print(f"prepared {folder}: {', '.join(files)}")
    if args.dry_run:
        print("dry run: nothing uploaded")
        return 0
    url = upload(folder, args.repo_id, private=args.private, revision=args.revision, commit_message=args.commit_message)
    print(f"uploaded to https://huggingface.co/{args.repo_id} ({url})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m diffusion_bridge``; exit 0 done, 1 crash, 2 bad input, 3 out of memory."""
    return run_cli(_main, argv)


COMMANDS = {  # name -> its options (whose docstring says what the command does)
    "info": InfoOptions,
    "stats": StatsOptions,
    "encode": EncodeOptions,
    "publish": PublishOptions,
}


def usage() -> str:
    """The top-level ``--help``: the commands and how to get each one's options."""
    lines = [
        "usage: python -m diffusion_bridge COMMAND [--key=value ...]",
        "",
        plain_text(__doc__.strip()),
        "",
        "Commands:",
    ]
    lines += [f"  {name}  {cls.__doc__.split(': ', 1)[1]}" for name, cls in COMMANDS.items()]
    lines += ["", "python -m diffusion_bridge COMMAND --help lists the command's options (--key=value or --key value)."]
    return "\n".join(lines)


def _main(argv: list[str]) -> int:
    """The body of ``main`` (errors are reported by ``run_cli``)."""
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv:
        raise UsageError("no command given", f"give one of {', '.join(COMMANDS)} first (--help lists them)")
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise UsageError(
            f"unknown command {command!r}",
            f"give one of {', '.join(COMMANDS)} first, e.g. python -m diffusion_bridge stats --help",
        )
    options = COMMANDS[command]
    if "-h" in rest or "--help" in rest:
        print(options_help(options, f"python -m diffusion_bridge {command} [--key=value ...]", options.__doc__))
        return 0
    args = parse_options(options, rest)
    n = requested_cpu_processes()
    if n > 1 and command in ("stats", "encode"):
        return relaunch_cpu(n, "diffusion_bridge", argv)
    if command == "info":
        print(json.dumps(vae_info(load_vae(args.model, args.subfolder)), indent=2))
        return 0
    return {"stats": cmd_stats, "encode": cmd_encode, "publish": cmd_publish}[command](args)
