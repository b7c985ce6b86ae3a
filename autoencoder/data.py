"""Image data through ``datasets``: Hub ids, local folders/parquet, and an embedded real-photo default.

Images are decoded here rather than by ``datasets`` so that an unreadable file is skipped and
counted instead of crashing a run, and so that grayscale, palette, RGBA and 16-bit images are all
converted to 8-bit RGB the same way.
"""

import hashlib
import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

from .config import DataConfig
from .errors import UsageError, about, looks_like_path

logger = logging.getLogger(__name__)

# Real photographs inside the scikit-image wheel (no download needed).  Left out: synthetic
# images (phantom, logo, chessboards, text pages) and the noise-like grass/gravel/brick textures,
# which are near-incompressible at 8x and would dominate a short run's loss.  The held-out set
# is never trained on.
EMBEDDED_TRAIN = (
    "astronaut.png",
    "camera.png",
    "cell.png",
    "clock_motion.png",
    "coins.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
)
EMBEDDED_VALIDATION = ("chelsea.png", "coffee.png", "rocket.jpg")
# Each embedded photo yields this many random crops per epoch.
EMBEDDED_REPEATS = 64
# Held-out photos are cut into tiles after resizing their shorter side to this multiple of the
# resolution: the middle of the multiscale training range (DataConfig.multiscale_min/max).
EMBEDDED_TILE_SCALE = 4
# Consecutive unreadable images tolerated before the dataset is declared broken.
MAX_CONSECUTIVE_BAD = 16
PROBE_IMAGES = 64  # images decoded at start-up to catch an unreadable dataset in seconds


@dataclass
class ImageSplits:
    """Train and validation datasets (``datasets.Dataset`` with an undecoded image column)."""

    train: datasets.Dataset
    validation: datasets.Dataset
    image_column: str
    description: str
    embedded: bool


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB: EXIF-rotated, 16-bit rescaled, alpha composited onto white."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            # float images: [0,1] if they fit, else already on a 0-255 scale
            arr = arr * 255.0 if arr.max(initial=0.0) <= 1.0 else arr
        elif img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr * (255.0 / 65535.0)  # 16-bit (PNG 16-bit grayscale opens as I;16 or I)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def decode_image(value: Any) -> Image.Image:
    """Open an image stored by ``datasets`` (dict of bytes/path), a path, or a PIL image, as RGB."""
    if isinstance(value, Image.Image):
        img = value
    elif isinstance(value, dict):
        if value.get("bytes"):
            img = Image.open(io.BytesIO(value["bytes"]))
        elif value.get("path"):
            img = Image.open(value["path"])
        else:
            raise ValueError("image entry has neither bytes nor path")
    elif isinstance(value, (str, Path)):
        img = Image.open(value)
    else:
        raise ValueError(f"unsupported image value of type {type(value).__name__}")
    img.load()
    return to_rgb(img)


class RandomShorterSide:
    """Resize the shorter side to a random size in [lo, hi] pixels (antialiased bicubic, torch RNG)."""

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi

    def __call__(self, img: Image.Image) -> Image.Image:
        size = int(torch.randint(self.lo, self.hi + 1, ()).item())
        return T.functional.resize(img, size, interpolation=T.InterpolationMode.BICUBIC, antialias=True)


def train_transform(cfg: DataConfig, embedded: bool) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB -> [3,R,R] tensor in [-1,1] with the configured crop and flip."""
    crop = cfg.train_crop if cfg.train_crop != "auto" else ("multiscale" if embedded else "random")
    res = cfg.resolution
    if crop == "multiscale":
        resize = RandomShorterSide(round(cfg.multiscale_min * res), round(cfg.multiscale_max * res))
    else:
        resize = T.Resize(res, interpolation=T.InterpolationMode.BICUBIC, antialias=True)
    steps: list = [resize, T.CenterCrop(res) if crop == "center" else T.RandomCrop(res)]
    if cfg.random_flip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize([0.5], [0.5])]
    return T.Compose(steps)


def eval_transform(resolution: int) -> Callable[[Image.Image], torch.Tensor]:
    """Evaluation policy: resize the shorter side (antialiased bicubic), centre crop, scale to [-1,1]."""
    return T.Compose(
        [
            T.Resize(resolution, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(resolution),
            T.ToTensor(),
            T.Normalize([0.5], [0.5]),
        ]
    )


def seeded_transform(transform: Callable, img: Image.Image, key: tuple) -> torch.Tensor:
    """Apply a torchvision transform with its random draws seeded by ``key`` (global RNG untouched)."""
    # Only the CPU generator, which torchvision's PIL transforms draw from: torch.manual_seed would
    # also reseed the CUDA generator (posterior sampling) in a process that uses the GPU, which
    # fork_rng(devices=[]) does not restore, and costs 0.5 ms per image queueing lazy device seeds.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(hash(key) & 0x7FFF_FFFF_FFFF_FFFF)  # int-tuple hashes are stable
        return transform(img)


class SharedEpoch:
    """The epoch whose augmentations a dataset draws, in shared memory (as datasets keeps its own).

    Each persistent DataLoader worker holds its own copy of the dataset from when it started; a
    plain attribute set in the main process would never reach it, and every epoch would repeat
    epoch 0's augmentations.  Subclasses call ``__init__`` before any worker starts.
    """

    def __init__(self) -> None:
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        """The current epoch, as every worker sees it."""
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Called by accelerate's DataLoaderShard.set_epoch: selects the epoch's augmentations."""
        self._epoch.fill_(epoch)


