"""A latent cache for diffusion training: a dataset encoded once into scaled latents, as parquet shards.

Layout of ``output_dir``::

    data/shard-00000-of-00010.parquet   index, latents [C,h,w] (scaled), other source columns,
    ...                                 optionally posterior_mean / posterior_logvar (unscaled)
    cache_info.json                     model, resolution, convention, scaling/shift used, shapes
    encode_settings.json                what determines the shards (weights, images, scaling, seed, ...):
                                        a rerun with other settings is refused, never mixed in

``datasets.load_dataset("parquet", data_files="DIR/data/*.parquet", split="train")`` loads it (the
feature types, e.g. ``Array3D``, travel in the parquet schema).  Shards are assigned round-robin
to processes and written atomically (temporary name, then rename), so an interrupted run resumes
by skipping finished shards.  Posterior samples are drawn per image from a generator seeded by
(seed, source index): the cache does not depend on the number of processes or the batch size.
"""

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from autoencoder.data import ImageDataset, collate
from autoencoder.errors import UsageError, agreement
from autoencoder.folders import RunDir
from autoencoder.models import seeded_noise

from .stats import DECODE, LatentScaling


def shard_name(k: int, num_shards: int) -> str:
    """File name of shard ``k``."""
    return f"shard-{k:05d}-of-{num_shards:05d}.parquet"


def sample_latents(mean: torch.Tensor, logvar: torch.Tensor, indices: torch.Tensor, seed: int) -> torch.Tensor:
    """Posterior samples [B,C,h,w], each drawn with a generator seeded by (seed, its source index)."""
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # diffusers' DiagonalGaussianDistribution clamp
    return mean + std * seeded_noise(tuple(mean.shape[1:]), indices, seed).to(mean)


@torch.no_grad()
def encode_shard(
    vae: AutoencoderKL,
    dataset: ImageDataset,
    start: int,
    stop: int,
    *,
    batch_size: int,
    scaling: LatentScaling,
    sample: bool,
    seed: int,
    store_moments: bool,
    num_workers: int = 0,
    progress=None,
) -> datasets.Dataset:
    """Images [start, stop) of ``dataset`` -> a datasets.Dataset of scaled latents and source columns."""
    device = next(vae.parameters()).device
    subset = torch.utils.data.Subset(dataset, range(start, stop))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
    cols: dict[str, list] = {"index": [], "latents": []}
    if store_moments:
        cols["posterior_mean"], cols["posterior_logvar"] = [], []
    for batch in loader:
        moments = vae.encode(batch["pixel_values"].to(device)).latent_dist
        mean, logvar = moments.mean.float().cpu(), moments.logvar.float().cpu()
        z = sample_latents(mean, logvar, batch["index"], seed) if sample else mean
        cols["index"].append(batch["index"].numpy())
        cols["latents"].append(scaling.scale(z).numpy())
        if store_moments:
            cols["posterior_mean"].append(mean.numpy())
            cols["posterior_logvar"].append(logvar.numpy())
        if progress is not None:
            progress.update(len(z))
    arrays = {k: np.concatenate(v) for k, v in cols.items()}
    shape = arrays["latents"].shape[1:]
    features = {"index": datasets.Value("int64")}
    features.update({k: datasets.Array3D(shape=shape, dtype="float32") for k in arrays if k != "index"})
    # Carry the source's other columns (e.g. class labels) for conditional diffusion training.
    extra = dataset.ds.select(arrays["index"].tolist()).remove_columns(dataset.column)
    for name in extra.column_names:
        arrays[name] = extra[name]
        features[name] = extra.features[name]
    return datasets.Dataset.from_dict(arrays, features=datasets.Features(features))


SETTINGS = "encode_settings.json"


def weights_sha256(vae: torch.nn.Module) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes and bytes): which weights encoded a cache."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy())
    return digest.hexdigest()


def check_settings(folder: RunDir, settings: dict) -> None:
    """Refuse to add shards to a cache that other weights, images or scaling wrote: a rerun resumes only its own.

    ``settings`` (JSON-typed) is what determines the shards' contents.  A folder of shards without a record of
    its settings (written before the record existed) is refused too; a folder with no shard yet is anyone's."""
    where = f"--output_dir {str(folder.path)!r}"
    if not any((folder.path / "data").glob("shard-*.parquet")):
        return
    if not (folder.path / SETTINGS).is_file():
        raise UsageError(f"{where} holds latent shards of unknown settings (no {SETTINGS})", "give a new --output_dir")
    saved = json.loads((folder.path / SETTINGS).read_text())
    differ = sorted(k for k in saved.keys() | settings.keys() if saved.get(k) != settings.get(k))
    if differ:
        raise UsageError(
            f"{where} holds latents encoded with other settings ({', '.join(differ)} differ); adding to it "
            "would mix the two",
            "give a new --output_dir, or the settings it was written with to resume it",
        )


