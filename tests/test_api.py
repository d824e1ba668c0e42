import doctest
import json
import re
from pathlib import Path

import pytest
import torch

import convae
import convae.api
from conftest import make_image_folder
from convae.utils.errors import ConvaeError


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
    common = dict(
        height=16,
        width=16,
        channels=[8, 16],
        latent_dim=32,
        batch_size=8,
        device="cpu",
        cache_dir=str(tmp_path / "cache"),
        val_fraction=0.2,
    )
    ae = convae.pretrain(str(data), pretrain_epochs=1, out=str(tmp_path / "pre"), **common)
    assert isinstance(ae, convae.AutoEncoder) and ae.config.height == 16
    clf = convae.finetune(
        str(data),
        checkpoint=tmp_path / "pre" / "checkpoints" / "autoencoder.pt",
        finetune_epochs=1,
        out=str(tmp_path / "ft"),
        **common,
    )
    assert isinstance(clf, convae.Classifier) and clf.classes == ["class_0", "class_1", "class_2"]
    assert (tmp_path / "ft" / "results.json").is_file()


def _common(tmp_path, **extra):
    return dict(
        height=16,
        width=16,
        channels=[8, 16],
        latent_dim=32,
        batch_size=8,
        device="cpu",
        cache_dir=str(tmp_path / "cache"),
        val_fraction=0.25,
        **extra,
    )