class ImageDataset(SharedEpoch, torch.utils.data.Dataset):
    """Map-style dataset over a ``datasets.Dataset`` image column that skips unreadable images.

    An unreadable image is replaced by the next readable one and counted in the sample's
    ``num_skipped``, so batch shapes stay fixed (important under DDP) and nothing crashes mid-run.

    With a ``seed``, the random crop/flip of sample ``i`` in epoch ``e`` is drawn from a generator
    seeded by (seed, e, i) instead of the global RNG: augmentation is then identical whatever the
    number of workers, prefetching or a resume in mid-epoch (the global RNG is left untouched).

    ``cache_decoded``: keep each decoded source (by path) in memory, for a few photographs cropped
    many times per epoch (the embedded default): decoding, 60% of a sample's cost, is then paid once.
    """

    def __init__(
        self,
        hf_dataset: datasets.Dataset,
        image_column: str,
        transform: Callable,
        seed: int | None = None,
        cache_decoded: bool = False,
    ):
        super().__init__()
        self.ds = hf_dataset
        self.column = image_column
        self.transform = transform
        self.seed = seed
        self.decoded: dict[str, Image.Image] | None = {} if cache_decoded else None

    def _decode(self, value: Any) -> Image.Image:
        """``decode_image``, from the per-process cache of decoded sources when enabled."""
        key = value.get("path") if isinstance(value, dict) else None
        if self.decoded is None or key is None:
            return decode_image(value)
        if key not in self.decoded:
            self.decoded[key] = decode_image(value)
        return self.decoded[key]

    def _apply_transform(self, img: Image.Image, index: int) -> torch.Tensor:
        """The transform, under a per-(seed, epoch, index) RNG when seeded."""
        if self.seed is None:
            return self.transform(img)
        return seeded_transform(self.transform, img, (self.seed, self.epoch, index))

    def __len__(self) -> int:
        return len(self.ds)

    def fingerprint(self) -> str:
        """sha256 of the images as stored: each one's bytes, or for a file on disk its path, size and mtime."""
        digest = hashlib.sha256()
        for batch in self.ds.select_columns([self.column]).iter(batch_size=1000):
            for value in batch[self.column]:
                if isinstance(value, dict) and value.get("bytes") is not None:
                    digest.update(value["bytes"])
                elif isinstance(value, dict) and value.get("path"):
                    stat = os.stat(value["path"])
                    digest.update(f"{value['path']}:{stat.st_size}:{stat.st_mtime_ns}".encode())
                else:
                    digest.update(repr(value).encode())
        return digest.hexdigest()

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(MAX_CONSECUTIVE_BAD):
            i = (index + attempt) % len(self.ds)
            try:
                img = self._decode(self.ds[i][self.column])
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                logger.warning("skipping unreadable image #%d: %s: %s", i, type(exc).__name__, exc)
                continue
            return {"pixel_values": self._apply_transform(img, index), "num_skipped": attempt, "index": i}
        raise UsageError(
            f"{MAX_CONSECUTIVE_BAD} consecutive images from #{index} could not be read (column {self.column!r})",
            "remove or re-encode the broken files, or check --image_column",
        )


