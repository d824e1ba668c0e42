"""The ``patch`` architecture: one wide convolution learned as a sparse autoencoder of patches.

The single-layer recipe of Coates, Lee & Ng (2011) with the lifetime sparsity of Makhzani &
Frey (2015), as a convolutional autoencoder:

- every k x k receptive field is contrast-normalised on its own (mean 0, variance 1 over its
  C * k * k values, a small floor on the variance), computed for all positions at once, and
  (``whiten``) ZCA-whitened with statistics fitted on the training patches before pretraining;
- ``K`` filters of unit norm respond to it (a valid convolution: 32 -> 27 for k = 6); the code
  is the rectified response, ``relu(y)`` while pretraining, ``relu(y - threshold)`` as features;
- the decoder is a linear dictionary: each position's code maps to the normalised patch it saw;
- the features are the code averaged over the four quadrants of the map (4 * K numbers: Coates
  et al.'s sum pooling up to a constant), standardised by a parameter-free batch norm for the
  classifier's head.

Pretraining uses the ``patches`` objective (random k x k crops, winner-take-all over the
batch); the encoder is an ordinary module: transfer, fine-tuning, probes, export and the
kernel figures see the same :class:`~convae.models.registry.EncoderBase` interface as every encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.errors import ConvaeError
from ..utils.knobs import Flag, Int, Num, knob
from .objectives import Objective, register_objective, winner_take_all
from .registry import Architecture, BaseModelConfig, Code, EncoderBase, register_architecture

VARIANCE_FLOOR = 10 / 255**2  # Coates et al.'s "+10" on the variance of 0-255 pixels, for [0, 1] pixels
WHITENING_EPS = 0.1  # added to the eigenvalues of the normalised patches' covariance (Coates et al.)
WHITENING_IMAGES, WHITENING_PATCHES = 10_000, 10  # the sample the whitening is fitted on


@dataclass(frozen=True)
class PatchKnobs:
    """The patch network's own settings (flags, saved configs and checkpoints hold them as any knob)."""

    kernel_size: int = knob(6, Int(2), "patch: filter and patch side (default 6)", group="model", metavar="K")
    threshold: float = knob(
        0.25, Num(0), "patch: features are relu(response - T) (default 0.25)", group="model", metavar="T"
    )
    whiten: bool = knob(
        False, Flag(), "patch: ZCA-whiten the patches, fitted on the training images before pretraining", group="model"
    )


# images per response map: on the CPU a chunk's (n, K, 27, 27) map stays in the caches (8 images: 9 MiB at
# K = 400; 3-4x faster than 64, BENCHMARKS.md); on a GPU only to bound memory
CHUNK = {"cpu": 8}
GPU_CHUNK = 512