def _coloured(n_per_class: int, classes: int = 2, size: int = 16, seed: int = 0):
    """uint8 (N, 3, H, W) images, one dominant colour per class, and their labels."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[220, 40, 40], [40, 60, 230], [40, 200, 60]], dtype=torch.float32)[:classes]
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = colours[y][:, :, None, None] + 30 * torch.randn(len(y), 3, size, size, generator=g)
    return x.clamp(0, 255).to(torch.uint8), y


def test_training_from_tensors_with_a_model_object_progress_and_a_callback(tmp_path, capsys):
    x, y = _coloured(8)
    seen = []
    ae = convae.pretrain(x, pretrain_epochs=2, out=str(tmp_path / "pre"), on_epoch=seen.append, **_common(tmp_path))
    assert [r["epoch"] for r in seen] == [1, 2] and seen[0]["phase"] == "pretrain"
    assert "pretrain  epoch 2/2" in capsys.readouterr().out  # the CLI's progress, unless quiet
    assert ae.run_dir == tmp_path / "pre" and (ae.run_dir / "report.html").is_file()
    # the model pretrain returned is the checkpoint; channels-last float images with labels
    nhwc = (x.permute(0, 2, 3, 1).float() / 255).numpy()
    clf = convae.finetune(
        nhwc,
        checkpoint=ae,
        labels=y.numpy(),
        classes=["red", "blue"],
        finetune_epochs=1,
        out=str(tmp_path / "ft"),
        quiet=True,
        **_common(tmp_path),
    )
    assert capsys.readouterr().out == ""
    assert clf.classes == ["red", "blue"] and clf.run_dir == tmp_path / "ft"
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert results["num_images"] == 4 and "representation" in results
    for k, v in ae.encoder.state_dict().items():  # fine-tuning started from the object's weights
        assert torch.equal(
            torch.load(
                Path(json.loads((tmp_path / "ft" / "config.json").read_text())["init_checkpoint"]), weights_only=True
            )["model"]["encoder." + k],
            v,
        )
    said = []  # the object saved into the cache is said once, with where and how big
    again = [convae.api._checkpoint_path(ae, str(tmp_path / "other-cache"), said.append) for _ in range(2)]
    assert again[0] == again[1] and len(said) == 1 and again[0] in said[0] and "MiB" in said[0]
    pred = convae.predict(clf, x[:3])
    assert len(pred.classes) == 3 and pred.probabilities.shape == (3, 2)
    torch.testing.assert_close(pred.probabilities.sum(1), torch.ones(3))


def test_training_from_a_torchvision_dataset(tmp_path):
    from torchvision.datasets import FakeData

    ds = FakeData(size=16, image_size=(3, 20, 20), num_classes=2, random_offset=0)  # PIL images, int labels
    ae = convae.pretrain(ds, pretrain_epochs=1, out=str(tmp_path / "pre"), quiet=True, **_common(tmp_path))
    clf = convae.finetune(
        ds, checkpoint=ae, finetune_epochs=1, out=str(tmp_path / "ft"), quiet=True, **_common(tmp_path)
    )
    assert clf.config.height == 16 and len(clf.classes) == 2  # resized to the model, as a decoded source


def test_encode_converts_what_can_be_converted_and_refuses_the_rest():
    from PIL import Image

    ae = convae.build("autoencoder", channels=[8, 16], latent_dim=32)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    z = convae.encode(ae, x)
    torch.testing.assert_close(convae.encode(ae, x.permute(0, 2, 3, 1).numpy()), z)  # channels-last numpy
    pil = [Image.fromarray(x[i].permute(1, 2, 0).numpy()) for i in range(2)]
    torch.testing.assert_close(convae.encode(ae, pil), z)  # PIL images
    big = torch.nn.functional.interpolate(x.float(), size=64).to(torch.uint8)
    assert convae.encode(ae, big).shape == (2, 32)  # a 64x64 image on a 32x32 model: resized as in training
    assert convae.transform(ae)(pil[0]).shape == (1, 3, 32, 32)
    for bad, match in [
        ("images.png", "cannot read images from a str"),
        (torch.zeros(2, 5, 32, 32), "1 (grey) or 3 (RGB) channels"),
        (torch.full((1, 3, 32, 32), 2.0), "values in [0, 1]"),
        (torch.zeros(2, 3, 32, 32, 2), "must be (H, W), (C, H, W) or (N, C, H, W)"),
    ]:
        with pytest.raises(ConvaeError, match=re.escape(match)):
            convae.encode(ae, bad)


def test_save_pretrained_and_from_pretrained_and_torch_hub(tmp_path):
    clf = convae.build("classifier", num_classes=3, channels=[8, 16], latent_dim=32)
    clf.classes = ["cat", "dog", "eel"]
    folder = convae.save_pretrained(clf, tmp_path / "my-model")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    back = convae.from_pretrained(folder)
    assert type(back) is convae.Classifier and back.classes == clf.classes and not back.training
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(back(x), clf.eval()(x))
    # offline through torch.hub, from this repository's hubconf.py
    repo = Path(__file__).resolve().parents[1]
    hubbed = torch.hub.load(str(repo), "classifier", source="local", pretrained=str(folder), trust_repo=True)
    torch.testing.assert_close(hubbed(x), back(x))
    fresh = torch.hub.load(str(repo), "autoencoder", source="local", latent_dim=16, trust_repo=True)
    assert fresh.config.latent_dim == 16
    # the folder's config is untrusted, as a checkpoint's
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "latent_dim": -1}))
    with pytest.raises(ConvaeError, match="latent_dim must be an integer > 0"):
        convae.from_pretrained(folder)


def test_no_submodule_shadows_an_api_function():
    import importlib
    import pkgutil

    for info in pkgutil.walk_packages(convae.__path__, "convae."):
        if not info.name.endswith("__main__"):  # importing a submodule sets it as an attribute of the package
            importlib.import_module(info.name)
    for name in convae.__all__:
        assert not isinstance(getattr(convae, name), type(convae)), f"convae.{name} is shadowed by a module"


def test_messages_say_what_the_run_uses_and_a_prediction_prints_short(tmp_path, capsys):
    images = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(24) % 2
    small = dict(
        height=16, width=16, channels=[8, 16], latent_dim=16, batch_size=8, pretrain_epochs=1, finetune_epochs=1
    )
    convae.pretrain(images, labels=labels, out=str(tmp_path / "pre"), **small)
    out = capsys.readouterr().out
    assert "labelled for fine-tuning" not in out and "the labels are not used" in out
    clf = convae.finetune(
        images, labels=labels, init="scratch", labels_per_class=100, out=str(tmp_path / "ft"), **small
    )
    assert "a class has only" in capsys.readouterr().out  # 100 asked, fewer there: said, not silent
    text = repr(convae.predict(clf, images))
    assert text.startswith("Prediction(24 image(s)") and len(text) < 200


def test_every_size_from_an_argument_or_the_data_is_bounded_before_anything_is_allocated():
    """One line each, as their flags: a head of no classes, a batch of none, a label that would name a
    billion classes, an epoch of a trillion images (whose order would be drawn before its first step)."""
    from convae.config import build_config
    from convae.data.memory import image_set

    for n in (0, -1, 10**9):
        with pytest.raises(ConvaeError, match="num_classes must be an integer in"):
            convae.build(kind="classifier", num_classes=n)
    clf = convae.build(kind="classifier", num_classes=3)
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    for b in (0, -1):
        for call in (convae.encode, convae.predict):
            with pytest.raises(ConvaeError, match="batch_size must be an integer > 0"):
                call(clf, images, batch_size=b)
    with pytest.raises(ConvaeError, match="labels go up to 1000000000: convae trains at most"):
        image_set(images, labels=[0, 10**9])
    with pytest.raises(ConvaeError, match="epoch_images must be an integer in"):
        build_config("blocks", None, {"epoch_images": 10**12})


def test_the_api_converts_an_image_as_training_decodes_its_file(tmp_path):
    """16-bit grey, float grey and a palette image, each as a file (training's decoder) and as the PIL image
    a user holds (the API): the same pixels. A list of images of different sizes and modes is one batch."""
    import numpy as np
    from PIL import Image

    from convae.data.images import load_image

    clf = convae.build(kind="classifier", num_classes=3)
    rng = np.random.default_rng(0)
    images = {
        "deep.png": Image.fromarray(rng.integers(0, 65536, (20, 24), dtype=np.uint16)),  # mode I;16
        "float.tiff": Image.fromarray(np.full((32, 32), 0.5, dtype=np.float32)),  # mode F, [0, 1]
        "palette.png": Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).convert("P"),
    }
    to_model = convae.transform(clf)
    for name, im in images.items():
        im.save(tmp_path / name)
        trained, _, _ = load_image(tmp_path / name, 3, 32, 32)
        given = to_model(Image.open(tmp_path / name))
        assert torch.equal(given[0], trained), name
    assert to_model(images["float.tiff"])[0].unique().tolist() == [128]  # 0.5 of the range, not 0
    batch = [images["deep.png"], images["float.tiff"], Image.open(tmp_path / "palette.png")]
    assert to_model(batch).shape == (3, 3, 32, 32)
    assert convae.encode(clf, batch).shape[0] == 3 and len(convae.predict(clf, batch).indices) == 3
    with pytest.raises(ConvaeError, match="not finite"):
        to_model(Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32)))
