"""Data: mode conversions, unreadable-image skipping, local folders/parquet, the embedded default."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from autoencoder.config import DataConfig
from autoencoder.data import (
    EMBEDDED_TRAIN,
    ImageDataset,
    collate,
    decode_image,
    eval_transform,
    load_image_source,
    load_splits,
    loader_workers,
    to_rgb,
    train_transform,
)
from autoencoder.errors import UsageError


def test_grayscale_to_rgb():
    out = to_rgb(Image.new("L", (4, 4), 77))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (77, 77, 77)


def test_rgba_is_composited_on_white():
    img = Image.new("RGBA", (2, 1))
    img.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent -> white
    img.putpixel((1, 0), (10, 20, 30, 255))  # opaque -> unchanged
    out = to_rgb(img)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (10, 20, 30)


def test_16bit_png_is_rescaled(tmp_path):
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)  # 32896 = 128.5 * 257 -> 128
    Image.fromarray(arr).save(tmp_path / "deep.png")
    out = decode_image(str(tmp_path / "deep.png"))
    assert out.mode == "RGB"
    assert [out.getpixel((i, 0))[0] for i in range(3)] == [0, 128, 255]


def test_palette_with_transparency():
    img = Image.new("P", (1, 1), 0)
    img.putpalette([200, 0, 0] * 256)
    img.info["transparency"] = 0
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)


def _folder(tmp_path, n=6, bad=0, size=(40, 30)):
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    for i in range(bad):
        (tmp_path / f"bad{i}.png").write_bytes(b"not a png at all")
    return tmp_path


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    folder = _folder(tmp_path, n=3, bad=2)
    paths = sorted(str(p) for p in folder.iterdir())  # bad0, bad1, img0, img1, img2
    ds = datasets.Dataset.from_dict({"image": paths}).cast_column("image", datasets.Image(decode=False))
    dataset = ImageDataset(ds, "image", eval_transform(16))
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (5, 3, 16, 16)
    # item 0 skips bad0 and bad1 (2), item 1 skips bad1 (1): every item is a readable image
    assert batch["num_skipped"].item() == 3
    assert set(batch["index"].tolist()) <= {2, 3, 4}


def test_all_unreadable_is_a_clear_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    ds = datasets.Dataset.from_dict({"image": [str(tmp_path / "a.png")]}).cast_column(
        "image", datasets.Image(decode=False)
    )
    with pytest.raises(UsageError, match="could not be read"):
        ImageDataset(ds, "image", eval_transform(8))[0]


def test_image_folder_split(tmp_path):
    cfg = DataConfig(train_data_dir=str(_folder(tmp_path, n=20)), num_validation_images=5, resolution=16)
    splits = load_splits(cfg, seed=0)
    # asked for 5, but a small dataset gives at most a tenth of itself to validation
    assert (len(splits.train), len(splits.validation)) == (18, 2)
    item = ImageDataset(splits.train, splits.image_column, train_transform(cfg, splits.embedded))[0]
    x = item["pixel_values"]
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_parquet_file_and_image_column(tmp_path):
    images = [Image.new("RGB", (12, 12), (i * 20, 0, 0)) for i in range(5)]
    datasets.Dataset.from_dict({"img": images}).cast_column("img", datasets.Image()).to_parquet(tmp_path / "d.parquet")
    cfg = DataConfig(train_data_dir=str(tmp_path / "d.parquet"), image_column="img", num_validation_images=1)
    splits = load_splits(cfg)
    assert (len(splits.train), len(splits.validation)) == (4, 1)
    with pytest.raises(ValueError, match=r"image column 'image' not in .*columns: \['img'\]"):
        load_splits(DataConfig(train_data_dir=str(tmp_path / "d.parquet")))


def test_validation_split_is_used_when_present(shared):
    cfg = DataConfig(train_data_dir=str(shared / "data" / "cifar10"), num_validation_images=10, max_train_samples=100)
    splits = load_splits(cfg)
    assert len(splits.train) == 100 and len(splits.validation) == 10
    assert "split 'test'" in splits.description
    # the parquet is sorted by class: subsets are spread over it, so 10 validation images are the 10 classes
    assert sorted(splits.validation["label"]) == list(range(10)) and len(set(splits.train["label"])) == 10


def test_an_evaluation_subset_spreads_over_a_class_sorted_split(shared):
    ds, _, _ = load_image_source(None, str(shared / "data" / "cifar10"), split="train", num_images=20)
    assert ds["label"] == [i // 2 for i in range(20)]  # images 0, 2500, 5000, ... of 50,000 sorted by class
    whole, _, _ = load_image_source(None, str(shared / "data" / "cifar10"), split="test", num_images=10**6)
    assert len(whole) == 10000


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_splits(DataConfig(train_data_dir=str(tmp_path / "nope")))


def test_embedded_default_is_real_photographs_with_held_out_tiles():
    cfg = DataConfig(resolution=32, num_validation_images=1000)
    splits = load_splits(cfg)
    assert splits.embedded
    assert len(splits.train) % len(EMBEDDED_TRAIN) == 0
    # held-out photos tiled at 4x the resolution: chelsea 451x300, coffee 600x400, rocket 640x427 -> 6x4 tiles each
    assert len(splits.validation) == 3 * 24
    dataset = ImageDataset(splits.train, "image", train_transform(cfg, True))
    crops = torch.stack([dataset[i]["pixel_values"] for i in range(8)])
    assert crops.shape == (8, 3, 32, 32) and crops.std() > 0.1  # real, varied content


def test_dataset_name_goes_through_load_dataset(tmp_path):
    """--dataset_name is passed to datasets.load_dataset (a Hub id online; here a local dataset folder)."""
    cfg = DataConfig(dataset_name=str(_folder(tmp_path, n=5)), num_validation_images=1)
    splits = load_splits(cfg)
    assert (len(splits.train), len(splits.validation)) == (4, 1)
    assert splits.description.startswith("dataset ")


def test_streaming_shards_are_disjoint_and_cover_the_stream(shared):
    from autoencoder.data import StreamingImageDataset

    cfg = DataConfig(
        train_data_dir=str(shared / "data" / "cifar10" / "test.parquet"),
        streaming=True,
        num_validation_images=4,
        max_train_samples=40,
        resolution=32,
    )
    splits = load_splits(cfg)
    assert isinstance(splits.train, datasets.IterableDataset) and len(splits.validation) == 4
    shards = [
        StreamingImageDataset(splits.train, "image", eval_transform(32), seed=0, rank=r, world_size=2, shuffle_buffer=8)
        for r in (0, 1)
    ]
    pixels = [[s["pixel_values"] for s in shard] for shard in shards]
    assert len(pixels[0]) + len(pixels[1]) == 40  # every streamed training image on exactly one rank
    flat = [p.sum().item() for shard in pixels for p in shard]
    assert len(set(flat)) == 40


def test_decoded_sources_are_cached_once_per_process_and_change_no_sample(monkeypatch):
    import autoencoder.data as data

    cfg = DataConfig(resolution=32)
    splits = load_splits(cfg, seed=0)  # the embedded photographs, cropped many times per epoch
    transform = train_transform(cfg, splits.embedded)
    cached = ImageDataset(splits.train, splits.image_column, transform, seed=0, cache_decoded=True)
    real, calls = data.decode_image, []
    monkeypatch.setattr(data, "decode_image", lambda value: calls.append(value) or real(value))
    samples = [cached[i]["pixel_values"] for i in range(40)]
    assert len(calls) == len(cached.decoded) == len(EMBEDDED_TRAIN)  # 40 crops of 11 photographs: 11 decodes
    monkeypatch.undo()
    plain = ImageDataset(splits.train, splits.image_column, transform, seed=0)
    assert all(torch.equal(s, plain[i]["pixel_values"]) for i, s in enumerate(samples))


def test_loader_workers_auto_is_zero_on_cpu_and_leaves_a_core_per_gpu_process(monkeypatch):
    """'auto': 0 on a CPU; on a GPU min(8, cores per process - 1), so N processes never take every core."""
    from autoencoder import data

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(data.os, "cpu_count", lambda: 16)
    assert loader_workers("auto", cpu, 1) == 0  # on a CPU the cores are the compute
    assert loader_workers(3, cpu, 1) == 3  # an explicit count is kept
    got = {per_node: loader_workers("auto", cuda, per_node) for per_node in (1, 2, 4, 8, 16)}
    assert got == {1: 8, 2: 7, 4: 3, 8: 1, 16: 0}  # capped at 8; one core per GPU process left for it
    monkeypatch.setattr(data.os, "cpu_count", lambda: 2)
    assert loader_workers("auto", cuda, 1) == 1  # a 2-core machine with one GPU still decodes in parallel
    monkeypatch.setattr(data.os, "cpu_count", lambda: None)  # unknown: load in the main process
    assert loader_workers("auto", cuda, 1) == 0


def test_seeded_augmentation_touches_only_the_cpu_generator(monkeypatch):
    """A seeded crop reseeds no device generator (on a GPU that one drives posterior sampling)."""

    def refuse(*args):
        raise AssertionError("a device generator was reseeded by the data pipeline")

    for module, name in ((torch.cuda, "manual_seed_all"), (torch.xpu, "manual_seed_all"), (torch.mps, "manual_seed")):
        monkeypatch.setattr(module, name, refuse)
    cfg = DataConfig(resolution=32)
    splits = load_splits(cfg, seed=0)
    ds = ImageDataset(splits.train, splits.image_column, train_transform(cfg, splits.embedded), seed=0)
    before = torch.get_rng_state()
    first = ds[3]["pixel_values"]
    assert torch.equal(torch.get_rng_state(), before)  # the global CPU generator is restored too
    assert torch.equal(first, ds[3]["pixel_values"]) and not torch.equal(first, ds[4]["pixel_values"])


def _two_epochs(dataset, workers: int) -> list[list[float]]:
    """Per-batch pixel sums of two epochs through a DataLoader whose workers persist between them.

    ``dataset.set_epoch`` is what accelerate's DataLoaderShard.set_epoch calls (and the trainer, streaming).
    """
    dl = torch.utils.data.DataLoader(
        dataset, batch_size=4, collate_fn=collate, num_workers=workers, persistent_workers=workers > 0
    )
    sums = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        sums.append([round(b["pixel_values"].sum().item(), 3) for b in dl])
    return sums


def test_persistent_workers_draw_each_epochs_augmentations():
    """set_epoch in the main process reaches persistent workers: epoch 1 is re-augmented, as with no workers."""
    cfg = DataConfig(resolution=32)
    splits = load_splits(cfg, seed=0)
    ds = ImageDataset(splits.train.select(range(8)), splits.image_column, train_transform(cfg, splits.embedded), seed=0)
    inline, workers = _two_epochs(ds, 0), _two_epochs(ds, 2)
    assert inline[0] != inline[1]  # new crops in epoch 1
    assert workers == inline


def test_streamed_persistent_worker_draws_each_epochs_augmentations(shared):
    from autoencoder.data import StreamingImageDataset

    cfg = DataConfig(
        train_data_dir=str(shared / "data" / "cifar10" / "test.parquet"),
        streaming=True,
        num_validation_images=4,
        max_train_samples=8,
        resolution=16,
        train_crop="multiscale",
        multiscale_min=1.0,
        multiscale_max=2.0,
    )
    splits = load_splits(cfg)
    ds = StreamingImageDataset(splits.train, "image", train_transform(cfg, False), seed=0, shuffle_buffer=1)
    inline, worker = _two_epochs(ds, 0), _two_epochs(ds, 1)
    assert inline[0] != inline[1]
    assert worker == inline
