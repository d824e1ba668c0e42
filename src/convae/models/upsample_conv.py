"""Exact fused operations that make the lecture's decoder faster on CPUs.

The decoder ends with ``Upsample(scale_factor=2) -> Conv2d(64, 3, 3, padding=1)``. On a CPU that
pair is the most expensive part of a training step for about 3 % of its FLOPs: the upsampled
64x32x32 volume is materialised, and a convolution with three output channels suits oneDNN's
channel blocking badly (~35 GFLOP/s where the other layers run at ~190).

:func:`upsample_conv` computes the same function without the upsampled volume. A 2x upsample
(bilinear with ``align_corners=False``, or nearest) followed by a 3x3 convolution is, for each
of the four output phases (row parity, column parity), a 3x3 convolution of the *low-resolution*
input padded by edge replication: four composed kernels, one convolution with ``4 * out``
channels, then a pixel shuffle. Two rings are then put right, each by 1-D convolutions along the
four edges: the convolution runs with zero padding, so the replicated low-resolution ring's
contribution is added; and the original zero-pads the *upsampled* image where the composed
kernels see its edges replicated, so that ring's contribution is subtracted.

Same parameters, same state dict, same result up to float rounding (tests compare it with the
unfused layers in float64, forward and all gradients, to 1e-12).

:func:`upsampler` builds the decoder's plain 2x step (upsample or transposed convolution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

# For each output phase p (even/odd row), the weights that the low-resolution taps
# (i-1, i, i+1) get from the conv's taps (w0, w1, w2): row a of _PHASES[mode][p] is tap a.
# Bilinear, align_corners=False: u[2i] = x[i-1]/4 + 3x[i]/4, u[2i+1] = 3x[i]/4 + x[i+1]/4
# (edges replicated); then y[2i+p] = w0 u[2i+p-1] + w1 u[2i+p] + w2 u[2i+p+1].
_PHASES = {
    "bilinear": (
        ((0.75, 0.25, 0.0), (0.25, 0.75, 0.75), (0.0, 0.0, 0.25)),
        ((0.25, 0.0, 0.0), (0.75, 0.75, 0.25), (0.0, 0.25, 0.75)),
    ),
    "nearest": (
        ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0), (0.0, 0.0, 0.0)),
        ((0.0, 0.0, 0.0), (1.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
    ),
}


def can_fuse(upsample: nn.Module, conv: nn.Module) -> bool:
    """Whether ``conv(upsample(x))`` is a pair :func:`upsample_conv` computes exactly."""
    if not (isinstance(upsample, nn.Upsample) and isinstance(conv, nn.Conv2d)):
        return False
    scale = upsample.scale_factor
    scale = tuple(scale) if isinstance(scale, (tuple, list)) else (scale, scale)
    return (
        upsample.mode in _PHASES
        and upsample.size is None
        and scale == (2.0, 2.0)
        and not upsample.align_corners
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def fusion_pays(conv: nn.Conv2d) -> bool:
    """Whether fusing pays on a CPU: narrow outputs, where oneDNN's channel blocking wastes most
    of the plain convolution (measured by benchmarks/fused_layer.py: 64 -> 3 and 64 -> 8 gain,
    16 outputs and more are mixed or slower)."""
    return conv.out_channels <= 8 and 8 * conv.out_channels <= conv.in_channels


def _phase_matrix(mode: str, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(_PHASES[mode], dtype=like.dtype, device=like.device)  # (2 phases, 3, 3)


def _compose(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """(O, C, 3, 3) conv weight -> (4 O, C, 3, 3) low-resolution kernels, channel o * 4 + 2 p + q."""
    m = _phase_matrix(mode, weight)
    o, c = weight.shape[:2]
    return torch.einsum("pak,ockl,qbl->opqcab", m, weight, m).reshape(4 * o, c, 3, 3)


def _compose_grad(grad_k: torch.Tensor, mode: str) -> torch.Tensor:
    """The transpose of :func:`_compose`: gradient of the composed kernels -> of the weight."""
    m = _phase_matrix(mode, grad_k)
    c = grad_k.shape[1]
    g = grad_k.reshape(-1, 2, 2, c, 3, 3)
    return torch.einsum("pak,opqcab,qbl->ockl", m, g, m)


def _upsample_1d(v: torch.Tensor, mode: str) -> torch.Tensor:
    """(..., n) -> (..., 2 n) along the last axis, edges replicated as ``interpolate`` does."""
    if mode == "nearest":
        return v.repeat_interleave(2, dim=-1)
    left = torch.cat([v[..., :1], v[..., :-1]], -1)
    right = torch.cat([v[..., 1:], v[..., -1:]], -1)
    return torch.stack([0.25 * left + 0.75 * v, 0.75 * v + 0.25 * right], -1).flatten(-2)


def _shift_add(p: torch.Tensor, pad: str) -> torch.Tensor:
    """(B, O, 3 taps, n) -> (B, O, n): the taps' rows, padded by one and summed with shifts."""
    n = p.shape[-1]
    if pad == "replicate":
        p = torch.cat([p[..., :1], p, p[..., -1:]], -1)
    else:
        p = F.pad(p, (1, 1))
    return p[:, :, 0, 0:n] + p[:, :, 1, 1 : n + 1] + p[:, :, 2, 2 : n + 2]


