"""LPIPS is the real metric: published reference distances, weight sources, offline failure."""

import os
import urllib.error

import lpips
import numpy as np
import pytest
import torch
from PIL import Image

from autoencoder import lpips_weights
from autoencoder.lpips_weights import ENV_VAR, LPIPSWeightsError, build_lpips

# Published by the LPIPS authors for their example images (README of richzhang/PerceptualSimilarity).
PUBLISHED = {"vgg": (0.569, 0.422), "alex": (0.722, 0.138)}


def _load(shared, name):
    """The reference image as lpips' own loader gives it: RGB uint8 -> [1,3,H,W] in [-1,1]."""
    image = np.asarray(Image.open(shared / "data" / "lpips_reference" / f"ex_{name}.png").convert("RGB"))
    return lpips.im2tensor(image)


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_reproduces_published_distances(net, shared, lpips_dir):
    model = build_lpips(net, str(lpips_dir))
    ref, p0, p1 = (_load(shared, n) for n in ("ref", "p0", "p1"))
    with torch.no_grad():
        d0, d1 = model(ref, p0).item(), model(ref, p1).item()
    assert round(d0, 3) == PUBLISHED[net][0], d0
    assert round(d1, 3) == PUBLISHED[net][1], d1


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_bf16_autocast_stays_within_0_005_of_fp32_and_keeps_its_gradient(net, device, shared, lpips_dir, monkeypatch):
    """The training loss runs LPIPS under the run's autocast.

    Measured on the CPU: |bf16 - fp32| <= 0.0017 on the reference distances; the bf16 input gradient's cosine
    with the fp32 one is 0.93 (vgg) and 0.94 (alex): bf16 rounding noise per pixel, same direction overall.
    """
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the fp32 reference in true fp32 on a GPU
    model = build_lpips(net, str(lpips_dir)).to(device)
    ref, p0, p1 = (_load(shared, n).to(device) for n in ("ref", "p0", "p1"))
    fp32 = [model(ref, p).item() for p in (p0, p1)]
    with torch.autocast(device, dtype=torch.bfloat16):
        bf16 = [model(ref, p).float().item() for p in (p0, p1)]
    assert [round(d, 3) for d in fp32] == list(PUBLISHED[net])  # fp32 on this device: the published figures
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.005, (fp32, bf16)
    grads = []
    for autocast in (False, True):
        x = p0.clone().requires_grad_(True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            model(ref, x).float().sum().backward()
        grads.append(x.grad.flatten())
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.9


def test_frozen_but_differentiable(lpips_dir):
    model = build_lpips("vgg", str(lpips_dir / "vgg16_features_imagenet.pth"))
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    model(x * 2 - 1, torch.zeros(2, 3, 32, 32)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_env_var_folder_and_file(lpips_dir, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(lpips_dir))
    assert lpips_weights.resolve_local_weights("alex") == lpips_dir / "alexnet_features_imagenet.pth"
    monkeypatch.setenv(ENV_VAR, str(lpips_dir / "vgg16_features_imagenet.pth"))
    assert lpips_weights.resolve_local_weights("vgg") == lpips_dir / "vgg16_features_imagenet.pth"
    # the config key wins over the environment variable
    assert lpips_weights.resolve_local_weights("alex", str(lpips_dir)) == lpips_dir / "alexnet_features_imagenet.pth"


def test_full_torchvision_state_dict_is_accepted(lpips_dir, tmp_path):
    state = torch.load(lpips_dir / "alexnet_features_imagenet.pth", weights_only=True)
    state["classifier.1.weight"] = torch.zeros(4096, 9216)  # a full torchvision file also has the classifier
    torch.save(state, tmp_path / "alexnet-owt-7be5be79.pth")
    model = build_lpips("alex", str(tmp_path))
    assert torch.equal(model.net.slice1[0].weight, state["features.0.weight"])


def test_torchvision_cache_is_used(lpips_dir, tmp_path, monkeypatch):
    """With no local path configured, torchvision's normal cache (TORCH_HOME) supplies the backbone."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    os.symlink(
        lpips_dir / "alexnet_features_imagenet.pth", tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    )
    model = build_lpips("alex")
    expected = torch.load(lpips_dir / "alexnet_features_imagenet.pth", weights_only=True)["features.3.weight"]
    assert torch.equal(getattr(model.net.slice2, "3").weight, expected)


def _offline(monkeypatch, tmp_path):
    """No local weights, an empty torch cache, and downloads failing as they do without a network."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", no_network)


def test_offline_without_weights_names_both_remedies(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    with pytest.raises(LPIPSWeightsError) as info:
        build_lpips("vgg")
    message = str(info.value)
    assert "vgg16-397923af.pth" in message and "checkpoints" in message  # remedy 1: torchvision cache
    assert "lpips_weights" in message and ENV_VAR in message  # remedy 2: local file via config / env


def test_bad_paths_are_clear_errors(tmp_path, lpips_dir):
    with pytest.raises(LPIPSWeightsError, match="does not exist"):
        build_lpips("vgg", str(tmp_path / "missing.pth"))
    with pytest.raises(LPIPSWeightsError, match="holds none of"):
        build_lpips("vgg", str(tmp_path))
    with pytest.raises(LPIPSWeightsError, match="lacks features"):
        build_lpips("vgg", str(lpips_dir / "alexnet_features_imagenet.pth"))  # wrong architecture
