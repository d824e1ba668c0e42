import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convae.models import AutoEncoder, ModelConfig
from convae.models.upsample_conv import can_fuse, upsample_conv


def unfused(x, w, b, mode):
    return F.conv2d(F.interpolate(x, scale_factor=2, mode=mode), w, b, padding=1)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("shape", [(64, 3, 16, 16), (5, 2, 3, 4), (3, 4, 1, 1), (2, 2, 2, 5), (4, 1, 7, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_upsample_conv_is_the_same_function_and_gradient(mode, shape, bias):
    c, o, h, w = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, c, h, w, dtype=torch.float64, generator=g, requires_grad=True)
    wt = torch.randn(o, c, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(o, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    gy = torch.randn(3, o, 2 * h, 2 * w, dtype=torch.float64, generator=g)
    inputs = (x, wt) + ((b,) if bias else ())

    ref = unfused(x, wt, b, mode)
    ref_grads = torch.autograd.grad(ref, inputs, gy)
    out = upsample_conv(x, wt, b, mode)
    grads = torch.autograd.grad(out, inputs, gy)

    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_fused_upsample_conv_passes_gradcheck(mode):
    g = torch.Generator().manual_seed(1)
    args = [
        torch.randn(s, dtype=torch.float64, generator=g, requires_grad=True) for s in [(2, 3, 3, 4), (2, 3, 3, 3), (2,)]
    ]
    assert torch.autograd.gradcheck(lambda x, w, b: upsample_conv(x, w, b, mode), args)


def test_second_derivatives_are_refused_not_wrong():
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(upsample_conv(x, w, None).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


def test_fused_upsample_conv_only_for_input_gradient():
    # the weight frozen (as in a frozen decoder): only the input's gradient is asked for
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 8, 3, 3, dtype=torch.float64, generator=g)
    b = torch.randn(3, dtype=torch.float64, generator=g)
    (gx,) = torch.autograd.grad(upsample_conv(x, w, b).sum(), x)
    (want,) = torch.autograd.grad(unfused(x, w, b, "bilinear").sum(), x)
    torch.testing.assert_close(gx, want, rtol=1e-12, atol=1e-12)


def test_fused_upsample_conv_follows_bf16_autocast():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 16, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(3, 16, 3, 3, generator=g, requires_grad=True)
    b = torch.randn(3, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = upsample_conv(x, w, b)
        ref = unfused(x, w, b, "bilinear")
    assert out.dtype == ref.dtype == torch.bfloat16
    # both round to bfloat16 (8 bits of mantissa) at different points: compare at that precision
    torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.15)
    out.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32


def test_float64_is_left_alone_under_autocast_as_conv2d_does():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=g)
    w = torch.randn(3, 4, 3, 3, dtype=torch.float64, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = upsample_conv(x, w, None), unfused(x, w, None, "bilinear")
    assert out.dtype == ref.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_only_exact_pairs_are_fused():
    conv = nn.Conv2d(8, 3, 3, padding=1)
    assert can_fuse(nn.Upsample(scale_factor=2, mode="bilinear"), conv)
    assert can_fuse(nn.Upsample(scale_factor=2, mode="nearest"), conv)
    assert not can_fuse(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), conv)
    assert not can_fuse(nn.Upsample(size=(7, 7), mode="bilinear"), conv)
    assert not can_fuse(nn.Upsample(scale_factor=3, mode="bilinear"), conv)
    assert not can_fuse(nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(8, 3, 3, padding=1, stride=2))
    assert not can_fuse(nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(8, 3, 5, padding=2))
    assert not can_fuse(
        nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(8, 3, 3, padding=1, padding_mode="reflect")
    )


def test_only_narrow_convs_are_fused_where_it_was_measured_to_pay():
    assert len(AutoEncoder(ModelConfig(channels=(32, 32, 32))).decoder._fusable) == 1  # 32 -> 3
    assert not AutoEncoder(ModelConfig(channels=(16, 32, 32))).decoder._fusable  # 16 -> 3


def test_seed_decoder_fuses_its_reconstruction_layer_only():
    ae = AutoEncoder(ModelConfig())
    fused = sorted(ae.decoder._fusable)
    assert [type(ae.decoder.conv[i]).__name__ for i in fused] == ["Upsample"]
    assert ae.decoder.conv[fused[0] + 1].out_channels == 3


@pytest.mark.parametrize("upsample", ["bilinear", "nearest"])
def test_fused_decoder_trains_like_the_plain_one(upsample):
    """Fused and plain decoders give the same gradients for every parameter."""
    cfg = ModelConfig(channels=(16, 32, 32), latent_dim=64, upsample=upsample)
    torch.manual_seed(0)
    plain = AutoEncoder(cfg).double()
    fused = AutoEncoder(cfg).double()
    fused.load_state_dict(plain.state_dict())
    plain.decoder.fuse_upsample = False
    # fuse every exact pair, wide ones too, so that fused layers also follow each other
    layers = fused.decoder.conv
    fused.decoder._fusable = {i for i in range(len(layers) - 1) if can_fuse(layers[i], layers[i + 1])}
    x = torch.rand(6, 3, 32, 32, dtype=torch.float64)
    for model in (plain, fused):
        F.mse_loss(model(x), x).backward()
    assert len(fused.decoder._fusable) == 3
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_tracing_sees_the_plain_layers():
    ae = AutoEncoder(ModelConfig(channels=(8, 16, 16), latent_dim=32)).eval()
    x = torch.rand(2, 3, 32, 32)
    traced = torch.jit.trace(ae, x)
    assert "upsample_bilinear2d" in str(traced.inlined_graph)
    torch.testing.assert_close(traced(x), ae(x), rtol=1e-5, atol=1e-6)
