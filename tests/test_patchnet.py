"""The patch architecture: normalised responses, the dictionary decoder, crops, whitening, transfer."""

import copy

import pytest
import torch
import torch.nn.functional as F

from convae.config import build_config
from convae.evaluation.probes import random_encoder
from convae.models import AutoEncoder, Classifier, ModelConfig
from convae.models.objectives import ObjectiveConfig, make_objective
from convae.models.patch import VARIANCE_FLOOR, WHITENING_EPS, patch_stats, random_patches
from convae.utils.errors import ConvaeError


def patch_config(**kw) -> ModelConfig:
    return ModelConfig(**{"arch": "patch", "channels": (12,), "kernel_size": 5, **kw})


def test_the_response_is_each_filters_dot_product_with_the_normalised_patch():
    torch.manual_seed(0)
    enc = AutoEncoder(patch_config()).encoder
    x = torch.rand(2, 3, 16, 16)
    y = enc.response(x)
    assert y.shape == (2, 12, 12, 12)
    w = enc.conv.weight.flatten(1)
    w = w / w.norm(dim=1, keepdim=True)
    for b, i, j in ((0, 0, 0), (1, 7, 3), (1, 11, 11)):
        p = x[b, :, i : i + 5, j : j + 5].flatten()
        p = (p - p.mean()) / (p.var() + VARIANCE_FLOOR).sqrt()
        torch.testing.assert_close(y[b, :, i, j], w @ p, rtol=1e-4, atol=1e-4)


def test_features_are_the_thresholded_code_summed_over_quadrants():
    torch.manual_seed(0)
    cfg = patch_config(threshold=0.5)
    enc = AutoEncoder(cfg).encoder.eval()
    x = torch.rand(3, 3, 16, 16)
    f = enc(x)
    assert f.shape == (3, cfg.feature_dim) == (3, 48)
    h = F.relu(enc.response(x) - 0.5)  # 12 x 12 map: quadrants of 6 x 6
    torch.testing.assert_close(f.view(3, 12, 2, 2)[:, :, 1, 0], h[:, :, 6:, :6].mean((2, 3)), rtol=1e-4, atol=1e-5)
    assert torch.equal(enc.forward_pooled(x), f)


def test_features_in_chunks_are_the_whole_batchs_with_the_same_gradients(monkeypatch):
    """The CPU computes the response map a few images at a time (cache-sized chunks); the features
    and every gradient are the whole batch's, in training and in inference."""
    from convae.models import patch as patchnet

    torch.manual_seed(0)
    clf = Classifier(patch_config(threshold=0.25))
    x, y = torch.rand(11, 3, 16, 16), torch.randint(0, 10, (11,))
    results = []
    for chunk in (100, 3):  # one pass, then chunks of 3 (3 + 3 + 3 + 2)
        monkeypatch.setitem(patchnet.CHUNK, "cpu", chunk)
        model = copy.deepcopy(clf)  # the same batch-norm statistics before each
        F.cross_entropy(model.train()(x), y).backward()
        with torch.no_grad():
            features = model.eval().encoder(x)
        results.append((features, model.encoder.conv.weight.grad.clone()))
    (f_one, g_one), (f_chunked, g_chunked) = results
    torch.testing.assert_close(f_chunked, f_one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_chunked, g_one, rtol=1e-4, atol=1e-7)
    assert g_one.abs().sum() > 0


def test_the_pooled_code_with_its_own_backward_matches_autograd():
    """Training reads the features through a function with a hand-written backward pass (every
    pass over the map in place); its values and gradients are autograd's on the plain ops."""
    torch.manual_seed(0)
    enc = AutoEncoder(patch_config(threshold=0.25)).encoder
    enc.patch_mean.normal_(0, 0.1)  # a fitted whitening's centre: the bias takes a gradient
    x = torch.rand(5, 3, 15, 14)  # odd and even sizes: overlapping and disjoint quadrants
    g = torch.randn(5, 48)
    grads = []
    for own in (True, False):
        enc.zero_grad()
        with torch.enable_grad():
            f = (
                enc.quadrants(x)
                if own
                else F.adaptive_avg_pool2d(  # 5 images: one chunk, through _PooledCode
                    F.relu(enc.response(x) - 0.25), 2
                ).flatten(1)
            )
            (f * g).sum().backward()
        grads.append((f.detach(), enc.conv.weight.grad.clone()))
    (f_own, g_own), (f_ref, g_ref) = grads
    torch.testing.assert_close(f_own, f_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_own, g_ref, rtol=1e-4, atol=1e-6)
    assert g_ref.abs().sum() > 0