def patch_stats(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and floored standard deviation of every k x k patch (all channels): (B, 1, H', W') each."""
    d = x.shape[1] * k * k
    x = x.float()
    if x.shape[2:] == (k, k):  # a crop the size of a patch (pretraining): its one patch, no convolution
        mean, var = x.mean((1, 2, 3), keepdim=True), x.var((1, 2, 3), keepdim=True)
        return mean, (var + VARIANCE_FLOOR).sqrt()
    shift = x.mean((1, 2, 3), keepdim=True)  # E[x^2] - mean^2 cancels less on pixels near 0
    ones = x.new_ones(1, x.shape[1], k, k)
    with exact(x):
        mean = F.conv2d(x - shift, ones) / d
        var = (F.conv2d((x - shift) ** 2, ones) / d - mean * mean).clamp(min=0) * (d / (d - 1))  # as torch.var
    return mean + shift, (var + VARIANCE_FLOOR).sqrt()


def exact(x: torch.Tensor):
    """float32 inside bf16 autocast: a patch's mean and contrast, and its response, come from sums of
    ~100 pixels that nearly cancel on a flat patch; in bf16 the result is mostly rounding error."""
    if not torch.amp.is_autocast_available(x.device.type):  # the meta device sizes a model: no autocast there
        return torch.autocast("cpu", enabled=False)
    return torch.autocast(x.device.type, enabled=False)


class PatchEncoder(EncoderBase):
    """Image -> quadrant-pooled features. x: (B, 3, 32, 32) -> code (B, K, 27, 27) -> (B, 4 * K)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.config = cfg
        k, width = cfg.kernel_size, cfg.channels[0]
        d = cfg.in_channels * k * k
        self.conv = nn.Conv2d(cfg.in_channels, width, k, bias=False)  # used with unit-norm filters
        # the whitening (identity until fitted: an untrained network has none); saved with the weights
        self.register_buffer("patch_mean", torch.zeros(d))
        # built on the CPU even where the model is sized on the meta device (meta's eye is a slow Python path)
        self.register_buffer("whitening", torch.eye(d, device="cpu"))
        # standardises the features for a linear head; running stats start at (0, 1): the identity
        self.norm = nn.BatchNorm1d(4 * width, affine=False)

    @property
    def first_conv(self) -> nn.Conv2d:
        return self.conv

    @property
    def fit_images(self) -> int:  # type: ignore[override]
        return WHITENING_IMAGES if self.config.whiten else 0

    def fit_to_data(self, x: torch.Tensor, generator: torch.Generator) -> str | None:
        self.fit_whitening(x, generator)
        return "whitening fitted on the training images' patches"

    def kernels(self) -> torch.Tensor:
        return self.filters().detach().clone()

    def filters(self) -> torch.Tensor:
        """The filters as they act on normalised pixels: unit norm, then through the whitening.
        These are the kernels the figures show: (K, C, k, k)."""
        w = self.conv.weight.flatten(1)
        w = w / w.norm(dim=1, keepdim=True).clamp(min=1e-8)
        return (w @ self.whitening).view_as(self.conv.weight)  # the whitening matrix is symmetric

    def response(self, x: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        """Every filter's response to every normalised patch, minus ``shift``: (B, K, H - k + 1, W - k + 1)."""
        xc, w, std, bias = self._parts(x, shift)
        with exact(xc):
            if xc.shape[2:] == w.shape[2:]:  # one patch per crop (pretraining): a matrix product (the step 1.3x faster)
                return torch.addmm(bias.view(1, -1), xc.flatten(1) / std.view(-1, 1), w.flatten(1).t())[..., None, None]
            y = F.conv2d(xc, w)
        # in place: the convolution's backward does not read its output, and each pass over the map
        # costs as much as the convolution's arithmetic
        return y.div_(std).add_(bias)

    def _parts(self, x: torch.Tensor, shift: float) -> tuple[torch.Tensor, ...]:
        """What the response is made of: (images centred, channels-last; filters centred; each patch's
        contrast; bias - shift), with response = conv(images, filters) / contrast + bias."""
        _, std = patch_stats(x, self.config.kernel_size)
        x = x.float()
        with exact(x):
            w = self.filters()
            # sum((p - mean(p)) * w) = sum(p * (w - mean(w))): centred filters subtract every patch's
            # mean exactly, in the same pass, and a constant shift of the image changes nothing
            w = w - w.mean((1, 2, 3), keepdim=True)
            # channels last: oneDNN's fast layout for a wide convolution of 3 channels (1.8x, BENCHMARKS.md)
            xc = (x - x.mean((1, 2, 3), keepdim=True)).contiguous(memory_format=torch.channels_last)
            bias = -(w.flatten(1) @ self.patch_mean)  # the whitening centres on the patches' mean
        return xc, w, std, (bias - shift).view(1, -1, 1, 1)

    @torch.no_grad()
    def fit_whitening(self, x: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """ZCA whitening of the normalised k x k patches of ``x`` (float images in [0, 1])."""
        k = self.config.kernel_size
        crops = random_patches(x.float(), k, WHITENING_PATCHES, generator)
        mean, std = patch_stats(crops, k)
        p = ((crops - mean) / std).flatten(1).double()  # (N, C*k*k)
        mu = p.mean(0)
        evals, evecs = torch.linalg.eigh(torch.cov((p - mu).T))
        zca = evecs @ torch.diag((evals.clamp(min=0) + WHITENING_EPS).rsqrt()) @ evecs.T
        self.patch_mean.copy_(mu.float())
        self.whitening.copy_(((zca + zca.T) / 2).float())

    def code(self, x: torch.Tensor) -> Code:
        """The code the decoder reads while pretraining, relu of the responses, and the image (the
        decoder de-normalises each patch with the image's own patch statistics)."""
        return F.relu(self.response(x)), x

    def quadrants(self, x: torch.Tensor) -> torch.Tensor:
        """relu(response - threshold) averaged over the map's four quadrants: (B, K, 2, 2) -> (B, 4K)."""
        chunk = CHUNK.get(x.device.type, GPU_CHUNK)
        # an exported graph has no chunks: a branch on the batch size would fix it at export
        tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
        if not tracing and x.shape[0] > chunk:
            # the (B, K, 27, 27) responses of a few images at a time (autograd follows the chunks)
            return torch.cat([self.quadrants(c) for c in x.split(chunk)])
        if tracing:
            return F.adaptive_avg_pool2d(self.response(x, self.config.threshold).relu_(), 2).flatten(1)
        xc, w, std, shift = self._parts(x, self.config.threshold)
        with exact(xc):
            if not torch.is_grad_enabled():  # the probes' features: the training forward without its saved map
                return _pooled(xc, w, std.reciprocal(), shift)[1].flatten(1)
            return _PooledCode.apply(xc, w, std.reciprocal(), shift).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.quadrants(x))  # forward_pooled is the same: already pooled conv features


def _bins(n: int, device: torch.device) -> torch.Tensor:
    """(2, n): adaptive average pooling's two bins over ``n`` positions, as averaging weights."""
    w = torch.zeros(2, n, device=device)
    for p in range(2):
        lo, hi = (p * n) // 2, -(-((p + 1) * n) // 2)
        w[p, lo:hi] = 1.0 / (hi - lo)
    return w


def _pooled(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rectified map relu(conv(x, w) * scale + shift), (B, K, H, W), and its quadrant average, (B, K, 2, 2)."""
    y = F.conv2d(x, w)
    r = torch.addcmul(shift, y, scale, out=y).relu_()  # in place: one pass for the contrast and the bias
    return r, F.adaptive_avg_pool2d(r, 2)


class _PooledCode(torch.autograd.Function):
    """relu(conv(x, w) * scale + shift) averaged over the map's quadrants, (B, K, H, W) -> (B, K, 2, 2),
    with every pass over the (B, K, H, W) map in place: autograd's version allocates a new map for
    each elementwise step and its backward (on the CPU a fresh allocation of a few MiB costs its page
    faults, and the average pool's backward of a channels-last map a zero fill and two copies), 2.5x
    slower than the convolution and its weight gradient together. ``x`` and ``scale`` (the images and
    their patch contrast) take no gradient; ``w`` and ``shift`` do."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        r, pooled = _pooled(x, w, scale, shift)
        ctx.save_for_backward(x, w, r, scale)
        return pooled

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w, r, scale = ctx.saved_tensors
        assert not (ctx.needs_input_grad[0] or ctx.needs_input_grad[2]), "the images take no gradient"
        b, k, h, wd = r.shape
        bins = (_bins(h, r.device)[:, :, None, None] * _bins(wd, r.device)[None, None]).permute(1, 3, 0, 2)
        # (B, H * W, K): the map's channels-last layout, which the convolution's backward reads
        up = torch.matmul(bins.reshape(h * wd, 4), grad.float().permute(0, 2, 3, 1).reshape(b, 4, k))
        # the rectifier's backward (zero where the output is zero), in place: vectorised, unlike
        # masked_fill or where, and no new map (a fresh one costs its page faults)
        up = up.view(b, h, wd, k).permute(0, 3, 1, 2)
        up = torch.ops.aten.threshold_backward.grad_input(up, r, 0, grad_input=up)
        grad_shift = up.sum((0, 2, 3), keepdim=True) if ctx.needs_input_grad[3] else None
        grad_w = torch.ops.aten.convolution_backward(
            up.mul_(scale), x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False]
        )[1]
        return None, grad_w, None, grad_shift


class PatchDecoder(nn.Module):
    """Code -> image. (B, K, 27, 27) -> each position's normalised patch (B, C*k*k, 27, 27) ->
    de-normalised with that patch's own mean and contrast, overlaps averaged -> (B, 3, 32, 32)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.config = cfg
        k = cfg.kernel_size
        self.dictionary = nn.Conv2d(cfg.channels[0], cfg.in_channels * k * k, 1)  # linear, per position

    def patches(self, h: torch.Tensor) -> torch.Tensor:
        """The normalised patch each position's code stands for: (B, C*k*k, H', W')."""
        if h.shape[2:] == (1, 1):  # one code per crop (pretraining): a matrix product, 6x faster than a 1x1 conv
            w = self.dictionary.weight
            return F.linear(h.flatten(1), w.flatten(1), self.dictionary.bias).view(-1, w.shape[0], 1, 1)
        return self.dictionary(h)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        k, (H, W) = self.config.kernel_size, x.shape[2:]
        mean, std = patch_stats(x.float(), k)
        cols = (self.patches(h).float() * std + mean).flatten(2)  # (B, C*k*k, L) in pixels
        if (k, k) == (H, W):  # a crop the size of a patch (pretraining): its one patch is the image
            return cols.view(x.shape)
        image = F.fold(cols, (H, W), k)
        cover = F.fold(torch.ones_like(cols[:1]), (H, W), k)  # patches covering each pixel
        return image / cover


def random_patches(x: torch.Tensor, k: int, per_image: int, generator: torch.Generator | None) -> torch.Tensor:
    """``per_image`` random k x k crops of every image, batched: (B * per_image, C, k, k)."""
    b, c, h, w = x.shape
    n = b * per_image
    top = torch.randint(0, h - k + 1, (n,), generator=generator, device=x.device)
    left = torch.randint(0, w - k + 1, (n,), generator=generator, device=x.device)
    img = torch.arange(b, device=x.device).repeat_interleave(per_image)
    rows = (top.view(n, 1) + torch.arange(k, device=x.device)).view(n, 1, k, 1)
    cols = (left.view(n, 1) + torch.arange(k, device=x.device)).view(n, 1, 1, k)
    chans = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return x[img.view(n, 1, 1, 1), chans, rows, cols]  # one gather, no Python loop over crops


@register_objective
class Patches(Objective):
    """Random crops of the filters' size; each unit kept for its largest responses over all crops of
    the batch (lifetime sparsity); the loss on contrast-normalised patches."""

    name, random, archs = "patches", True, ("patch",)

    def loss(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """MSE between random crops and their reconstructions, both contrast-normalised by the
        crop's own mean and deviation (a flat patch counts as much as an edge)."""
        c = self.cfg
        crops = random_patches(x, c.crop_size, c.patches_per_image, generator)  # (N, C, k, k)
        code_fn = lambda h: winner_take_all(h.flatten(1), 0, c.lifetime_rate).view_as(h)
        out = model(crops, code_fn=code_fn)  # through forward: DDP sees the step
        mean, std = patch_stats(crops.float(), c.crop_size)  # (N, 1, 1, 1): one patch per crop
        return F.mse_loss((out.float() - mean) / std, (crops.float() - mean) / std)


def _check(cfg: BaseModelConfig, where: str) -> None:
    if len(cfg.channels) != 1:
        raise ConvaeError(
            f"{where}the patch architecture has one layer: channels must be one width (the number of "
            f"filters), got {list(cfg.channels)[:8]}"
        )
    if cfg.kernel_size > min(cfg.height, cfg.width):
        raise ConvaeError(
            f"{where}kernel_size must be at most the input size {min(cfg.height, cfg.width)}, got {cfg.kernel_size}"
        )


PRESETS = {
    # One wide convolution learned as a sparse autoencoder of 6x6 patches (Coates et al. 2011's single
    # layer with Makhzani & Frey's lifetime sparsity); features are the code averaged over quadrants.
    # Pretraining takes minutes, not hours, on a 2-core CPU.
    "patches": {
        "arch": "patch",
        "channels": (400,),
        "kernel_size": 6,
        "threshold": 0.25,
        "whiten": True,
        "objective": "patches",
        "patches_per_image": 16,
        "lifetime_rate": 0.05,
        "batch_size": 256,
        "pretrain_epochs": 5,
        "finetune_epochs": 30,
        "augment": True,
        "optimizer": "adamw",
        "weight_decay": 0.05,
        "schedule": "cosine",
        "probe_features": "pooled",
    },
}

register_architecture(
    Architecture(
        "patch",
        PatchEncoder,
        PatchDecoder,
        feature_dim=lambda cfg: 4 * cfg.channels[0],
        check=_check,
        objectives=("patches",),
        presets=PRESETS,
        knobs=PatchKnobs,
    )
)
