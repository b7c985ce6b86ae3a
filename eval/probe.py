"""Linear probe: how linearly the class can be read off a VAE's latents (top-1 accuracy of a linear classifier).

A multinomial logistic regression on the flattened posterior means, fit on the reference split (``--reference_split``,
its ``--probe_labels`` column) and scored on the evaluation images.  Each latent dimension is standardised with the
training split's mean and std; the loss is the mean cross-entropy plus ``PROBE_L2 / 2 · ‖W‖²`` (the bias is not
penalised), minimised by ``torch.optim.LBFGS`` (strong-Wolfe line search) from zero weights in float64.  The fit is
deterministic (zero start, full batch): no seed enters it.  Linear-probe accuracy on the latents is one of the
proxies the iFID paper measured against generation FID (Xu et al. 2026).
"""

import torch
import torch.nn.functional as F

PROBE_L2 = 1e-3  # L2 penalty on the weights (standardised features)
PROBE_MAX_ITER = 500  # LBFGS iterations (one full-batch step of the optimiser)


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, classes: int) -> dict[str, torch.Tensor]:
    """Fit on [N, D] features and [N] integer labels; the classifier's tensors (standardisation, W, b)."""
    x = features.double().flatten(1)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=PROBE_MAX_ITER, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, labels.long()) + PROBE_L2 / 2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return {"mean": mean, "std": std, "weight": weight.detach(), "bias": bias.detach()}


def predict(probe: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """[N] predicted classes of [N, D] features."""
    x = (features.double().flatten(1) - probe["mean"]) / probe["std"]
    return (x @ probe["weight"] + probe["bias"]).argmax(1)


def probe_accuracy(
    train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor
) -> dict:
    """Top-1 accuracy on (test, test_labels) of the probe fit on (train, train_labels), with what it rests on."""
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    probe = fit_linear_probe(train, train_labels, classes)
    correct = (predict(probe, test) == test_labels.long()).double().mean()
    train_correct = (predict(probe, train) == train_labels.long()).double().mean()
    return {
        "top1": float(correct),
        "train_top1": float(train_correct),
        "n_train": len(train),
        "n_test": len(test),
        "classes": classes,
        "l2": PROBE_L2,
    }


class LinearProbe:
    """The probe's accuracy on the evaluation images: an ``eval.engine`` metric.

    ``update`` gathers the posterior means and image indices; ``labels`` maps indices to classes; the training
    features and labels (``train``) are set by the runner from its reference pass before ``compute``.
    """

    def __init__(self, accelerator, labels: torch.Tensor):
        self.accelerator, self.labels = accelerator, labels
        self.means: list[torch.Tensor] = []
        self.indices: list[torch.Tensor] = []
        self.train: tuple[torch.Tensor, torch.Tensor] | None = None  # ([M, ...] means, [M] labels)

    def update(self, out) -> None:
        index = out.index.to(out.x.device)
        mean, index = self.accelerator.gather_for_metrics((out.posterior.mean.float(), index))
        self.means.append(mean.flatten(1).cpu())
        self.indices.append(index.cpu())

    def compute(self) -> dict:
        test_labels = self.labels[torch.cat(self.indices)]
        return probe_accuracy(*self.train, torch.cat(self.means), test_labels)
