"""Measuring a frozen representation: feature extraction, kNN and a linear probe.

kNN follows the instance-discrimination protocol (Wu et al., 2018): cosine similarity,
the k = 200 nearest training features vote with weight exp(similarity / 0.07).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..config import INFERENCE_BATCH_SIZE
from ..data import ImageSet, to_model_input
from ..models.autoencoder import batch_norms
from ..utils import cores
from ..utils.device import autocast

PROBE_SETTINGS = {
    "model": "multinomial logistic regression",
    "optimizer": "full-batch L-BFGS",
    "max_iter": 200,
    "l2": 1e-4,
    "features": "standardised",
}
# labelled images a run's kNN bank and linear probe hold at most (a seeded sample beyond): their
# features are in memory at once, and a run's memory stays flat in the size of its source
PROBE_BANK = 50_000


def bank_size(n: int) -> str:
    """How many of a bank of ``n`` labelled images the probes read, for a log line."""
    return f"{PROBE_BANK} (a seeded sample of {n})" if n > PROBE_BANK else str(n)


def bank_sample(n: int, limit: int, seed: int) -> torch.Tensor | None:
    """Sorted positions of a seeded sample of ``limit`` of ``n`` images; None when all fit."""
    if not limit or n <= limit:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def feature_chunks(
    encoder: nn.Module,
    images: torch.Tensor | ImageSet,
    batch_size: int = INFERENCE_BATCH_SIZE,
    precision: str = "fp32",
    features: str = "latent",
    desc: str | None = None,
) -> Iterator[torch.Tensor]:
    """Features of ``images``, ``batch_size`` images at a time (float32, on the encoder's device).

    ``images`` is a uint8 (N, C, H, W) tensor (0-255, scaled as in training; float in [0, 1] is
    taken as it is) or an :class:`ImageSet`, read chunk by chunk (a big source never whole in
    memory). ``features`` is ``latent`` (what the head reads: the FC code of ``stages``) or ``pooled``
    (every conv stage averaged to 2x2, :meth:`EncoderBase.forward_pooled`). The encoder runs in eval
    mode and is put back after. With ``desc`` a progress bar with an ETA is shown on a terminal (none in a log file).
    """
    from tqdm.auto import tqdm

    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    chunks = (
        images.chunks(batch_size)
        if isinstance(images, ImageSet)
        else (images[start : start + batch_size] for start in range(0, images.shape[0], batch_size))
    )
    n = len(images)
    chunks = tqdm(
        chunks,
        desc=desc,
        total=-(-n // batch_size),
        unit="batch",
        leave=False,
        mininterval=1.0,
        disable=None if desc else True,
    )
    try:
        for x in chunks:
            x = to_model_input(x.to(device))
            with torch.no_grad(), autocast(device, precision):
                f = (encoder.forward_pooled(x) if features == "pooled" else encoder(x)).float()
            cores.poll()
            yield f  # outside the no_grad block: a suspended generator must not hold the caller's grad mode
    finally:
        chunks.close()
        encoder.train(was_training)


def extract_features(
    encoder: nn.Module,
    images: torch.Tensor | ImageSet,
    batch_size: int = INFERENCE_BATCH_SIZE,
    precision: str = "fp32",
    features: str = "latent",
    desc: str | None = None,
) -> torch.Tensor:
    """Features (N, D) of ``images``, as :func:`feature_chunks`, in one tensor."""
    return torch.cat(list(feature_chunks(encoder, images, batch_size, precision, features, desc)))


@torch.no_grad()
def knn_predict(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    test_f: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class predictions for ``test_f`` by temperature-weighted votes of its k nearest neighbours."""
    train_n = F.normalize(train_f, dim=1)
    k = min(k, train_n.shape[0])
    preds = []
    for start in range(0, test_f.shape[0], chunk):
        q = F.normalize(test_f[start : start + chunk], dim=1)
        sim, idx = (q @ train_n.T).topk(k, dim=1)  # (B, k)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(train_f, train_y, test_f, test_y, num_classes: int, k: int = 200, temperature: float = 0.07) -> float:
    pred = knn_predict(train_f, train_y, test_f, num_classes, k, temperature)
    return float((pred == test_y).float().mean())


def fit_logistic(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    num_classes: int,
    max_iter: int = 200,
    l2: float = 1e-4,
    seed: int = 0,
    desc: str | None = None,
) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on standardised features, fitted by full-batch L-BFGS with
    a small L2 penalty: it converges the same way for 250 or 45,000 labelled images, unlike a
    fixed number of SGD epochs. Returns the head and the standardisation (mean, std). With
    ``desc`` a progress bar counts the loss evaluations (at most 1.25 per iteration)."""
    from tqdm.auto import tqdm

    mean, std = train_f.mean(0), train_f.std(0).clamp(min=1e-6)
    if train_f.shape[0] < 2:
        std = torch.ones_like(std)
    xtr = (train_f - mean) / std
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(xtr.shape[1], num_classes).to(xtr.device)
    opt = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    bar = tqdm(
        total=max_iter * 5 // 4, desc=desc, unit="eval", leave=False, mininterval=1.0, disable=None if desc else True
    )

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head(xtr), train_y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        cores.poll()
        bar.update()
        return loss

    try:
        with torch.enable_grad():
            opt.step(closure)
    finally:
        bar.close()
    return head.requires_grad_(False), mean, std


def linear_probe_accuracy(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    test_f: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    max_iter: int = 200,
    l2: float = 1e-4,
    seed: int = 0,
) -> float:
    """Accuracy of multinomial logistic regression on standardised frozen features (:func:`fit_logistic`)."""
    head, mean, std = fit_logistic(train_f, train_y, num_classes, max_iter, l2, seed)
    with torch.no_grad():
        return float((head((test_f - mean) / std).argmax(1) == test_y).float().mean())


@torch.no_grad()
def recalibrate_batch_norm(
    encoder: nn.Module, images: torch.Tensor | ImageSet, precision: str = "fp32", batch_size: int = INFERENCE_BATCH_SIZE
) -> int:
    """Every batch norm's running statistics recomputed as the average over ``images`` (one pass in
    training mode, no gradients), so eval-mode features are what training-mode batches see; the
    number of norms recalibrated. A scratch network's running statistics are still (0, 1), far from
    its batches', and a head fitted on such features is wrong in training."""
    norms = [m for m in batch_norms(encoder) if m.track_running_stats]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = encoder.training
    device = next(encoder.parameters()).device
    chunks = images.chunks(batch_size) if isinstance(images, ImageSet) else images.split(batch_size)
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the chunks
        encoder.train()
        for x in chunks:
            with autocast(device, precision):
                encoder(to_model_input(x.to(device)))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        encoder.train(was_training)
    return len(norms)


