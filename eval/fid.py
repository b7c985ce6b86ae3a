"""Fréchet distances: rFID on the standard FID InceptionV3, and FDs on other, named extractors.

rFID uses the TF-ported 2015-12-05 InceptionV3 that pytorch-fid and torch-fidelity use (through
torchmetrics' ``NoTrainInceptionV3``, i.e. torch-fidelity's network and TF-compatible resize).
Its weights come from a user path, ``$FID_WEIGHTS``, the torch hub cache, or a download, and the
file's SHA-256 is verified.  When they cannot be had, rFID is *unavailable* with the reason —
never computed on another network.  A distance on other features (``fd_vgg16``) always carries
the extractor's name.
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from autoencoder.errors import UsageError

FID_WEIGHTS_ENV = "FID_WEIGHTS"
# torch-fidelity's release of the TF 2015-12-05 Inception graph (what torchmetrics' FID loads).
FID_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
FID_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"


class FIDWeightsError(UsageError):
    """A given Inception weights file is not the standard one."""


@dataclass
class FIDWeights:
    """Where the Inception weights are, or why they are unavailable (exactly one is set)."""

    path: Path | None = None
    unavailable: str | None = None


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verified(path: Path) -> Path:
    """``path`` if it holds the standard FID Inception weights, else a FIDWeightsError."""
    got = sha256_of(path)
    if got != FID_WEIGHTS_SHA256:
        raise FIDWeightsError(
            f"{path} is not the standard FID Inception weights file (sha256 {got[:16]}..., expected "
            f"{FID_WEIGHTS_SHA256[:16]}...). Use {FID_WEIGHTS_FILENAME} from {FID_WEIGHTS_URL}."
        )
    return path


def hub_cache_path() -> Path:
    """Where torch hub (and so torchmetrics/torch-fidelity) caches the weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILENAME


def resolve_fid_weights(path: str | None = None, download: bool = True) -> FIDWeights:
    """Find (or download) and verify the FID Inception weights; report why not when impossible."""
    source = path or os.environ.get(FID_WEIGHTS_ENV)
    if source:  # an explicit choice must exist and be right: that is an error, not "unavailable"
        p = Path(source).expanduser()
        if p.is_dir():
            p = p / FID_WEIGHTS_FILENAME
        if not p.is_file():
            raise FIDWeightsError(f"FID weights {str(p)!r} do not exist; expected {FID_WEIGHTS_FILENAME}.")
        return FIDWeights(path=verified(p))
    cached = hub_cache_path()
    if cached.is_file():
        return FIDWeights(path=verified(cached))
    how = (
        f"put {FID_WEIGHTS_FILENAME} (sha256 {FID_WEIGHTS_SHA256[:12]}...) at {cached}, or pass --fid_weights PATH "
        f"/ set {FID_WEIGHTS_ENV}=PATH"
    )
    if not download:
        return FIDWeights(unavailable=f"FID Inception weights not found and downloading is off; {how}")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(cached), hash_prefix=FID_WEIGHTS_SHA256, progress=False)
    except Exception as exc:  # offline: URLError / socket errors; a bad download: RuntimeError on the hash
        return FIDWeights(
            unavailable=f"FID Inception weights could not be downloaded ({type(exc).__name__}: {exc}); {how}"
        )
    return FIDWeights(path=verified(cached))


class InceptionFeatures(nn.Module):
    """uint8 [B,3,H,W] -> [B,2048] pool3 features of the standard FID InceptionV3."""

    name = "inception_v3"
    num_features = 2048

    def __init__(self, weights: Path):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights)
        )

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return self.net(images_uint8)


class VGG16Features(nn.Module):
    """uint8 [B,3,H,W] -> [B,512]: global-average-pooled conv5_3 of ImageNet VGG16 (offline-available)."""

    name = "vgg16"
    num_features = 512

    def __init__(self, features_state: dict[str, torch.Tensor]):
        super().__init__()
        from torchvision.models import vgg16

        self.features = vgg16().features
        self.features.load_state_dict({k.removeprefix("features."): v for k, v in features_state.items()}, strict=True)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8.float() / 255.0
        x = nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
        x = self.features((x - self.mean) / self.std)  # [B,512,7,7]
        return x.mean(dim=(2, 3))


class _Precomputed(nn.Module):
    """Identity 'extractor' so torchmetrics' FID accumulators take features we gathered ourselves."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class FrechetAccumulator:
    """Streaming Fréchet distance between a real and a fake feature set (float64 sums, torchmetrics' formula).

    Features are fed already gathered across processes (``gather_for_metrics``), so torchmetrics'
    own distributed sync is off: every process holds the same totals.
    """

    def __init__(self, num_features: int):
        self.metric = FrechetInceptionDistance(
            feature=_Precomputed(num_features), reset_real_features=False, sync_on_compute=False
        )

    def update(self, features: torch.Tensor, real: bool) -> None:
        """Add [N,D] features to the real or fake set."""
        self.metric.update(features.detach().cpu().double(), real=real)

    def reset_fake(self) -> None:
        """Forget the fake set, keep the real statistics (next model, same images)."""
        self.metric.reset()  # reset_real_features=False keeps the real sums

    def compute(self) -> float:
        """The Fréchet distance; clamped at 0 since round-off can take identical sets a hair below."""
        return max(0.0, float(self.metric.compute()))


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """The Fréchet distance between two feature sets [N, D] (torchmetrics' formula, float64)."""
    acc = FrechetAccumulator(real.shape[1])
    acc.update(real, real=True)
    acc.update(fake, real=False)
    return acc.compute()


class FeatureBank:
    """The real evaluation images' features on each extractor: filled once per run, shared by every model.

    An ``eval.engine`` metric for the first model's pass (later passes add nothing): ``update`` extracts and
    gathers the features of each batch's images; ``real(name)`` is the [N, D] float64 set.
    """

    def __init__(self, accelerator, extractors: dict[str, nn.Module]):
        self.accelerator, self.extractors = accelerator, extractors
        self.parts: dict[str, list[torch.Tensor]] = {name: [] for name in extractors}
        self.done = False

    @torch.no_grad()
    def update(self, out) -> None:
        if self.done:
            return
        images = to_uint8(out.x)
        for name, extractor in self.extractors.items():
            self.parts[name].append(self.accelerator.gather_for_metrics(extractor(images)).double().cpu())

    def compute(self) -> dict:
        self.done = True  # the set is complete after one pass
        return {}

    def real(self, name: str) -> torch.Tensor:
        return torch.cat(self.parts[name])


class FrechetDistance:
    """FD between the real images and the reconstructions on one extractor (``rfid``, ``fd_vgg16``): a metric."""

    def __init__(self, accelerator, bank: FeatureBank, name: str):
        self.accelerator, self.bank, self.name = accelerator, bank, name
        self.fake: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, out) -> None:
        features = self.bank.extractors[self.name](to_uint8(out.recon))
        self.fake.append(self.accelerator.gather_for_metrics(features).double().cpu())

    def compute(self) -> dict:
        return {"value": frechet_distance(self.bank.real(self.name), torch.cat(self.fake))}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1,1] float images -> uint8 [0,255] (the 8-bit images the distance is defined on)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
