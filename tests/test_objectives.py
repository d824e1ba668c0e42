"""Each pretraining objective means what it says."""

import pytest
import torch
from torch import nn

from convae.models import AutoEncoder, ModelConfig
from convae.models.objectives import (
    OBJECTIVES,
    ObjectiveConfig,
    denormalise_patches,
    make_objective,
    masked_mse,
    normalise_patches,
    patch_mask,
    winner_take_all,
)


class Echo(nn.Module):
    """Returns a fixed prediction, whatever the input: the loss then depends on the target only."""

    def __init__(self, prediction):
        super().__init__()
        self.prediction = prediction

    def forward(self, x, code_fn=None):
        return self.prediction


def test_reconstruct_is_the_lecture_mse_exactly():
    torch.manual_seed(0)
    ae = AutoEncoder(ModelConfig(channels=(8, 16), latent_dim=16))
    x = torch.rand(4, 3, 32, 32)
    loss = make_objective(ObjectiveConfig("reconstruct")).loss(ae, x)
    assert torch.equal(loss, nn.functional.mse_loss(ae(x), x))


def test_the_masked_loss_ignores_visible_pixels():
    x = torch.rand(2, 3, 16, 16)
    obj = make_objective(ObjectiveConfig("masked", mask_ratio=0.5, patch_size=4))
    inp, mask = obj.corrupt(x, torch.Generator().manual_seed(1))
    assert mask.shape == (2, 1, 16, 16) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert (mask.view(2, -1).mean(1) == 0.5).all()  # 8 of 16 patches hidden in every image
    assert torch.equal(inp * mask, torch.zeros_like(inp))  # hidden pixels are zero in the input
    assert torch.equal(inp * (1 - mask), x * (1 - mask))  # visible pixels are untouched
    pred = torch.rand(2, 3, 16, 16)
    changed = pred + 5 * (1 - mask)  # change the prediction on visible pixels only
    assert masked_mse(pred, x, mask) == masked_mse(changed, x, mask)
    assert masked_mse(pred + 5 * mask, x, mask) > masked_mse(pred, x, mask)
    # through the objective: the same generator gives the same mask, so the loss is unchanged too
    a = obj.loss(Echo(pred), x, torch.Generator().manual_seed(1))
    b = obj.loss(Echo(changed), x, torch.Generator().manual_seed(1))
    assert a == b