def encode_dataset(
    vae: AutoencoderKL,
    dataset: ImageDataset,
    folder: RunDir,
    accelerator,
    *,
    scaling: LatentScaling,
    shard_size: int = 1000,
    batch_size: int = 32,
    sample: bool = True,
    seed: int = 0,
    store_moments: bool = False,
    num_workers: int = 0,
    info: dict | None = None,
) -> dict:
    """Encode ``dataset`` into ``folder`` as ``scaling.scale(z)`` (a collective call); returns what was done."""
    n = len(dataset)
    num_shards = math.ceil(n / shard_size)
    data_dir = folder.path / "data"
    if accelerator.is_main_process:
        data_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    mine = list(range(accelerator.process_index, num_shards, accelerator.num_processes))
    todo = [k for k in mine if not (data_dir / shard_name(k, num_shards)).is_file()]
    todo_images = sum(min(n, (k + 1) * shard_size) - k * shard_size for k in todo)
    progress = tqdm(total=todo_images, desc="encode", unit="img", disable=not accelerator.is_local_main_process)
    settings = dict(batch_size=batch_size, scaling=scaling, sample=sample, seed=seed, store_moments=store_moments)
    t0 = time.perf_counter()
    with agreement():  # no collective inside: a full disk on one rank ends every rank with its message
        for k in todo:
            start, stop = k * shard_size, min(n, (k + 1) * shard_size)
            shard = encode_shard(vae, dataset, start, stop, **settings, num_workers=num_workers, progress=progress)
            final = data_dir / shard_name(k, num_shards)
            tmp = final.with_name(f".tmp-{accelerator.process_index}-{final.name}")
            with folder.guard(tmp, lambda: complete_shards(data_dir, num_shards), RERUN, partial=tmp):
                shard.to_parquet(str(tmp))
            os.replace(tmp, final)  # atomic: a shard file exists only when complete
    progress.close()
    seconds = time.perf_counter() - t0
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        facts = {**(info or {}), "num_images": n, "num_shards": num_shards, "shard_size": shard_size, "seed": seed}
        write_cache_info(folder, facts, scaling, sample, store_moments)
    return {
        "num_images": n,
        "num_shards": num_shards,
        "shards_written_by_this_process": len(todo),
        "shards_skipped_by_this_process": len(mine) - len(todo),
        "images_encoded_by_this_process": todo_images,
        "seconds": seconds,
        "img_per_s_this_process": todo_images / seconds if todo_images else None,
    }


def write_cache_info(folder: RunDir, facts: dict, scaling: LatentScaling, sample: bool, store_moments: bool) -> None:
    """``cache_info.json``: what the cache holds and how to decode it (main process, after every shard)."""
    data_dir, num_shards = folder.path / "data", facts["num_shards"]
    first = data_dir / shard_name(0, num_shards)
    latent_shape = datasets.load_dataset("parquet", data_files=str(first), split="train").features["latents"].shape
    meta = {
        **facts,
        "latent_shape": list(latent_shape),
        "latents": "posterior sample, seeded by (seed, index)" if sample else "posterior mean",
        **dataclasses.asdict(scaling),
        "decode": DECODE[scaling.convention],
        "posterior_moments_stored": store_moments,
        "load": f'datasets.load_dataset("parquet", data_files="{data_dir}/*.parquet", split="train")',
    }
    folder.write_text(
        "cache_info.json", json.dumps(meta, indent=2), lambda: complete_shards(data_dir, num_shards), RERUN
    )


RERUN = "rerun the same command: it continues with the missing shards"


def complete_shards(data_dir: Path, num_shards: int) -> str:
    """'3 of 10 shards are complete in DIR' (what a full disk leaves)."""
    done = len(list(data_dir.glob("shard-*.parquet")))
    return f"{done} of {num_shards} shards are complete in {data_dir}"


def load_latent_cache(output_dir: Path) -> datasets.Dataset:
    """The cache as one ``datasets.Dataset`` (torch format), shards in order."""
    files = sorted(str(p) for p in (Path(output_dir) / "data").glob("shard-*.parquet"))
    if not files:
        raise UsageError(
            f"no latent shards in {output_dir}/data",
            f"run `python -m diffusion_bridge encode --output_dir {output_dir}` first",
        )
    return datasets.load_dataset("parquet", data_files=files, split="train").with_format("torch")