@torch.no_grad()
def fit_head(clf: nn.Module, images, labels: torch.Tensor, precision: str, seed: int) -> float:
    """LP-FT's first stage: ``clf.head`` set to the logistic regression fitted to convergence on the
    frozen features of ``images`` (the probe's fit, folded back through the standardisation).
    Returns its accuracy on those images."""
    device = clf.head.weight.device
    if any(p.requires_grad for p in clf.encoder.parameters()):  # a frozen encoder keeps its statistics
        recalibrate_batch_norm(clf.encoder, images, precision)
    feats = extract_features(clf.encoder, images, precision=precision, desc="LP-FT: features of the labelled images")
    y = labels.to(device)
    head, mean, std = fit_logistic(feats, y, clf.head.out_features, seed=seed)
    # a feature that barely varies (below 1 % of the median spread) gets no weight: divided by its spread it
    # would weigh up to a million times the others, and fine-tuning, which moves it, would start at a huge loss
    usable = std >= 0.01 * std.median()
    w = torch.where(usable, head.weight / std, 0.0)  # head((f - mean) / std) = (W / std) f + (b - (W / std) mean)
    clf.head.weight.copy_(w)
    clf.head.bias.copy_(head.bias - w @ mean)
    return float((clf.head(feats).argmax(1) == y).float().mean())


