"""FID, KID and iFID on the real FID Inception (eval.fid, eval.diffusability), against its own TorchScript."""

import io
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from eval import fid
from eval.diffusability import interpolation_partners
from eval.latent import slerp


def _cifar(shared, n: int, start: int = 0) -> torch.Tensor:
    """uint8 [n,3,32,32]: CIFAR-10 test images (the shared JPEG re-encodes)."""
    rows = pq.read_table(shared / "data" / "cifar10" / "test.parquet", columns=["image"]).column("image")
    rows = rows.slice(start, n).to_pylist()
    arrays = [np.asarray(Image.open(io.BytesIO(r["bytes"])).convert("RGB")) for r in rows]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def inception(fid_weights):
    return fid.InceptionFeatures(fid.resolve_fid_weights(str(fid_weights), download=False)).eval()


@pytest.fixture(scope="module")
def features(shared, inception) -> dict[str, torch.Tensor]:
    """Pool3 features of 96 CIFAR-10 test images (two halves) and of the second half blurred (σ = 1 px)."""
    x = _cifar(shared, 96)
    blurred = TF.gaussian_blur(x[48:].float(), kernel_size=5, sigma=1.0).round().to(torch.uint8)
    with torch.inference_mode():
        return {"a": inception(x[:48]).double(), "b": inception(x[48:]).double(), "blur": inception(blurred).double()}


def test_the_mapped_extractor_is_the_torchscripts_own_forward(shared, fid_weights, inception):
    """The TorchScript's parameters mapped onto torch-fidelity's layers give the TorchScript's own pool3 features
    (fed the same TF-resized input) to 1e-4 absolute, on features of magnitude up to ~10 (float32, other conv
    kernels)."""
    import warnings

    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = _cifar(shared, 8, start=500)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(fid_weights), map_location="cpu").eval()
    resized = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
    with torch.inference_mode():
        theirs, ours = scripted((resized - 128) / 128), inception(x)
    assert ours.shape == theirs.shape == (8, 2048) and theirs.abs().max() > 1  # real, non-trivial features
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()


def test_fid_of_a_set_with_itself_is_zero_and_a_blurred_copy_scores_worse(features):
    same = fid.frechet_distance(features["a"], features["a"])
    other = fid.frechet_distance(features["a"], features["b"])  # 48 other images: only the sampling gap
    blurred = fid.frechet_distance(features["a"], features["blur"])  # the same 48 other images, blurred
    assert same == pytest.approx(0.0, abs=1e-3)
    assert other > 10 and blurred > other + 20, (other, blurred)


def test_kid_is_near_zero_for_a_set_with_itself_and_ranks_the_blurred_copy_worse(features):
    same = fid.kernel_distance(features["a"], features["a"])
    other = fid.kernel_distance(features["a"], features["b"])
    blurred = fid.kernel_distance(features["a"], features["blur"])
    assert same["subset_size"] == 48 and same["subsets"] == 100
    # unbiased: a set against itself sits below 0 (its own pairs are left out), other images of the same
    # distribution near 0, their blurred copies clearly above
    assert same["mean"] < 0 and same["mean"] < other["mean"] < 0.01 < blurred["mean"], (other, blurred)
    assert blurred["std"] is None  # 48 against 48 in subsets of 48: every subset is the whole set, no spread
    both = torch.cat([features["a"], features["b"]])  # 96 real against 48: subsets of 48 are drawn from the 96
    first = fid.kernel_distance(both, features["blur"])
    assert first["std"] > 0  # subsets of 48 drawn from 96: they differ, and so do their distances
    torch.manual_seed(123)  # another global RNG state: the subsets are seeded, and the global RNG is left alone
    state = torch.get_rng_state()
    assert fid.kernel_distance(both, features["blur"]) == first and torch.equal(torch.get_rng_state(), state)