class StreamingImageDataset(SharedEpoch, torch.utils.data.IterableDataset):
    """A streamed ``datasets.IterableDataset``, shuffled with a buffer and sharded for this rank.

    Each rank reads only its shard (``split_dataset_by_node``); DataLoader workers split it further
    (datasets does this).  Unreadable images are skipped and counted as in ``ImageDataset``.
    """

    def __init__(
        self,
        hf_iterable: datasets.IterableDataset,
        image_column: str,
        transform: Callable,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
    ):
        from datasets.distributed import split_dataset_by_node

        super().__init__()
        self.ds = split_dataset_by_node(hf_iterable.shuffle(seed=seed, buffer_size=shuffle_buffer), rank, world_size)
        self.column, self.transform, self.seed, self.rank = image_column, transform, seed, rank

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (datasets reseeds its shuffle buffer with seed + epoch) and re-augment."""
        super().set_epoch(epoch)
        self.ds.set_epoch(epoch)

    def __iter__(self):
        skipped, epoch = 0, self.epoch
        for i, row in enumerate(self.ds):
            try:
                img = decode_image(row[self.column])
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                logger.warning("skipping unreadable streamed image: %s: %s", type(exc).__name__, exc)
                skipped += 1
                continue
            x = seeded_transform(self.transform, img, (self.seed, epoch, self.rank, i))
            yield {"pixel_values": x, "num_skipped": skipped, "index": i}
            skipped = 0


def loader_workers(setting: int | str, device: torch.device, processes_per_node: int) -> int:
    """DataLoader workers for ``dataloader_num_workers``: the number given, or for 'auto' 0 on a CPU (its
    cores are the compute) and min(8, CPU cores per process - 1) on an accelerator, so decoding never starves it."""
    if setting != "auto":
        return int(setting)
    if device.type == "cpu":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) // max(1, processes_per_node) - 1))


def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack pixel values [B,3,H,W]; sum the skipped-image counts."""
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "num_skipped": torch.tensor(sum(s["num_skipped"] for s in samples)),
        "index": torch.tensor([s["index"] for s in samples]),
    }


def embedded_photo_dir() -> Path:
    """Folder of the photographs shipped inside the scikit-image wheel."""
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    missing = [n for n in EMBEDDED_TRAIN + EMBEDDED_VALIDATION if not (folder / n).is_file()]
    if missing:
        raise UsageError(
            f"scikit-image's bundled photographs {missing} are missing from {folder}",
            "reinstall scikit-image, or pass --train_data_dir / --dataset_name",
        )
    return folder


def tile_image(img: Image.Image, resolution: int, scale: int) -> list[Image.Image]:
    """Resize the shorter side to ``scale * resolution`` and cut non-overlapping R x R tiles."""
    w, h = img.size
    factor = scale * resolution / min(w, h)
    img = img.resize((round(w * factor), round(h * factor)), Image.Resampling.BICUBIC)
    w, h = img.size
    return [
        img.crop((x, y, x + resolution, y + resolution))
        for y in range(0, h - resolution + 1, resolution)
        for x in range(0, w - resolution + 1, resolution)
    ]


def embedded_splits(cfg: DataConfig) -> ImageSplits:
    """The default: multiscale random crops of 14 bundled photographs; 3 held-out photographs, tiled."""
    folder = embedded_photo_dir()
    image = datasets.Image(decode=False)
    train = datasets.Dataset.from_dict(
        {"image": [str(folder / n) for n in EMBEDDED_TRAIN] * EMBEDDED_REPEATS}
    ).cast_column("image", image)
    tiles = [
        tile
        for name in EMBEDDED_VALIDATION
        for tile in tile_image(decode_image(folder / name), cfg.resolution, EMBEDDED_TILE_SCALE)
    ]
    tiles = tiles[: cfg.num_validation_images]
    validation = datasets.Dataset.from_dict({"image": tiles}, features=datasets.Features({"image": datasets.Image()}))
    validation = validation.cast_column("image", image)
    description = (
        f"embedded scikit-image photographs: {len(EMBEDDED_TRAIN)} for training (random crops), "
        f"{len(tiles)} validation tiles from {len(EMBEDDED_VALIDATION)} held-out photographs"
    )
    return ImageSplits(train, validation, "image", description, embedded=True)


def load_local_dataset(path_text: str, cache_dir: str | None, streaming: bool = False):
    """``--train_data_dir``: an image folder, a folder of parquet files, or parquet file(s)."""
    path = require_local("--train_data_dir", path_text)
    with about("--train_data_dir", path_text):
        if path.is_file():
            builder = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}.get(path.suffix)
            if builder is None:
                raise UsageError(
                    f"--train_data_dir {path_text!r} is a {path.suffix or 'suffix-less'} file",
                    "give a .parquet file or a folder of images",
                )
            return datasets.load_dataset(
                builder, data_files={"train": str(path)}, cache_dir=cache_dir, streaming=streaming
            )
        # A folder: datasets infers imagefolder or parquet, and train/test splits from file names.
        return datasets.load_dataset(str(path), cache_dir=cache_dir, streaming=streaming)


