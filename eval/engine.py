"""One evaluation engine for ``python -m eval`` and training validation: one pass over the data per model.

A model turns each batch into ``Outputs`` once (encode, decode of the posterior mode); every ``Metric``
updates from those same outputs, on every rank.  A metric gathers what it needs across processes in its
``update`` (``gather_for_metrics``: the duplicates that pad the last batch are dropped), so after the pass
every rank holds the same totals and ``compute`` gives the same figures on every rank.  Work that follows
the pass (decoding interpolations, say) is split between the ranks (``split_rows``) and gathered back.
"""

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from accelerate import Accelerator
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from autoencoder.models import seeded_noise


@dataclass
class Outputs:
    """What a model made of one batch of images, on the device."""

    x: torch.Tensor  # [B,3,H,W] the images in [-1, 1]
    index: torch.Tensor  # [B] their dataset indices (CPU): per-image seeds, whatever the batch or rank
    posterior: DiagonalGaussianDistribution  # q(z|x): mean, logvar [B,C,h,w]
    recon: torch.Tensor  # [B,3,H,W] the decoded posterior mode, float32
    noises: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # seed -> [B,C,h,w], drawn once

    def noise(self, seed: int) -> torch.Tensor:
        """Standard normal noise [B,C,h,w] (float32) per image from ``seeded_noise(..., index, seed)``, on the latents'
        device: drawn once per batch and seed, however many metrics take posterior samples with it."""
        if seed not in self.noises:
            mean = self.posterior.mean
            self.noises[seed] = seeded_noise(tuple(mean.shape[1:]), self.index, seed).to(mean.device)
        return self.noises[seed]


class Metric(Protocol):
    """A figure that accumulates over batches; correct under several processes (see the module docstring)."""

    def update(self, out: Outputs) -> None: ...

    def compute(self) -> dict: ...


def evaluate(loader: Iterable, forward: Callable[[dict], Outputs], metrics: dict[str, Metric]) -> dict[str, dict]:
    """One pass over ``loader``: each batch through ``forward`` once, every metric updated from its outputs."""
    for batch in loader:
        out = forward(batch)
        for metric in metrics.values():
            metric.update(out)
    return {name: metric.compute() for name, metric in metrics.items()}


class TimedVAE:
    """``forward`` of ``evaluate`` for a diffusers VAE: posterior and mode reconstruction, with encode/decode times.

    Times are per process and exclude the first batch's warm-up (CUDA context, cuDNN autotuning).
    """

    def __init__(self, vae, device: torch.device):
        self.vae, self.device = vae, device
        self.encode_seconds = self.decode_seconds = 0.0
        self.images = 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def warm_up(self, x: torch.Tensor) -> None:
        """One untimed round trip of a batch's shape."""
        self.vae.decode(self.vae.encode(x.to(self.device)).latent_dist.mode())
        self._sync()

    @torch.no_grad()
    def __call__(self, batch: dict) -> Outputs:
        x = batch["pixel_values"].to(self.device)
        self._sync()
        t0 = time.perf_counter()
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mode()
        self._sync()
        t1 = time.perf_counter()
        recon = self.vae.decode(z).sample.float()
        self._sync()
        self.encode_seconds += t1 - t0
        self.decode_seconds += time.perf_counter() - t1
        self.images += len(x)
        return Outputs(x, batch["index"], posterior, recon)

    def throughput(self) -> dict:
        """Encode and decode images per second of this process."""
        return {
            "encode_img_per_s": self.images / self.encode_seconds,
            "decode_img_per_s": self.images / self.decode_seconds,
        }


def split_rows(accelerator: Accelerator, rows: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of ``rows`` [N, ...], padded to an equal size on every rank (last row repeated)."""
    n, world = len(rows), accelerator.num_processes
    per = -(-n // world)
    mine = rows[accelerator.process_index * per : (accelerator.process_index + 1) * per]
    if len(mine) < per:  # the last ranks: pad with copies of the last row so every rank gathers as many
        mine = torch.cat([mine, rows[-1:].expand(per - len(mine), *rows.shape[1:])])
    return mine


def gather_rows(accelerator: Accelerator, mine: torch.Tensor, n: int) -> torch.Tensor:
    """Undo ``split_rows`` on a per-row result: every rank's share, in order, the padding dropped: [n, ...]."""
    return accelerator.gather(mine.contiguous())[:n]


class Samples:
    """The first ``n`` images and their reconstructions (gathered), for the pictures: a ``Metric``."""

    def __init__(self, accelerator: Accelerator, n: int):
        self.accelerator, self.n = accelerator, n
        self.inputs: list[torch.Tensor] = []
        self.recons: list[torch.Tensor] = []

    def update(self, out: Outputs) -> None:
        if sum(len(r) for r in self.recons) < self.n:
            x, recon = self.accelerator.gather_for_metrics((out.x, out.recon))
            self.inputs.append(x.cpu())
            self.recons.append(recon.cpu())

    def compute(self) -> dict:
        return {"inputs": torch.cat(self.inputs)[: self.n], "recons": torch.cat(self.recons)[: self.n]}