def _edges(x: torch.Tensor) -> list[torch.Tensor]:
    """First and last rows (B, C, W), first and last columns (B, C, H)."""
    return [x[:, :, 0, :], x[:, :, -1, :], x[:, :, :, 0], x[:, :, :, -1]]


def _border_terms(edges: list[torch.Tensor], weight: torch.Tensor, k: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """What must be added to the low-resolution output's top and bottom rows, left and right
    columns (each (B, 4 O, n)) to turn ``conv2d(x, composed, padding=1)`` into the original.

    Two rings differ from the original. At low resolution the composed kernels must see the
    input's edges replicated, not zeros: add the replicated ring's contribution. At high
    resolution the original conv zero-pads the upsampled image, while the composed kernels
    see its edges replicated: subtract that ring's contribution from the phase that holds
    the edge (row phase 0 for the top, 1 for the bottom; column phase 0 left, 1 right).
    The corners of each ring belong to its top and bottom rows, so columns pad with zeros.
    """
    both = torch.cat([k, weight])  # (5 O, C, 3, 3): k = _compose(weight) for the low ring, then high
    o = weight.shape[0]
    terms = []
    for side, edge in enumerate(edges):
        is_row, last = side < 2, side % 2
        tap = 2 * last  # the kernel row (or column) that reaches past this edge
        pad = "replicate" if is_row else "zeros"
        taps = both[:, :, tap, :] if is_row else both[:, :, :, tap]
        # contract the channels first (one small matrix product for both rings), so that the
        # padding, upsampling and shifting act on 5 O rows instead of C
        p = torch.einsum("bcn,oct->botn", edge, taps)  # (B, 5 O, 3, n)
        low = _shift_add(p[:, : 4 * o], pad)  # (B, 4 O, n)
        high = _shift_add(_upsample_1d(p[:, 4 * o :], mode), pad)  # (B, O, 2 n), along the edge
        b, n = high.shape[0], edge.shape[-1]
        high = high.view(b, o, n, 2).transpose(2, 3)  # (B, O, phase along the edge, n)
        phases = torch.zeros(b, o, 2, 2, n, dtype=high.dtype, device=high.device)
        if is_row:
            phases[:, :, last] = high  # row phase fixed, column phase runs along the row
        else:
            phases[:, :, :, last] = high
        terms.append(low - phases.view(b, 4 * o, n))
    return terms


def _add_borders(y4: torch.Tensor, terms: list[torch.Tensor]) -> None:
    top, bottom, left, right = terms
    y4[:, :, 0, :] += top
    y4[:, :, -1, :] += bottom
    y4[:, :, :, 0] += left
    y4[:, :, :, -1] += right


class _UpsampleConv(torch.autograd.Function):
    """Forward and backward by hand: the big convolution goes straight to ATen, the border
    terms (1-D, small) are differentiated by autograd, and no full-size zero tensors are made."""

    @staticmethod
    def forward(ctx, x, weight, bias, mode):  # type: ignore[override]
        k = _compose(weight, mode)
        b4 = None if bias is None else bias.repeat_interleave(4)
        y4 = F.conv2d(x, k, b4, padding=1)  # (B, 4 O, H, W), channel o * 4 + 2 p + q
        _add_borders(y4, _border_terms(_edges(x), weight, k, mode))
        ctx.mode, ctx.has_bias = mode, bias is not None
        ctx.save_for_backward(x, weight, k)
        return F.pixel_shuffle(y4, 2)  # (B, O, 2H, 2W)

    @staticmethod
    @once_differentiable  # a second derivative raises instead of being silently wrong
    def backward(ctx, gy):  # type: ignore[override]
        x, weight, k = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gy4 = F.pixel_unshuffle(gy.to(x.dtype), 2)
        gx, gk, gb4 = torch.ops.aten.convolution_backward(
            gy4,
            x,
            k,
            [k.shape[0]] if ctx.has_bias else None,
            [1, 1],
            [1, 1],
            [1, 1],
            False,
            [0, 0],
            1,
            [need_x, need_w, need_b and ctx.has_bias],
        )
        gw = _compose_grad(gk, ctx.mode) if need_w else None
        gb = gb4.view(-1, 4).sum(1) if need_b and ctx.has_bias else None
        if need_x or need_w:
            with torch.enable_grad():
                edges = [e.detach().requires_grad_(need_x) for e in _edges(x)]
                w = weight.detach().requires_grad_(need_w)
                terms = _border_terms(edges, w, _compose(w, ctx.mode), ctx.mode)
                inputs = (edges if need_x else []) + ([w] if need_w else [])
                grads = torch.autograd.grad(terms, inputs, _edges(gy4))
            if need_x:
                _add_borders(gx, list(grads[:4]))
            if need_w:
                gw = gw + grads[-1]
        return gx, gw, gb, None


def upsample_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mode: str = "bilinear"
) -> torch.Tensor:
    """``conv2d(interpolate(x, scale_factor=2, mode=mode), weight, bias, padding=1)``, fused.

    x: (B, C, H, W), weight: (O, C, 3, 3) -> (B, O, 2H, 2W). Honours CPU autocast the way
    ``conv2d`` does: under bfloat16 autocast the convolutions run in bfloat16.
    """
    if mode not in _PHASES:
        raise ValueError(f"upsample_conv supports {sorted(_PHASES)}, not {mode!r}")
    # as autocast treats conv2d: float64 is left alone, other floating types are cast
    if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return _UpsampleConv.apply(x, weight, bias, mode)


def upsampler(mode: str, channels: int, src: tuple[int, int], dst: tuple[int, int]) -> nn.Module:
    """One 2x spatial step of the decoder, landing exactly on the encoder's size ``dst``."""
    if mode in ("bilinear", "nearest"):
        if dst == (2 * src[0], 2 * src[1]):
            return nn.Upsample(scale_factor=2, mode=mode)  # what the lecture prints
        return nn.Upsample(size=dst, mode=mode)  # odd sizes: 4 -> 7, not 8
    if mode == "transposed":
        # out = 2 * in - 1 + output_padding; the encoder gave ceil(n / 2), so padding is 0 or 1
        pad = (dst[0] - (2 * src[0] - 1), dst[1] - (2 * src[1] - 1))
        return nn.ConvTranspose2d(channels, channels, 3, stride=2, padding=1, output_padding=pad)
    raise ValueError(f"unknown upsample mode {mode!r}")


__all__ = ["can_fuse", "fusion_pays", "upsample_conv", "upsampler"]
