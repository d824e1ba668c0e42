"""Property-based tests: shapes for any supported size, splits for any labelling."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convae.data import split_indices
from convae.models import UPSAMPLE_MODES, AutoEncoder, ModelConfig


@settings(max_examples=40, deadline=None)
@given(
    channels=st.sampled_from([1, 3]),
    stages=st.integers(1, 4),
    data=st.data(),
    mode=st.sampled_from(UPSAMPLE_MODES),
)
def test_autoencoder_returns_the_input_shape(channels, stages, data, mode):
    smallest = 2**stages
    h = data.draw(st.integers(smallest, 40), label="height")
    w = data.draw(st.integers(smallest, 40), label="width")
    cfg = ModelConfig(in_channels=channels, height=h, width=w, channels=(4,) * stages, latent_dim=8, upsample=mode)
    x = torch.rand(2, channels, h, w)
    with torch.no_grad():
        assert AutoEncoder(cfg)(x).shape == x.shape


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    fraction=st.floats(0.05, 0.9),
    seed=st.integers(0, 2**31 - 1),
)
def test_split_is_stratified_disjoint_covering_and_deterministic(counts, fraction, seed):
    labels = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]
    train, val = split_indices(labels, len(labels), fraction, seed)
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(len(labels)))
    for k, c in enumerate(counts):
        in_val = int((labels[val] == k).sum())
        expected = round(c * fraction)
        if c >= 2:
            expected = min(max(expected, 1), c - 1)
        assert in_val == expected
    again = split_indices(labels, len(labels), fraction, seed)
    assert torch.equal(again[0], train) and torch.equal(again[1], val)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 500), fraction=st.floats(0.01, 0.99), seed=st.integers(0, 1000))
def test_unlabelled_split_keeps_both_sides(n, fraction, seed):
    train, val = split_indices(None, n, fraction, seed)
    assert len(train) >= 1 and len(val) >= 1 and len(train) + len(val) == n
    assert set(train.tolist()).isdisjoint(val.tolist())
