"""Reconstruction metrics shared by training validation and the evaluation runner (``Reconstruction``).

Images are compared as published VAE tables do: quantised to 8 bit, per-image scores, averaged
over images.  PSNR and SSIM come from torchmetrics (SSIM: 11x11 Gaussian window, sigma 1.5);
LPIPS from the ``lpips`` package with real ImageNet backbones (``autoencoder.lpips_weights``).
"""

import torch
from torch import nn
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

# Half the 11-tap Gaussian window: the border where the SSIM window does not fit inside the image.
SSIM_PAD = 5
# MS-SSIM's 5 scales halve the image 4 times; the coarsest must exceed the 11-pixel window: side // 16 > 10.
MS_SSIM_MIN_SIZE = 176


def quantize_01(x: torch.Tensor) -> torch.Tensor:
    """[-1,1] images -> [0,1] on the 8-bit grid (what a saved PNG would hold)."""
    return ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round() / 255.0


def psnr_per_image(pred01: torch.Tensor, target01: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image, data range 1.0: [B,C,H,W] x2 -> [B]."""
    return peak_signal_noise_ratio(pred01, target01, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim_per_image(pred01: torch.Tensor, target01: torch.Tensor) -> torch.Tensor:
    """SSIM per image (Gaussian 11x11, sigma 1.5, data range 1.0) over the valid region: [B,C,H,W] x2 -> [B].

    torchmetrics reflect-pads and averages the whole SSIM map; Wang et al.'s reference code (and
    scikit-image) average only where the window fits inside the image, so we drop the 5-pixel border.
    """
    _, ssim_map = structural_similarity_index_measure(
        pred01, target01, data_range=1.0, reduction="none", return_full_image=True
    )
    return ssim_map[..., SSIM_PAD:-SSIM_PAD, SSIM_PAD:-SSIM_PAD].mean(dim=(1, 2, 3))


def ms_ssim_per_image(pred01: torch.Tensor, target01: torch.Tensor) -> torch.Tensor:
    """MS-SSIM per image (5 scales, Wang et al. 2003 weights, Gaussian 11x11): [B,C,H,W] x2 -> [B]."""
    return multiscale_structural_similarity_index_measure(pred01, target01, data_range=1.0, reduction="none")


COLOUR_SHIFT = ("colour_shift_r", "colour_shift_g", "colour_shift_b")


def colour_shift(pred01: torch.Tensor, target01: torch.Tensor) -> torch.Tensor:
    """|mean over pixels of (reconstruction − image)| per image and channel, in 8-bit levels: [B,3,H,W] x2 -> [B,3].

    A colour cast: a tinted reconstruction moves a channel's mean by the tint.  Per image, so casts of opposite
    sign in different images do not cancel.
    """
    return ((pred01 - target01) * 255).mean(dim=(2, 3)).abs()


@torch.no_grad()
def reconstruction_metrics(
    reconstructions: torch.Tensor, inputs: torch.Tensor, lpips_model: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """Per-image psnr/ssim(/ms_ssim/lpips) and colour shift (R, G, B) for [-1,1] batches [B,3,H,W]; [B] tensors.

    ``ms_ssim`` is included when both sides are at least ``MS_SSIM_MIN_SIZE`` pixels.
    """
    pred01, target01 = quantize_01(reconstructions), quantize_01(inputs)
    out = {"psnr": psnr_per_image(pred01, target01), "ssim": ssim_per_image(pred01, target01)}
    out.update(zip(COLOUR_SHIFT, colour_shift(pred01, target01).unbind(1)))
    if min(inputs.shape[-2:]) >= MS_SSIM_MIN_SIZE:
        out["ms_ssim"] = ms_ssim_per_image(pred01, target01)
    if lpips_model is not None:
        # LPIPS takes [-1,1]; feed the same quantised images.
        out["lpips"] = lpips_model(pred01 * 2 - 1, target01 * 2 - 1).flatten()
    return out


class MeanAccumulator:
    """Streaming per-key sum/count of per-image values (feed it gathered tensors)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def update(self, values: dict[str, torch.Tensor]) -> None:
        """Add [N] tensors of per-image values."""
        for key, v in values.items():
            v = v.detach().double().flatten()
            self.sums[key] = self.sums.get(key, 0.0) + v.sum().item()
            self.counts[key] = self.counts.get(key, 0) + v.numel()

    def compute(self) -> dict[str, float]:
        """Mean of each key over everything seen."""
        return {key: self.sums[key] / self.counts[key] for key in self.sums}

    def count(self, key: str) -> int:
        """Number of values seen for ``key``."""
        return self.counts.get(key, 0)


class Reconstruction:
    """Per-image PSNR/SSIM(/MS-SSIM)/LPIPS of the reconstructions, mean over images: an ``eval.engine`` metric."""

    def __init__(self, accelerator, lpips_model: nn.Module | None = None):
        self.accelerator, self.lpips_model = accelerator, lpips_model
        self.means = MeanAccumulator()

    def update(self, out) -> None:
        values = reconstruction_metrics(out.recon, out.x, self.lpips_model)
        self.means.update(self.accelerator.gather_for_metrics(values))

    def compute(self) -> dict:
        return {**self.means.compute(), "n_images": self.means.count("psnr")}