def test_a_crop_the_size_of_a_patch_decodes_as_the_general_path_does():
    """Pretraining decodes one code per k x k crop by a matrix product and a reshape; the result is
    the 1x1 convolution and fold's."""
    from convae.models.patch import patch_stats

    torch.manual_seed(0)
    ae = AutoEncoder(patch_config())
    crops = torch.rand(7, 3, 5, 5)
    h = torch.rand(7, 12, 1, 1, requires_grad=True)
    out = ae.decoder(h, crops)
    mean, std = patch_stats(crops, 5)
    cols = (ae.decoder.dictionary(h) * std + mean).flatten(2)
    ref = F.fold(cols, (5, 5), 5) / F.fold(torch.ones_like(cols[:1]), (5, 5), 5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.pow(2).sum().backward()
    g_own = ae.decoder.dictionary.weight.grad.clone()
    ae.zero_grad()
    ref.pow(2).sum().backward()
    torch.testing.assert_close(g_own, ae.decoder.dictionary.weight.grad, rtol=1e-5, atol=1e-6)


def test_a_crop_the_size_of_a_patch_responds_as_the_general_path_does():
    """Pretraining encodes one k x k crop per code by a matrix product, its statistics by plain
    reductions; each crop's response and the filters' gradient are those of the convolution over
    the image the crops tile."""
    torch.manual_seed(0)
    enc = AutoEncoder(patch_config()).encoder
    enc.patch_mean.normal_(0, 0.1)  # a fitted whitening's centre: the bias counts
    x = torch.rand(3, 3, 6, 6)  # 2 x 2 positions of a 5 x 5 filter
    crops = torch.stack([x[:, :, i : i + 5, j : j + 5] for i in range(2) for j in range(2)], 1).flatten(0, 1)
    mean, std = patch_stats(crops, 5)
    ref_mean, ref_std = patch_stats(x, 5)  # the convolution's statistics: (3, 1, 2, 2)
    torch.testing.assert_close(mean.view(3, 2, 2), ref_mean.view(3, 2, 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std.view(3, 2, 2), ref_std.view(3, 2, 2), rtol=1e-5, atol=1e-6)
    g = torch.randn(3, 12, 2, 2)
    y = enc.response(crops)  # (12, 12, 1, 1): one response per crop
    (y.view(3, 2, 2, 12).permute(0, 3, 1, 2) * g).sum().backward()
    g_crops = enc.conv.weight.grad.clone()
    enc.zero_grad()
    ref = enc.response(x)  # (3, 12, 2, 2)
    (ref * g).sum().backward()
    torch.testing.assert_close(y.view(3, 2, 2, 12).permute(0, 3, 1, 2), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_crops, enc.conv.weight.grad, rtol=1e-4, atol=1e-5)
    assert g_crops.abs().sum() > 0


def test_perfect_patches_decode_to_the_image():
    """De-normalising every position's true patch and averaging the overlaps gives the input back."""
    torch.manual_seed(0)
    ae = AutoEncoder(patch_config(in_channels=1, height=11, width=9, kernel_size=4))
    x = torch.rand(2, 1, 11, 9)
    mean, std = patch_stats(x, 4)
    true = (F.unfold(x, 4) - mean.flatten(2)) / std.flatten(2)  # (B, k*k, L)
    ae.decoder.patches = lambda h: true.view(2, 16, 8, 6)
    torch.testing.assert_close(ae.decoder(None, x), x, rtol=1e-5, atol=1e-5)


def test_random_patches_are_crops_of_their_own_image():
    x = torch.rand(3, 2, 10, 12)
    crops = random_patches(x, 4, 5, torch.Generator().manual_seed(0))
    assert crops.shape == (15, 2, 4, 4)
    for n, crop in enumerate(crops):
        img = x[n // 5]
        found = [(i, j) for i in range(7) for j in range(9) if torch.equal(img[:, i : i + 4, j : j + 4], crop)]
        assert len(found) == 1  # random pixels: exactly one place it can come from
    again = random_patches(x, 4, 5, torch.Generator().manual_seed(0))
    assert torch.equal(crops, again)


def test_whitening_decorrelates_the_normalised_patches():
    torch.manual_seed(0)
    enc = AutoEncoder(patch_config(in_channels=1, kernel_size=3, channels=(4,))).encoder
    # smooth images: neighbouring pixels are strongly correlated before whitening
    x = F.avg_pool2d(torch.rand(400, 1, 20, 20), 3, 1)
    enc.fit_whitening(x, torch.Generator().manual_seed(0))
    crops = random_patches(x, 3, 10, torch.Generator().manual_seed(0))  # the sample it was fitted on
    mean, std = patch_stats(crops, 3)
    p = ((crops - mean) / std).flatten(1)
    white = (p - enc.patch_mean) @ enc.whitening
    # ZCA with a floor: each principal direction's variance e becomes e / (e + 0.1), in the same axes
    evals, evecs = torch.linalg.eigh(torch.cov(p.T.double()))
    expected = evecs @ torch.diag(evals / (evals + WHITENING_EPS)) @ evecs.T
    torch.testing.assert_close(torch.cov(white.T.double()), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(white.mean(0), torch.zeros(9), rtol=0, atol=1e-4)
    assert (torch.cov(p.T) - torch.cov(white.T)).abs().max() > 0.3  # the sample was far from white
    # the filters the figures show are the unit filters through the whitening
    w = enc.conv.weight.flatten(1)
    torch.testing.assert_close(enc.kernels().flatten(1), (w / w.norm(dim=1, keepdim=True)) @ enc.whitening)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_the_patches_objective_trains_grey_and_colour_images(shape):
    torch.manual_seed(0)
    c, h, w = shape
    ae = AutoEncoder(patch_config(in_channels=c, height=h, width=w, kernel_size=6, channels=(16,)))
    obj = make_objective(ObjectiveConfig("patches", crop_size=6, patches_per_image=8, lifetime_rate=0.25))
    x = torch.rand(16, c, h, w)
    opt = torch.optim.Adam(ae.parameters(), 1e-2)
    losses = []
    for step in range(30):
        loss = obj.loss(ae, x, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-5:]) / 5 < 0.9 * losses[0]


def test_the_patches_objective_keeps_each_units_lifetime_winners():
    """The decoder sees ceil(rate * crops) non-zero codes per unit: the lifetime winner-take-all."""
    torch.manual_seed(0)
    ae = AutoEncoder(patch_config(channels=(6,), kernel_size=4))
    seen = {}
    ae.decoder.register_forward_pre_hook(lambda m, args: seen.update(h=args[0]))
    make_objective(ObjectiveConfig("patches", crop_size=4, patches_per_image=5, lifetime_rate=0.2)).loss(
        ae, torch.rand(4, 3, 16, 16), torch.Generator().manual_seed(0)
    )
    h = seen["h"]
    assert h.shape == (20, 6, 1, 1)
    assert ((h.flatten(1) > 0).sum(0) <= 4).all() and ((h.flatten(1) > 0).sum(0) == 4).any()


def test_transfer_copies_filters_and_whitening_and_the_baseline_has_none():
    torch.manual_seed(0)
    ae = AutoEncoder(patch_config())
    ae.encoder.fit_whitening(torch.rand(50, 3, 32, 32), torch.Generator().manual_seed(0))
    clf = Classifier.from_autoencoder(ae, 4)
    for k, v in ae.encoder.state_dict().items():
        assert torch.equal(v, clf.encoder.state_dict()[k])
    assert clf(torch.rand(2, 3, 32, 32)).shape == (2, 4) and clf.head.in_features == 48
    base = random_encoder(ae.config, 1)
    assert torch.equal(base.whitening, torch.eye(75)) and not torch.equal(base.conv.weight, ae.encoder.conv.weight)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"arch": "patch", "channels": [8, 16], "objective": "patches"}, "has one layer"),
        ({"arch": "patch", "channels": [8], "kernel_size": 40, "objective": "patches"}, "at most the input size"),
        ({"arch": "patch", "channels": [8]}, "patches objective trains the patch architecture"),
        ({"objective": "patches"}, "patches objective trains the patch architecture"),
        ({"threshold": -1.0}, "threshold must be"),
        ({"kernel_size": 1}, "kernel_size must be"),
    ],
)
def test_patch_config_mistakes_are_refused(overrides, message):
    with pytest.raises(ConvaeError, match=message):
        build_config("seed", None, overrides)


