import pytest
import torch
from torch import nn

from convae.models import UPSAMPLE_MODES, AutoEncoder, Classifier, Encoder, ModelConfig, count_parameters
from convae.models.reference import Model as LectureClassifier
from convae.models.reference import autoencoder as LectureAutoencoder
from convae.models.stages import stage_sizes


def leaf_reprs(model: nn.Module) -> list[str]:
    return [repr(m) for m in model.modules() if not list(m.children())]


def test_seed_model_matches_the_lecture_layer_by_layer():
    ours, lecture = AutoEncoder(ModelConfig()), LectureAutoencoder()
    assert leaf_reprs(ours) == leaf_reprs(lecture)
    assert count_parameters(ours) == count_parameters(lecture) == 4_680_643


def test_seed_model_computes_the_lecture_function():
    ours, lecture = AutoEncoder(ModelConfig()), LectureAutoencoder()
    # same parameters in the same order -> same function
    lecture.load_state_dict(dict(zip(lecture.state_dict(), ours.state_dict().values())))
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(ours(x), lecture(x))


def test_seed_classifier_matches_the_lecture_classifier():
    clf, lecture = Classifier(ModelConfig()), LectureClassifier(LectureAutoencoder())
    assert leaf_reprs(clf) == leaf_reprs(lecture)
    assert leaf_reprs(clf)[-1] == "Linear(in_features=1024, out_features=10, bias=True)"
    assert count_parameters(clf) == count_parameters(lecture)


@pytest.mark.parametrize("mode", UPSAMPLE_MODES)
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (3, 64, 48), (3, 33, 17), (1, 8, 8)])
def test_decoder_returns_the_input_size(mode, shape):
    c, h, w = shape
    cfg = ModelConfig(in_channels=c, height=h, width=w, channels=(8, 16, 16), latent_dim=32, upsample=mode)
    ae = AutoEncoder(cfg)
    x = torch.rand(2, c, h, w)
    assert ae(x).shape == x.shape
    assert ae.encoder(x).shape == (2, 32)


def test_28_pixels_go_down_to_4_and_back():
    cfg = ModelConfig(in_channels=1, height=28, width=28)
    assert stage_sizes(cfg) == [(28, 28), (14, 14), (7, 7), (4, 4)]
    assert AutoEncoder(cfg)(torch.rand(1, 1, 28, 28)).shape == (1, 1, 28, 28)


def test_unpool_mode_uses_max_pool_encoder_and_unpool_decoder():
    ae = AutoEncoder(ModelConfig(upsample="unpool"))
    kinds = [type(m).__name__ for m in ae.modules()]
    assert kinds.count("MaxPool2d") == 3 and kinds.count("MaxUnpool2d") == 3


def test_transposed_mode_learns_its_upsampling():
    ae = AutoEncoder(ModelConfig(upsample="transposed"))
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in ae.modules()) == 3


def test_channels_last_gives_the_same_output():
    torch.manual_seed(0)
    ae = AutoEncoder(ModelConfig())
    x = torch.rand(2, 3, 32, 32)
    ref = ae(x)
    ae_cl = ae.to(memory_format=torch.channels_last)
    torch.testing.assert_close(ae_cl(x.contiguous(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-5)


def test_transfer_copies_the_encoder_and_leaves_the_autoencoder_alone():
    torch.manual_seed(0)
    ae = AutoEncoder(ModelConfig(channels=(8, 16, 16), latent_dim=32))
    clf = Classifier.from_autoencoder(ae, num_classes=5)
    for (k1, v1), (k2, v2) in zip(ae.encoder.state_dict().items(), clf.encoder.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(clf.forward_features(x), ae.forward_features(x))
    assert clf(x).shape == (3, 5)
    # fine-tuning the classifier must not move the autoencoder's weights
    with torch.no_grad():
        clf.encoder.first_conv.weight.add_(1.0)
    assert not torch.equal(clf.encoder.first_conv.weight, ae.encoder.first_conv.weight)


def test_reset_classifier_replaces_the_head_only():
    clf = Classifier(ModelConfig(channels=(8, 16, 16), latent_dim=32))
    enc = {k: v.clone() for k, v in clf.encoder.state_dict().items()}
    clf.reset_classifier(7)
    assert clf(torch.rand(2, 3, 32, 32)).shape == (2, 7) and clf.config.num_classes == 7
    assert all(torch.equal(enc[k], v) for k, v in clf.encoder.state_dict().items())


def test_pooled_features_average_every_stage_to_2x2():
    torch.manual_seed(0)
    enc = Encoder(ModelConfig(channels=(4, 8, 8), latent_dim=16))
    x = torch.rand(2, 3, 32, 32)
    stage1 = enc.conv[1](enc.conv[0](x))  # (2, 4, 16, 16)
    pooled = enc.forward_pooled(x)
    assert pooled.shape == (2, 4 * (4 + 8 + 8))
    # the first 16 features are stage 1's quadrant means, channel by channel
    quadrant = stage1[:, :, :8, :8].mean((2, 3))
    torch.testing.assert_close(pooled[:, 0:16:4], quadrant)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_norm_and_deeper_stages_keep_the_interface_and_transfer(norm):
    cfg = ModelConfig(channels=(8, 16, 16), latent_dim=32, norm=norm, convs_per_stage=2, output_activation="none")
    ae = AutoEncoder(cfg)
    x = torch.rand(3, 3, 32, 32)
    assert ae(x).shape == x.shape and ae.encoder(x).shape == (3, 32)
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in ae.encoder.conv)
    assert n_convs == 6 and all(m.bias is None for m in ae.encoder.conv if isinstance(m, torch.nn.Conv2d))
    clf = Classifier.from_autoencoder(ae, 5)
    assert all(torch.equal(a, b) for a, b in zip(clf.encoder.state_dict().values(), ae.encoder.state_dict().values()))
    assert (ae(x) < 0).any()  # no output ReLU: normalised targets are reachable