def load_hub_dataset(name: str, config_name: str | None = None, **kwargs):
    """``--dataset_name``: a Hub dataset (or its local cache); errors name the flag and the offline remedy."""
    if looks_like_path(name):
        require_local("--dataset_name", name)
    with about("--dataset_name", name):
        return datasets.load_dataset(name, config_name, **kwargs)


def require_local(flag: str, value: str) -> Path:
    """The local path ``value`` given to ``flag``; a UsageError if it does not exist."""
    path = Path(value).expanduser()
    if not path.exists():
        raise UsageError(
            f"{flag} {value!r} does not exist",
            "check the path" + (", or give a Hub id USER/NAME" if flag == "--dataset_name" else ""),
        )
    return path


def check_data_source(cfg: DataConfig) -> None:
    """The seconds-cheap part of the data checks: a local path that does not exist."""
    if cfg.train_data_dir:
        require_local("--train_data_dir", cfg.train_data_dir)
    if cfg.dataset_name and looks_like_path(cfg.dataset_name):
        require_local("--dataset_name", cfg.dataset_name)


def load_splits(cfg: DataConfig, seed: int = 0) -> ImageSplits:
    """Train and validation splits for the configured source (embedded photographs by default)."""
    if not cfg.dataset_name and not cfg.train_data_dir:
        return embedded_splits(cfg)
    load_kw = {"cache_dir": cfg.cache_dir, "streaming": cfg.streaming}
    if cfg.dataset_name:
        dd = load_hub_dataset(cfg.dataset_name, cfg.dataset_config_name, **load_kw)
        source = f"dataset {cfg.dataset_name}"
    else:
        dd = load_local_dataset(cfg.train_data_dir, **load_kw)
        source = f"{cfg.train_data_dir}"
    if cfg.streaming:
        return _streaming_splits(cfg, dd, source)
    train_name = "train" if "train" in dd else next(iter(dd))
    train = dd[train_name]
    if cfg.image_column not in train.column_names:
        raise UsageError(
            f"image column {cfg.image_column!r} not in {source} (columns: {train.column_names})", "set --image_column"
        )
    train = train.cast_column(cfg.image_column, datasets.Image(decode=False))
    val_name = cfg.validation_split or next((s for s in ("validation", "test") if s in dd), None)
    if cfg.validation_split and cfg.validation_split not in dd:
        raise UsageError(
            f"validation split {cfg.validation_split!r} not in {source} (splits: {list(dd)})",
            "set --validation_split to one of them, or leave it unset to hold out training images",
        )
    if val_name is not None and val_name != train_name:
        validation = dd[val_name].cast_column(cfg.image_column, datasets.Image(decode=False))
        validation = validation.select(spread(len(validation), cfg.num_validation_images))
        held = f"{len(validation)} images spread over split '{val_name}'"
    else:
        # Hold out num_validation_images, but never more than a tenth of a small dataset.
        n_val = min(cfg.num_validation_images, max(1, len(train) // 10))
        if len(train) < 2:
            raise UsageError(
                f"{source} has {len(train)} image(s): too few to hold out a validation image",
                "add images, or give a separate validation/test split",
            )
        total = len(train)
        parts = train.train_test_split(test_size=n_val, seed=seed)
        train, validation = parts["train"], parts["test"]
        held = f"{len(validation)} images held out of '{train_name}' (seed {seed})"
        if n_val < cfg.num_validation_images:  # said aloud: the held-out figures rest on these few
            held += f"; {cfg.num_validation_images} asked, but at most a tenth of the {total} images is held out"
    if cfg.max_train_samples is not None:
        train = train.select(spread(len(train), cfg.max_train_samples))
    description = f"{source}: {len(train)} training images of '{train_name}'; validation: {held}"
    return ImageSplits(train, validation, cfg.image_column, description, embedded=False)


def _streaming_splits(cfg: DataConfig, dd, source: str) -> ImageSplits:
    """Streaming: validation images are materialised (first N of the validation split, else of train,
    which then skips them); training stays an IterableDataset."""
    train_name = "train" if "train" in dd else next(iter(dd))
    train = dd[train_name]
    if cfg.image_column not in (train.column_names or [cfg.image_column]):
        raise UsageError(
            f"image column {cfg.image_column!r} not in {source} (columns: {train.column_names})", "set --image_column"
        )
    train = train.cast_column(cfg.image_column, datasets.Image(decode=False))
    val_name = cfg.validation_split or next((s for s in ("validation", "test") if s in dd), None)
    n = cfg.num_validation_images
    if val_name is not None and val_name != train_name:
        rows = list(dd[val_name].cast_column(cfg.image_column, datasets.Image(decode=False)).take(n))
        held = f"first {len(rows)} streamed images of split '{val_name}'"
    else:
        rows = list(train.take(n))
        train = train.skip(n)
        held = f"first {len(rows)} streamed images of '{train_name}', not trained on"
    features = datasets.Features({cfg.image_column: datasets.Image(decode=False)})
    validation = datasets.Dataset.from_list([{cfg.image_column: r[cfg.image_column]} for r in rows], features=features)
    if cfg.max_train_samples is not None:
        train = train.take(cfg.max_train_samples)
    return ImageSplits(
        train, validation, cfg.image_column, f"{source} (streaming '{train_name}'); validation: {held}", embedded=False
    )


def load_image_source(
    dataset_name: str | None,
    train_data_dir: str | None,
    image_column: str = "image",
    split: str | None = None,
    resolution: int = 256,
    num_images: int | None = None,
) -> tuple[datasets.Dataset, str, str]:
    """(undecoded image dataset, its image column, a description) for evaluation and latent tools.

    A Hub dataset or local folder/parquet uses ``split`` (default: validation, then test, then train);
    with neither, the embedded held-out photographs tiled at ``resolution``.  ``num_images`` picks that many
    spread evenly over the split (image ``i·n // N``), so a split sorted by class keeps every class.
    """
    if dataset_name or train_data_dir:
        dd = load_hub_dataset(dataset_name) if dataset_name else load_local_dataset(train_data_dir, cache_dir=None)
        if split is not None and split not in dd:
            raise UsageError(
                f"split {split!r} not in {dataset_name or train_data_dir} (splits: {list(dd)})",
                "set --split to one of them",
            )
        split = split or next((s for s in ("validation", "test", "train") if s in dd), next(iter(dd)))
        ds = dd[split]
        if image_column not in ds.column_names:
            raise UsageError(f"image column {image_column!r} not in {ds.column_names}", "set --image_column")
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
        source = f"{dataset_name or train_data_dir} [{split}]"
    else:
        ds, image_column = (
            load_splits(DataConfig(resolution=resolution, num_validation_images=10**9)).validation,
            "image",
        )
        source = "embedded held-out photographs"
    if num_images is not None:
        ds = ds.select(spread(len(ds), num_images))
    return ds, image_column, source


def spread(n: int, k: int) -> list[int]:
    """``min(k, n)`` indices of ``range(n)`` spread evenly, ``i·n // k``: every class of a sorted split."""
    k = min(k, n)
    return [i * n // k for i in range(k)]


def data_flag(dataset_name: str | None, train_data_dir: str | None) -> str:
    """The flag that chose the data, for error messages."""
    return "--dataset_name" if dataset_name else "--train_data_dir" if train_data_dir else "the embedded data"


def count_readable(ds: ImageDataset, limit: int = PROBE_IMAGES) -> tuple[int, int, str | None]:
    """(readable, probed, first decode error) over up to ``limit`` images spread evenly over ``ds``."""
    n = len(ds)
    picks = spread(n, limit)
    readable, first_error = 0, None
    for i in picks:
        try:
            decode_image(ds.ds[i][ds.column])
            readable += 1
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            first_error = first_error or f"#{i}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return readable, len(picks), first_error


def check_enough_images(
    ds: ImageDataset,
    needed: int,
    role: str,
    flag: str,
    need: str = "one global batch of {n}",
    fix: str = "add images or lower --train_batch_size",
) -> None:
    """Fail before training if the ``role`` images cannot fill ``needed`` samples or none of them decodes."""
    readable, probed, first_error = count_readable(ds)
    if probed and not readable:
        raise UsageError(
            f"none of the {probed} {role} images probed from {flag} could be read (first: {first_error})",
            f"check that {flag} holds images PIL can open (and --image_column names them)",
        )
    usable = readable if probed == len(ds) else len(ds)  # every image was probed: unreadable ones do not count
    if usable < needed:
        unread = f" ({len(ds) - readable} of {len(ds)} unreadable, first: {first_error})" if readable < len(ds) else ""
        raise UsageError(f"{usable} readable {role} images{unread}, fewer than {need.format(n=needed)}", fix)