def test_the_preset_is_the_documented_recipe():
    cfg = build_config("patches")
    m = cfg.model_config()
    assert (m.arch, m.channels, m.kernel_size, m.whiten, cfg.objective) == ("patch", (400,), 6, True, "patches")
    assert m.feature_dim == 1600


def test_the_hugging_face_folder_keeps_the_whitening(tmp_path):
    from convae.outputs import hub

    torch.manual_seed(0)
    ae = AutoEncoder(patch_config(whiten=True))
    ae.encoder.fit_whitening(torch.rand(30, 3, 32, 32), torch.Generator().manual_seed(0))
    back = hub.from_pretrained(hub.save_pretrained(ae, tmp_path / "hf"))
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(back.encoder.whitening, ae.encoder.whitening)
    assert torch.equal(back.eval()(x), ae.eval()(x)) and torch.equal(back.encoder(x), ae.encoder(x))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_response_of_flat_patches_is_exact_in_either_precision(precision):
    """A nearly flat patch's response is the difference of sums that almost cancel: computed in bf16
    (autocast) it was mostly rounding error, amplified by the small contrast it is divided by."""
    torch.manual_seed(0)
    enc = AutoEncoder(patch_config(kernel_size=6, channels=(16,))).encoder
    x = 0.6 + 0.01 * torch.rand(2, 3, 16, 16)  # low contrast: deviation near the variance floor
    x[:, :, :, 8:] += 0.3 * torch.rand(2, 3, 16, 8)  # and a textured half
    p = F.unfold(x.double(), 6)  # (B, 108, L): every patch, normalised by hand in float64
    p = (p - p.mean(1, keepdim=True)) / (p.var(1, keepdim=True) + VARIANCE_FLOOR).sqrt()
    w = enc.conv.weight.double().flatten(1)
    expected = ((w / w.norm(dim=1, keepdim=True)) @ p).view(2, 16, 11, 11)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        y = enc.response(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=1e-4)