def test_a_shuffled_weights_file_is_refused_naming_both_accepted_files(tmp_path, fid_weights):
    """Same tensors, permuted: a file that loads, but is not the graph FID is defined on (its SHA-256 differs)."""
    state = fid.torchscript_state_dict(fid_weights)
    g = torch.Generator().manual_seed(0)
    shuffled = {k: v.flatten()[torch.randperm(v.numel(), generator=g)].view_as(v) for k, v in state.items()}
    path = tmp_path / fid.TORCH_FIDELITY.filename  # even under the accepted file's name
    torch.save(shuffled, path)
    with pytest.raises(fid.FIDWeightsError) as err:
        fid.resolve_fid_weights(str(path))
    message = str(err.value)
    assert str(path) in message and fid.TORCH_FIDELITY.sha256[:12] in message and fid.TORCHSCRIPT.sha256[:12] in message
    with pytest.raises(fid.FIDWeightsError, match="do not exist"):
        fid.resolve_fid_weights(str(tmp_path / "missing.pth"))


def test_either_file_is_found_where_a_user_keeps_it(tmp_path, fid_weights, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(fid.FID_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("no download when found"))
    assert fid.resolve_fid_weights(download=False).path is None
    monkeypatch.setenv(fid.FID_WEIGHTS_ENV, str(fid_weights.parent))  # a folder holding it under its usual name
    assert fid.resolve_fid_weights().file is fid.TORCHSCRIPT
    monkeypatch.delenv(fid.FID_WEIGHTS_ENV)
    (tmp_path / "home" / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "home" / "hub" / "checkpoints" / fid.TORCHSCRIPT.filename).symlink_to(fid_weights)
    found = fid.resolve_fid_weights()
    assert found.file is fid.TORCHSCRIPT and found.path.parent == tmp_path / "home" / "hub" / "checkpoints"


def test_slerp_is_the_spherical_formula_and_linear_for_parallel_latents():
    a, b = torch.zeros(2, 4), torch.zeros(2, 4)
    a[:, 0], b[:, 1] = 1.0, 1.0  # orthogonal unit vectors: the midpoint is (a + b) / √2
    b[1] = 2 * a[1]  # parallel: linear
    mid = slerp(a, b, 0.5)
    assert torch.allclose(mid[0], (a[0] + b[0]) / math.sqrt(2), atol=1e-6)
    assert torch.allclose(mid[1], (a[1] + b[1]) / 2, atol=1e-6)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a[:1], b[:1], 1.0), b[:1], atol=1e-6)