def random_encoder(config, seed: int, device: torch.device | str = "cpu") -> nn.Module:
    """The random-weights baseline: an untrained encoder of ``config``, seeded by ``seed``.

    Drawn from a forked RNG, so it is the same network in every run, evaluation and sweep with
    that seed, and making it leaves the caller's random stream (the weights it trains) untouched.
    """
    from ..models import make_encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = make_encoder(config)
    return enc.to(device, memory_format=torch.channels_last)


def frozen_representation(
    encoder: nn.Module,
    bank: ImageSet,
    queries: ImageSet,
    num_classes: int,
    precision: str,
    seed: int,
    features: str = "latent",
) -> dict:
    """kNN and linear-probe accuracy of the frozen ``encoder`` (``bank`` labelled, ``queries`` scored) next to
    the same architecture with random weights (seeded): the measurement a run and ``convae evaluate`` share."""
    baseline = random_encoder(encoder.config, seed, next(encoder.parameters()).device)
    return representation_scores(
        encoder,
        bank,
        bank.labels,
        queries,
        queries.labels,
        num_classes,
        precision,
        seed,
        features=features,
        baseline=baseline,
    )


def representation_scores(
    encoder: nn.Module,
    train_images: torch.Tensor | ImageSet,
    train_labels: torch.Tensor,
    test_images: torch.Tensor | ImageSet,
    test_labels: torch.Tensor,
    num_classes: int,
    precision: str = "fp32",
    seed: int = 0,
    features: str = "latent",
    baseline: nn.Module | None = None,
    max_bank: int = PROBE_BANK,
    batch_size: int = INFERENCE_BATCH_SIZE,
) -> dict:
    """kNN and linear-probe accuracy of ``encoder``'s frozen features (train = the labelled bank).

    With ``baseline`` (the same architecture with random weights) the same probes score it on
    the same images and features, under ``random``: what the training added is the difference.
    A bank of more than ``max_bank`` images (0 = no limit) is a seeded sample of that many; the
    test images are scored chunk by chunk, so neither set's features grow with the source.
    """
    device = next(encoder.parameters()).device
    pick = bank_sample(len(train_labels), max_bank, seed)
    if pick is not None:
        train_images = train_images.subset(pick) if isinstance(train_images, ImageSet) else train_images[pick]
        train_labels = train_labels[pick]
    ytr, yte = train_labels.to(device), test_labels.to(device)

    def scores(enc: nn.Module, name: str) -> dict[str, float]:
        ftr = extract_features(enc, train_images, batch_size, precision, features, desc=f"{name}: bank")
        head, mean, std = fit_logistic(ftr, ytr, num_classes, seed=seed, desc=f"{name}: linear probe")
        knn = linear = seen = 0
        for f in feature_chunks(enc, test_images, batch_size, precision, features, desc=f"{name}: queries"):
            y = yte[seen : seen + len(f)]
            seen += len(f)
            knn += int((knn_predict(ftr, ytr, f, num_classes) == y).sum())
            with torch.no_grad():
                linear += int((head((f - mean) / std).argmax(1) == y).sum())
        return {"knn_accuracy": knn / max(seen, 1), "linear_probe_accuracy": linear / max(seen, 1)}

    out = {
        **scores(encoder, "features"),
        "knn": {"k": min(200, len(ytr)), "temperature": 0.07, "similarity": "cosine"},
        "linear_probe": PROBE_SETTINGS,
        "features": features,
        "train_images": int(len(ytr)),
        "test_images": int(len(yte)),
    }
    if pick is not None:
        out["bank_sample"] = f"a seeded sample of {len(ytr)} of the bank's images"
    if baseline is not None:
        out["random"] = scores(baseline.to(device), "random weights")
    return out
