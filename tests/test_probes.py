import torch

from convae.evaluation.probes import extract_features, knn_predict, linear_probe_accuracy
from convae.models import Encoder, ModelConfig


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


def _probe_data(n_train=60, n_test=45):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n_train + n_test, 3, 16, 16), dtype=torch.uint8, generator=g)
    labels = (images[:, 0].float().mean((1, 2)) > 127).long()  # a class the pixels tell
    enc = Encoder(ModelConfig(channels=(8, 16), latent_dim=12, height=16, width=16)).eval()
    return enc, images[:n_train], labels[:n_train], images[n_train:], labels[n_train:]


def test_representation_scores_stream_the_queries_and_match_the_whole_set_probes():
    """The test features are scored chunk by chunk; the accuracies are the whole-set probes'."""
    from convae.evaluation import probes

    enc, xtr, ytr, xte, yte = _probe_data()
    rep = probes.representation_scores(enc, xtr, ytr, xte, yte, 2, seed=3, batch_size=7)  # 7 query chunks
    ftr, fte = extract_features(enc, xtr), extract_features(enc, xte)
    assert abs(rep["knn_accuracy"] - probes.knn_accuracy(ftr, ytr, fte, yte, 2)) < 1e-6
    assert abs(rep["linear_probe_accuracy"] - linear_probe_accuracy(ftr, ytr, fte, yte, 2, seed=3)) < 1e-6
    assert rep["train_images"] == 60 and rep["test_images"] == 45 and "bank_sample" not in rep


def test_a_bank_over_the_limit_is_a_seeded_sample_of_it():
    from convae.evaluation.probes import bank_sample, representation_scores

    enc, xtr, ytr, xte, yte = _probe_data()
    pick = bank_sample(60, 25, seed=3)
    assert pick is not None and len(pick) == 25 and pick.unique().numel() == 25
    assert torch.equal(pick, pick.sort().values) and torch.equal(pick, bank_sample(60, 25, seed=3))
    assert not torch.equal(pick, bank_sample(60, 25, seed=4))
    assert bank_sample(60, 60, 3) is None and bank_sample(60, 0, 3) is None  # all fit; 0 = no limit
    capped = representation_scores(enc, xtr, ytr, xte, yte, 2, seed=3, max_bank=25)
    on_sample = representation_scores(enc, xtr[pick], ytr[pick], xte, yte, 2, seed=3)
    assert capped["train_images"] == 25 and "25" in capped["bank_sample"]
    assert capped["knn_accuracy"] == on_sample["knn_accuracy"]
    assert capped["linear_probe_accuracy"] == on_sample["linear_probe_accuracy"]
