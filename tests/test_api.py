import doctest

import torch

import convae
import convae.api
from conftest import make_image_folder


def test_docstring_examples_run():
    result = doctest.testmod(convae.api, verbose=False)
    assert result.attempted >= 4 and result.failed == 0


def test_encode_takes_uint8_or_float_and_restores_mode():
    ae = convae.build("autoencoder", channels=[8, 16, 16], latent_dim=32)
    ae.train()
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    z8 = convae.encode(ae, x, batch_size=4)
    zf = convae.encode(ae.encoder, x.float() / 255)
    assert z8.shape == (6, 32) and ae.training
    torch.testing.assert_close(z8, zf)


def test_pretrain_and_finetune_from_code(tmp_path):
    data = make_image_folder(tmp_path / "d")
    common = dict(height=16, width=16, channels=[8, 16], latent_dim=32, batch_size=8, device="cpu",
                  cache_dir=str(tmp_path / "cache"), val_fraction=0.2)
    ae = convae.pretrain(str(data), pretrain_epochs=1, out=str(tmp_path / "pre"), **common)
    assert isinstance(ae, convae.AutoEncoder) and ae.config.height == 16
    clf = convae.finetune(str(data), checkpoint=tmp_path / "pre" / "checkpoints" / "autoencoder.pt",
                          finetune_epochs=1, out=str(tmp_path / "ft"), **common)
    assert isinstance(clf, convae.Classifier) and clf.classes == ["class_0", "class_1", "class_2"]
    assert (tmp_path / "ft" / "results.json").is_file()