def test_ifid_partners_are_drawn_among_the_ten_nearest_by_softmax_of_the_mse():
    """A reference of 12 latents: 10 near the query at known normalised MSEs (softmax weights from 0.20 to 0.016),
    2 pointing away (never drawn); the draws over many seeds follow softmax(−MSE), and the query's own latent is
    left out when it is the reference."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 2, 4, 4, generator=g)
    steps = torch.linspace(0.2, 3.0, 10).view(10, 1, 1, 1)
    direction = torch.randn(1, 2, 4, 4, generator=g)
    reference = torch.cat([base + steps * direction, -base, -base - direction])  # 10 near, 2 at negative cosines
    counts = torch.zeros(len(reference))
    for seed in range(2000):
        chosen = interpolation_partners(base, torch.tensor([0]), seed, reference)
        counts[(reference == chosen).flatten(1).all(1)] += 1
    assert counts[10:].sum() == 0  # only the 10 nearest by cosine similarity are candidates
    from eval.diffusability import channel_normalised

    mse = (channel_normalised(reference[:10], reference) - channel_normalised(base, reference)).pow(2).mean(1)
    expected = torch.softmax(-mse.double(), 0) * 2000
    assert torch.allclose(counts[:10].double(), expected, atol=4 * expected.sqrt().max())  # within 4σ
    z = torch.cat([base, base + 1e-3, base + 1.0])  # as its own reference: never itself
    assert not any(torch.equal(p, q) for p, q in zip(interpolation_partners(z, torch.arange(3), 0), z))


def test_ifid_partners_of_a_share_of_the_latents_are_those_the_whole_search_draws():
    """Each rank searches the neighbours of its share only (``rows``): the same partners as the search over all,
    with the evaluation latents as their own reference (each one's own left out) and with a reference set."""
    g = torch.Generator().manual_seed(0)
    z, reference = torch.randn(9, 2, 3, 3, generator=g), torch.randn(14, 2, 3, 3, generator=g)
    index = torch.arange(100, 109)  # dataset indices: the draws' seeds
    rows = torch.tensor([7, 2, 8, 8])  # a share, padded with its last row as split_rows pads
    for ref in (None, reference):
        whole = interpolation_partners(z, index, 5, ref)
        torch.testing.assert_close(interpolation_partners(z, index, 5, ref, rows), whole[rows], rtol=0, atol=0)


def test_eval_reports_rfid_kid_and_ifid_and_reads_the_real_features_from_its_cache(
    shared, fid_weights, lpips_dir, tmp_path, monkeypatch
):
    """A tiny model on 8 CIFAR-10 test images: rFID, KID and iFID on the Inception, FID's small-N warning; the
    real images' features are extracted once (8 images) and a second evaluation reads them from the cache."""
    import json

    from conftest import reset_accelerate

    from autoencoder.config import ModelConfig
    from autoencoder.models import build_vae
    from eval.runner import main

    torch.manual_seed(0)
    build_vae(ModelConfig(preset="tiny")).save_pretrained(tmp_path / "vae")
    seen, original = [], fid.InceptionFeatures.forward
    monkeypatch.setattr(fid.InceptionFeatures, "forward", lambda self, x: seen.append(len(x)) or original(self, x))
    args = [
        f"--model={tmp_path / 'vae'}",
        f"--train_data_dir={shared / 'data' / 'cifar10'}",
        "--num_images=8",
        "--resolution=32",
        "--iwae_samples=0",
        "--no_tiling_check",
        f"--fid_weights={fid_weights}",
        f"--lpips_weights={lpips_dir}",
        f"--feature_cache_dir={tmp_path / 'cache'}",
    ]
    runs = {}
    for name, extra in (
        ("first", []),
        ("cached", ["--reference_split=train", "--reference_images=16", "--probe_labels=label"]),
    ):
        seen.clear()
        reset_accelerate()
        assert main([*args, *extra, f"--output_dir={tmp_path / name}"]) == 0
        runs[name] = (sum(seen), json.loads((tmp_path / name / "metrics.json").read_text()))
    (first_count, first), (cached_count, cached) = runs["first"], runs["cached"]
    assert first_count == 8 * 3 and cached_count == 8 * 2  # real + reconstructions + interpolations; no real pass
    a, b = (next(iter(m["models"].values())) for m in (first, cached))
    assert a["rfid"] > 0 and a["rfid"] == b["rfid"] and a["fid_images"] == 8 and "biased" in a["fid_warning"]
    assert a["kid"]["subset_size"] == 8 and a["kid"] == b["kid"] and a["kid"]["std"] is None  # subsets = whole sets
    assert a["diffusability"]["ifid"] > 0 and "ifd_vgg16" not in a["diffusability"]
    assert b["diffusability"]["ifid_reference"] == "16 other images" != a["diffusability"]["ifid_reference"]
    probe = b["linear_probe"]  # the plumbing: 16 labelled training latents, scored on the 8 evaluation images
    assert probe["n_train"] == 16 and probe["n_test"] == 8 and probe["classes"] == 10 and 0 <= probe["top1"] <= 1
    report = (tmp_path / "first" / "report.md").read_text()
    assert "KID ↓" in report and "biased upward" in report and "sha256 verified" in report and "(all 8)" in report
    assert len(list((tmp_path / "cache").glob("inception_v3-*.pt"))) == 1


def test_a_damaged_feature_cache_file_is_recomputed_not_raised(tmp_path):
    """A cache file cut short (a disk that filled, a copy that broke) reads as a miss with a warning, and the
    next save replaces it: under several processes a raise on the main process would leave the others waiting."""
    from types import SimpleNamespace

    cache = fid.FeatureCache(tmp_path, {"images": "abc", "count": 3})
    extractor = SimpleNamespace(name="inception_v3", sha256="0" * 64)
    features = torch.arange(6.0).view(3, 2)
    cache.save(extractor, features)
    path = cache.path(extractor)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="does not load"):
        assert cache.load(extractor) is None
    cache.save(extractor, features)
    assert torch.equal(cache.load(extractor), features.double())