def test_patch_masks_cover_odd_sizes_with_whole_patches():
    m = patch_mask(torch.Size([3, 1, 7, 10]), 4, 0.75, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert m.shape == (3, 1, 7, 10)
    grid = m[:, :, ::4, ::4]  # one value per 4x4 patch: 2 x 3 patches, the border ones partial
    assert grid.shape == (3, 1, 2, 3) and (grid.sum((1, 2, 3)) == round(0.75 * 6)).all()
    whole = grid.repeat_interleave(4, 2).repeat_interleave(4, 3)[:, :, :7, :10]
    assert torch.equal(m, whole)  # every patch is hidden or visible as a whole


def test_normalised_patch_targets_have_zero_mean_and_unit_std():
    x = torch.rand(2, 3, 8, 8) * 0.3 + 0.5
    t = normalise_patches(x, 4).view(2, 3, 2, 4, 2, 4)
    assert t.mean(dim=(1, 3, 5)).abs().max() < 1e-5
    assert (t.var(dim=(1, 3, 5), unbiased=False) - 1).abs().max() < 1e-3


def test_denormalised_patches_invert_the_normalisation_at_odd_sizes():
    x = torch.rand(2, 3, 7, 10) * 0.3 + 0.5
    assert torch.allclose(denormalise_patches(normalise_patches(x, 4), x, 4), x, atol=1e-5)


class Masking(nn.Module):
    """Predicts 3.0 everywhere and records the mask it was told."""

    def forward(self, x, mask=None):
        self.mask = mask
        return torch.full_like(x, 3.0)


@pytest.mark.parametrize("norm_targets", [False, True])
def test_masked_examples_show_the_seen_pixels_and_the_prediction_in_the_hidden_ones(norm_targets):
    x = torch.rand(2, 3, 16, 16)
    obj = make_objective(ObjectiveConfig("masked", mask_ratio=0.5, patch_size=4, norm_targets=norm_targets))
    model = Masking()
    rows = obj.examples(model, x, torch.Generator().manual_seed(1))
    inp, mask = obj.corrupt(x, torch.Generator().manual_seed(1))
    assert torch.equal(model.mask, mask)  # the network is told what is hidden, as in training
    assert list(rows)[0] == "masked input" and list(rows)[1].startswith("hidden patches predicted")
    assert ("true mean" in list(rows)[1]) == norm_targets  # the figure says what is not the network's
    assert torch.equal(rows["masked input"], inp)
    shown = list(rows.values())[1]
    assert torch.equal(shown * (1 - mask), x * (1 - mask))  # seen pixels are the image's own
    expected = denormalise_patches(torch.full_like(x, 3.0), x, 4) if norm_targets else torch.full_like(x, 3.0)
    assert torch.allclose(shown * mask, expected * mask)  # hidden ones the prediction, in pixels


def test_denoise_and_reconstruct_examples_name_their_rows():
    ae = AutoEncoder(ModelConfig(channels=(8,), latent_dim=8, height=8, width=8))
    x = torch.rand(2, 3, 8, 8)
    noisy = make_objective(ObjectiveConfig("denoise", noise_std=0.5)).examples(ae, x, torch.Generator().manual_seed(0))
    assert list(noisy) == ["corrupted input", "reconstruction"] and not torch.allclose(noisy["corrupted input"], x)
    plain = make_objective(ObjectiveConfig("reconstruct")).examples(ae, x)
    assert list(plain) == ["reconstruction"] and torch.equal(plain["reconstruction"], ae(x))


def test_denoise_targets_the_clean_image():
    x = torch.rand(3, 1, 8, 8)
    obj = make_objective(ObjectiveConfig("denoise", noise_std=0.5, drop_prob=0.5))
    noisy, weight = obj.corrupt(x, torch.Generator().manual_seed(0))
    assert weight is None and not torch.allclose(noisy, x)
    assert (noisy == 0).float().mean() > 0.3  # about half the pixels dropped
    assert obj.loss(Echo(x), x, torch.Generator().manual_seed(0)) == 0  # a perfect denoiser has zero loss


def test_winner_take_all_keeps_exactly_k_winners_per_image_and_the_lifetime_top():
    torch.manual_seed(0)
    z = torch.rand(20, 32) + 0.1  # positive, distinct
    kept = winner_take_all(z, 5, 0.0)
    assert ((kept != 0).sum(1) == 5).all()
    assert torch.equal(kept.topk(5, 1).values, z.topk(5, 1).values)  # the largest five survive
    life = winner_take_all(z, 0, 0.1)
    assert ((life != 0).sum(0) == 2).all()  # ceil(0.1 * 20) images per unit
    assert torch.equal(life.max(0).values, z.max(0).values)
    both = winner_take_all(z, 5, 0.1)
    assert ((both != 0).sum(0) <= 2).all() and ((both != 0).sum(1) <= 5).all()


@pytest.mark.parametrize("name", [o for o in OBJECTIVES if o != "patches"])  # patches: tests/test_patchnet.py
@pytest.mark.parametrize(
    "shape, upsample",
    [((1, 28, 28), "nearest"), ((3, 32, 32), "bilinear"), ((3, 32, 32), "unpool"), ((1, 28, 28), "transposed")],
)
def test_every_objective_trains_every_shape_and_upsample(name, shape, upsample):
    torch.manual_seed(0)
    c, h, w = shape
    ae = AutoEncoder(
        ModelConfig(
            in_channels=c,
            height=h,
            width=w,
            channels=(8, 16),
            latent_dim=32,
            upsample=upsample,
            norm="batch",
            output_activation="none",
        )
    )
    obj = make_objective(ObjectiveConfig(name, sparse_k=8, lifetime_rate=0.5, drop_prob=0.2))  # 4 of 8 images per unit
    x = torch.rand(8, c, h, w)
    opt = torch.optim.Adam(ae.parameters(), 3e-3)
    losses = []
    for step in range(15):
        loss = obj.loss(ae, x, torch.Generator().manual_seed(step % 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and min(losses[-5:]) < losses[0]
