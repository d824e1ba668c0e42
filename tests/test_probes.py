import torch

from convae.models import Encoder, ModelConfig
from convae.probes import extract_features, knn_predict, linear_probe_accuracy


def test_knn_votes_by_weighted_nearest_neighbours():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    queries = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert knn_predict(bank, labels, queries, 2, k=2).tolist() == [0, 1]
    # with k covering the whole bank, the temperature makes the close neighbours win anyway
    assert knn_predict(bank, labels, queries, 2, k=5, temperature=0.01).tolist() == [0, 1]
    # scale does not matter: cosine similarity
    assert knn_predict(bank * 7, labels, queries * 0.1, 2, k=2).tolist() == [0, 1]


def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    acc = linear_probe_accuracy(x[:150], y[:150], x[150:], y[150:], 2, seed=0)
    assert acc > 0.9
    assert acc == linear_probe_accuracy(x[:150], y[:150], x[150:], y[150:], 2, seed=0)


def test_features_are_extracted_in_eval_mode_and_batched():
    enc = Encoder(ModelConfig(channels=(8, 16), latent_dim=12, height=16, width=16))
    enc.train()
    images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    f = extract_features(enc, images, batch_size=3)
    assert f.shape == (10, 12) and enc.training
    with torch.no_grad():
        torch.testing.assert_close(f, enc(images.float() / 255))
