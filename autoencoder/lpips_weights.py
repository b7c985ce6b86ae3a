"""LPIPS with real ImageNet backbones: torchvision's cache/download, or a local torchvision-format file.

``lpips.LPIPS(pretrained=True)`` takes its learned linear heads from files inside the ``lpips``
wheel, but its VGG/AlexNet backbone from torchvision's download.  Offline that download fails;
rather than ever run with a random backbone, we build the network empty (meta device) and load
the backbone ourselves, with the heads from lpips' package file, under one strict key check, or
stop with a message naming the remedies.
"""

import inspect
import os
import warnings
from pathlib import Path

import lpips
import torch
from torchvision import models as tv_models

from .errors import UsageError

ENV_VAR = "LPIPS_WEIGHTS"

# torchvision weight enums per LPIPS net (their files are what torchvision caches).
TORCHVISION_WEIGHTS = {
    "vgg": tv_models.VGG16_Weights.IMAGENET1K_V1,
    "alex": tv_models.AlexNet_Weights.IMAGENET1K_V1,
}

# File names looked for inside a weights folder: features-only exports, then torchvision's own names.
LOCAL_FILENAMES = {
    "vgg": ("vgg16_features_imagenet.pth", "vgg16-397923af.pth"),
    "alex": ("alexnet_features_imagenet.pth", "alexnet-owt-7be5be79.pth"),
}


class LPIPSWeightsError(UsageError):
    """The LPIPS backbone weights cannot be found or do not fit."""


def _remedies(net: str) -> str:
    """The two ways to provide backbone weights, for error messages."""
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(TORCHVISION_WEIGHTS[net].url).name
    return (
        f"Either (1) let torchvision download/cache them: go online once, or copy "
        f"{Path(TORCHVISION_WEIGHTS[net].url).name} to {cache}; or (2) point to a local torchvision-format file "
        f"(features-only is enough, e.g. {LOCAL_FILENAMES[net][0]}) or a folder holding one, with the config key "
        f"lpips_weights (--lpips_weights=PATH) or the environment variable {ENV_VAR}=PATH."
    )


def resolve_local_weights(net: str, weights: str | None = None) -> Path | None:
    """The local backbone file from the config key or $LPIPS_WEIGHTS (file or folder), or None."""
    source = weights or os.environ.get(ENV_VAR)
    if not source:
        return None
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in LOCAL_FILENAMES[net]:
            if (path / name).is_file():
                return path / name
        raise LPIPSWeightsError(
            f"LPIPS weights folder {str(path)!r} holds none of {list(LOCAL_FILENAMES[net])} for net={net!r}. "
            + _remedies(net)
        )
    raise LPIPSWeightsError(f"LPIPS weights path {str(path)!r} does not exist. " + _remedies(net))


def backbone_features(net: str, weights: str | None = None) -> dict[str, torch.Tensor]:
    """The ``features.*`` tensors of the ImageNet backbone for ``net`` ('vgg' or 'alex')."""
    path = resolve_local_weights(net, weights)
    if path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        try:  # torchvision's normal path: the torch hub cache, else a download
            state = TORCHVISION_WEIGHTS[net].get_state_dict(progress=False)
        except Exception as exc:  # offline: URLError, socket errors, partial files
            raise LPIPSWeightsError(
                f"cannot obtain the ImageNet {net} backbone for LPIPS ({type(exc).__name__}: {exc}). " + _remedies(net)
            ) from exc
    return {k: v for k, v in state.items() if k.startswith("features.")}


def head_weights(net: str) -> dict[str, torch.Tensor]:
    """LPIPS's learned linear heads (v0.1), from the file inside the ``lpips`` package, keyed ``lin{k}.…``."""
    path = Path(inspect.getfile(lpips.LPIPS)).parent / "weights" / "v0.1" / f"{net}.pth"
    return torch.load(path, map_location="cpu", weights_only=True)


def build_lpips(net: str = "vgg", weights: str | None = None) -> lpips.LPIPS:
    """A frozen (eval, no grad to its weights) LPIPS that is still differentiable w.r.t. its inputs."""
    # Built on the meta device, then every tensor assigned from a file with a strict key check:
    # torchvision would otherwise random-initialise the whole network first, the classifier LPIPS
    # never uses included (1.5 s for VGG-16 on a CPU, in every run's start-up).
    with torch.device("meta"), warnings.catch_warnings():
        # lpips builds its backbone with torchvision's deprecated ``pretrained=False``; we load the weights
        # ourselves below, so torchvision's two deprecation warnings about that argument say nothing to a user.
        warnings.filterwarnings("ignore", message="The parameter 'pretrained' is deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", message="Arguments other than a weight enum", category=UserWarning)
        model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
    features = backbone_features(net, weights)
    # lpips splits torchvision's `features` Sequential into slices keeping the original indices:
    # slice{k}.{i}.weight <- features.{i}.weight.
    mapped = {}
    for name, param in model.net.state_dict().items():
        _, index, kind = name.split(".")
        key = f"features.{index}.{kind}"
        if key not in features or features[key].shape != param.shape:
            raise LPIPSWeightsError(
                f"LPIPS {net} backbone file lacks {key} of shape {tuple(param.shape)}; is it a torchvision "
                f"{'vgg16' if net == 'vgg' else 'alexnet'} state dict? " + _remedies(net)
            )
        mapped[name] = features[key]
    unused = set(features) - {f"features.{n.split('.', 1)[1]}" for n in mapped}
    if unused:
        raise LPIPSWeightsError(
            f"LPIPS {net} backbone file has unexpected keys {sorted(unused)[:4]}. " + _remedies(net)
        )
    heads = head_weights(net)
    state = {
        **{f"scaling_layer.{k}": v for k, v in lpips.ScalingLayer().state_dict().items()},
        **{f"net.{k}": v for k, v in mapped.items()},
        **heads,
        **{f"lins.{k[3:]}": v for k, v in heads.items()},
    }  # ``lins`` lists the same lin0..lin4
    model.load_state_dict(state, strict=True, assign=True)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    model.eval().requires_grad_(False)
    return model
