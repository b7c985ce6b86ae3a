"""diffusion_bridge: latent statistics (closed forms, merging, 2 processes), --write, and the CLI."""

import json
import subprocess

import numpy as np
import pytest
import torch
from conftest import REPO, accelerate_launch, reset_accelerate
from diffusers import AutoencoderKL

from autoencoder.config import ModelConfig
from autoencoder.data import ImageDataset, eval_transform, load_image_source
from autoencoder.models import build_vae
from diffusion_bridge.cli import main as bridge_main
from diffusion_bridge.stats import LatentScaling, LatentStatsAccumulator, Moments

MEANS = torch.tensor([0.5, -1.0, 2.0, 0.0])
STDS = torch.tensor([1.0, 3.0, 0.25, 6.0])


def _synthetic(n_images: int, seed: int = 0) -> torch.Tensor:
    """Latents [N,4,32,32] with known per-channel mean/std."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n_images, 4, 32, 32, generator=g, dtype=torch.float64) * STDS.view(1, 4, 1, 1).double()
        + MEANS.view(1, 4, 1, 1).double()
    )


def test_statistics_of_synthetic_latents_are_recovered():
    z = _synthetic(1024)  # 1M values per channel: sampling error of the std ~ 7e-4 * std
    acc = LatentStatsAccumulator(4)
    for batch in z.split(100):
        acc.update(batch)
    s = acc.result()
    # exact w.r.t. the data (closed form numpy statistics of the same values)
    per_channel = z.permute(1, 0, 2, 3).reshape(4, -1).numpy()
    assert np.allclose(s.channel_mean, per_channel.mean(1), atol=1e-12)
    assert np.allclose(s.channel_std, per_channel.std(1), atol=1e-12)
    assert s.mean == pytest.approx(per_channel.mean(), abs=1e-12) and s.std == pytest.approx(
        per_channel.std(), abs=1e-12
    )
    # and the generating parameters to 1e-3 (relative for the std)
    assert np.allclose(s.channel_mean, MEANS.numpy(), atol=1e-3 * STDS.numpy() * 3)
    assert np.allclose(np.array(s.channel_std) / STDS.numpy(), 1, atol=1e-3 * 3)
    assert s.num_images == 1024 and s.num_latents == 1024 * 4 * 32 * 32
    lo, hi = s.std_ci95
    assert lo < s.std < hi and hi - lo < 0.05 * s.std
    cv = s.config_values("sd3")
    assert cv["scaling_factor"] == pytest.approx(1 / s.std) and cv["shift_factor"] == pytest.approx(s.mean)
    assert cv["latents_mean"] is None and cv["latents_std"] is None  # SDXL would otherwise decode per channel
    # scaled as configured: zero mean, unit std; unscale inverts it
    sd3 = LatentScaling("sd3", cv["scaling_factor"], shift_factor=cv["shift_factor"])
    zs = sd3.scale(z)
    assert abs(zs.mean().item()) < 1e-9 and zs.std(unbiased=False).item() == pytest.approx(1, abs=1e-9)
    assert torch.allclose(sd3.unscale(zs), z)
    assert sd3.scaled_moments(s) == pytest.approx((0.0, 1.0), abs=1e-9)
    # sd: the scale alone; sdxl: per-channel standardisation, every channel mean 0 / std 1
    assert s.config_values("sd") == {
        "scaling_factor": cv["scaling_factor"],
        "shift_factor": None,
        "latents_mean": None,
        "latents_std": None,
    }
    xl = s.config_values("sdxl")
    assert xl["scaling_factor"] == 1.0 and xl["shift_factor"] is None
    sdxl = LatentScaling("sdxl", 1.0, latents_mean=tuple(xl["latents_mean"]), latents_std=tuple(xl["latents_std"]))
    zx = sdxl.scale(z)
    assert torch.allclose(zx.mean(dim=(0, 2, 3)), torch.zeros(4, dtype=zx.dtype), atol=1e-9)
    assert torch.allclose(zx.std(dim=(0, 2, 3), unbiased=False), torch.ones(4, dtype=zx.dtype), atol=1e-9)
    assert torch.allclose(sdxl.unscale(zx), z) and sdxl.scaled_moments(s) == pytest.approx((0.0, 1.0), abs=1e-9)


def test_statistics_accumulate_on_the_cpu_whatever_the_latents_device():
    """Latents from an accelerator are moved to the float64 CPU accumulator (issue: cuda/cpu mix in merge)."""
    z = _synthetic(6, seed=3).float()
    spied = LatentStatsAccumulator(4)
    # no accelerator here: a tensor subclass records that update() moves the latents to CPU float64
    moved = []

    class Spy(torch.Tensor):
        def to(self, *args, **kwargs):
            moved.append(args)
            return super().to(*args, **kwargs)

    spied.update(z.as_subclass(Spy))
    assert moved and moved[0] == ("cpu", torch.float64)
    assert spied.channels.mean.device.type == "cpu" and spied.channels.mean.dtype == torch.float64
    plain = LatentStatsAccumulator(4)
    plain.update(z)
    assert torch.equal(spied.flat(), plain.flat())


def test_merging_per_rank_statistics_equals_one_pass():
    z = _synthetic(37, seed=1)
    single = LatentStatsAccumulator(4)
    single.update(z)
    parts = [z[:5], z[5:6], z[6:30], z[30:]]  # uneven "ranks"
    merged = LatentStatsAccumulator(4)
    for part in parts:
        acc = LatentStatsAccumulator(4)
        acc.update(part)
        merged = merged.merge(LatentStatsAccumulator.from_flat(acc.flat(), 4))  # through the gather format
    a, b = single.result(), merged.result()
    assert a.num_images == b.num_images == 37
    for key in ("mean", "std"):
        assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-12)
    assert np.allclose(a.channel_std, b.channel_std, rtol=1e-12) and np.allclose(a.std_ci95, b.std_ci95, rtol=1e-9)
    empty = Moments.empty(3)
    assert empty.merge(empty).n == 0


@pytest.fixture
def tiny_model(tmp_path):
    torch.manual_seed(0)
    build_vae(ModelConfig(preset="tiny")).save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


def _stats_args(model, shared, out, *extra):
    return [
        "stats",
        "--model",
        str(model),
        "--train_data_dir",
        str(shared / "data" / "cbsd68"),
        "--resolution",
        "32",
        "--num_images",
        "7",
        "--batch_size",
        "3",
        "--output",
        str(out),
        *extra,
    ]


@pytest.mark.slow
def test_two_process_stats_equal_single_process(tiny_model, shared, tmp_path):
    reset_accelerate()
    assert bridge_main(_stats_args(tiny_model, shared, tmp_path / "one.json", "--mode")) == 0
    cmd = accelerate_launch(
        "diffusion_bridge",
        *_stats_args(tiny_model, shared, tmp_path / "two.json", "--mode"),
    )
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting 2 CPU ranks" in result.stderr
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one["num_images"] == two["num_images"] == 7
    for key in ("mean", "std", "scaling_factor", "shift_factor"):
        assert one[key] == pytest.approx(two[key], rel=1e-6)
    assert np.allclose(one["channel_std"], two["channel_std"], rtol=1e-6)


def test_stats_write_puts_the_scaling_into_the_config(tiny_model, shared, tmp_path, capsys):
    reset_accelerate()
    before = AutoencoderKL.from_pretrained(tiny_model)
    assert bridge_main(_stats_args(tiny_model, shared, tmp_path / "s.json", "--mode", "--write")) == 0
    assert "wrote the sd3 convention (scaling_factor, shift_factor; the other keys cleared)" in capsys.readouterr().out
    vae = AutoencoderKL.from_pretrained(tiny_model)
    stats = json.loads((tiny_model / "latent_stats.json").read_text())
    assert vae.config.scaling_factor == pytest.approx(stats["scaling_factor"]) != 1.0
    assert vae.config.shift_factor == pytest.approx(stats["mean"]) and stats["convention"] == "sd3"
    assert vae.config.latents_mean is None and vae.config.latents_std is None
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), vae.state_dict().values()))
    assert not list(tiny_model.parent.glob(".tmp-*")) and not list(tiny_model.parent.glob(".old-*"))
    # the same images, scaled as the config says: mean 0, std 1
    ds, col, _ = load_image_source(None, str(shared / "data" / "cbsd68"), resolution=32, num_images=7)
    x = torch.stack([ImageDataset(ds, col, eval_transform(32))[i]["pixel_values"] for i in range(7)])
    with torch.no_grad():
        z = LatentScaling.from_config(vae.config, "sd3").scale(vae.encode(x).latent_dist.mode())
    assert abs(z.mean().item()) < 1e-4 and z.std(unbiased=False).item() == pytest.approx(1, abs=1e-4)
    # `stats` on a written model reports how its configured scaling fits the data (closed form == the above)
    reset_accelerate()
    assert bridge_main(_stats_args(tiny_model, shared, tmp_path / "again.json", "--mode")) == 0
    assert "the sd3 convention gives latents of mean 0.0000, std 1.0000" in capsys.readouterr().out
    # --convention sdxl: per-channel statistics, scaling 1, no shift
    reset_accelerate()
    assert (
        bridge_main(_stats_args(tiny_model, shared, tmp_path / "xl.json", "--mode", "--write", "--convention", "sdxl"))
        == 0
    )
    xl = AutoencoderKL.from_pretrained(tiny_model).config
    assert xl.scaling_factor == 1.0 and xl.shift_factor is None and len(xl.latents_mean) == 4
    assert xl.latents_std == pytest.approx(json.loads((tiny_model / "latent_stats.json").read_text())["channel_std"])


def test_stats_write_refuses_a_hub_id(capsys):
    assert bridge_main(["stats", "--model", "someone/some-vae", "--write"]) == 2
    assert "--write needs a local diffusers model folder" in capsys.readouterr().err


def _encode_args(model, shared, out, *extra):
    return [
        "encode",
        "--model",
        str(model),
        "--train_data_dir",
        str(shared / "data" / "cifar10" / "test.parquet"),
        "--resolution",
        "32",
        "--num_images",
        "10",
        "--shard_size",
        "4",
        "--batch_size",
        "3",
        "--output_dir",
        str(out),
        *extra,
    ]


def test_latent_cache_loads_with_datasets_and_resumes(tiny_model, shared, tmp_path, capsys):
    from diffusion_bridge.cache import load_latent_cache

    vae = AutoencoderKL.from_pretrained(tiny_model)
    vae.register_to_config(scaling_factor=2.0, shift_factor=0.5)
    vae.save_pretrained(tiny_model)
    out = tmp_path / "cache"
    reset_accelerate()
    assert bridge_main(_encode_args(tiny_model, shared, out, "--store_moments")) == 0
    files = sorted(p.name for p in (out / "data").iterdir())
    assert files == [f"shard-0000{k}-of-00003.parquet" for k in range(3)]
    ds = load_latent_cache(out)[:]  # all rows, as torch tensors
    assert len(ds["index"]) == 10 and ds["index"].tolist() == list(range(10)) and ds["label"].shape == (10,)
    assert ds["latents"].shape == (10, 4, 16, 16)  # tiny preset: f=2, 32 px
    info = json.loads((out / "cache_info.json").read_text())
    assert info["convention"] == "sd" and info["scaling_factor"] == 2.0 and info["shift_factor"] is None
    # latents = posterior sample * scale: (latents / scale - mean) / std is standard normal (10,240 draws)
    eps = (ds["latents"] / 2.0 - ds["posterior_mean"]) / (0.5 * ds["posterior_logvar"]).exp()
    assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1.0) < 0.05
    # seeded per image: another batch size draws the same samples
    reset_accelerate()
    assert bridge_main([*_encode_args(tiny_model, shared, tmp_path / "batch10"), "--batch_size", "10"]) == 0
    batch10 = load_latent_cache(tmp_path / "batch10")[:]["latents"]  # equal up to the encoder's batched rounding
    assert torch.allclose(batch10, ds["latents"], atol=1e-4), (batch10 - ds["latents"]).abs().max()
    src, col, _ = load_image_source(
        None, str(shared / "data" / "cifar10" / "test.parquet"), split="train", num_images=10
    )
    x = torch.stack([ImageDataset(src, col, eval_transform(32))[i]["pixel_values"] for i in range(10)])
    with torch.no_grad():
        assert torch.allclose(ds["posterior_mean"], vae.encode(x).latent_dist.mean, atol=1e-5)
    before = ds["latents"].clone()

    # interrupted run: shard 1 missing, a half-written temporary left behind -> only shard 1 is redone
    (out / "data" / files[1]).unlink()
    (out / "data" / f".tmp-0-{files[1]}").write_bytes(b"partial")
    capsys.readouterr()
    reset_accelerate()
    assert bridge_main(_encode_args(tiny_model, shared, out, "--store_moments")) == 0
    assert "4 images in 1 shards (2 already done, skipped)" in capsys.readouterr().out
    assert torch.equal(load_latent_cache(out)[:]["latents"], before)


def test_a_latent_cache_resumes_only_with_the_settings_that_wrote_it(tiny_model, shared, tmp_path, capsys):
    """A rerun into a cache folder adds the missing shards only when it would write what is there: another seed,
    or new weights at the same path, is refused (exit 2, one error line naming what differs) and the shards
    stay as they were; so is a folder of shards with no record of their settings.  The same weights under
    another path resume it; a folder with no shard yet takes any settings."""
    import shutil

    vae = AutoencoderKL.from_pretrained(tiny_model)
    vae.register_to_config(scaling_factor=2.0)
    vae.save_pretrained(tiny_model)
    shutil.copytree(tiny_model, tmp_path / "copy")
    out = tmp_path / "cache"

    def encode(*extra: str, folder=out) -> tuple[int, str]:
        capsys.readouterr()
        reset_accelerate()
        code = bridge_main(_encode_args(tiny_model, shared, folder, *extra))
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == (code != 0)  # one line when refused (tqdm's bars are not ours)
        return code, "".join(errors)

    assert encode() == (0, "")
    (out / "data" / "shard-00001-of-00003.parquet").unlink()  # an interrupted run
    shards = {p.name: p.read_bytes() for p in (out / "data").iterdir()}
    code, err = encode("--seed", "1")
    assert code == 2 and "(seed differ)" in err
    assert {p.name: p.read_bytes() for p in (out / "data").iterdir()} == shards
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(0.01)
    vae.save_pretrained(tmp_path / "retrained")
    code, err = encode("--model", str(tmp_path / "retrained"))
    assert code == 2 and "(weights_sha256 differ)" in err
    assert encode("--model", str(tmp_path / "copy")) == (0, "")  # the same weights elsewhere: resumed
    assert len(list((out / "data").glob("shard-*"))) == 3
    vae.save_pretrained(tiny_model)  # retrained in place: the same path, other weights
    code, err = encode()
    assert code == 2 and "(weights_sha256 differ)" in err
    (out / "encode_settings.json").unlink()  # a cache written before the record existed
    code, err = encode("--model", str(tmp_path / "copy"))
    assert code == 2 and "unknown settings" in err
    assert encode(folder=tmp_path / "killed") == (0, "")
    for shard in (tmp_path / "killed" / "data").glob("shard-*"):
        shard.unlink()  # killed before its first shard: no latents to mix with
    assert encode("--seed", "1", folder=tmp_path / "killed") == (0, "")


def test_latent_cache_sd3_convention_and_unscaled_model_refusal(tiny_model, shared, tmp_path, capsys):
    from diffusion_bridge.cache import load_latent_cache

    reset_accelerate()
    assert bridge_main(_encode_args(tiny_model, shared, tmp_path / "c0")) == 2  # scaling_factor 1.0: not computed
    assert "stats --model DIR --write" in capsys.readouterr().err
    reset_accelerate()
    args = _encode_args(
        tiny_model,
        shared,
        tmp_path / "c1",
        "--mode",
        "--convention",
        "sd3",
        "--scaling_factor",
        "3",
        "--shift_factor",
        "0.25",
    )
    assert bridge_main(args) == 0
    ds = load_latent_cache(tmp_path / "c1")[:]
    src, col, _ = load_image_source(
        None, str(shared / "data" / "cifar10" / "test.parquet"), split="train", num_images=10
    )
    x = torch.stack([ImageDataset(src, col, eval_transform(32))[i]["pixel_values"] for i in range(10)])
    with torch.no_grad():
        z = AutoencoderKL.from_pretrained(tiny_model).encode(x).latent_dist.mode()
    assert torch.allclose(ds["latents"], (z - 0.25) * 3, atol=1e-5)
    assert (
        "latents / scaling_factor + shift_factor"
        in json.loads((tmp_path / "c1" / "cache_info.json").read_text())["decode"]
    )
