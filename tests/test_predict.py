import json

import numpy as np
import torch

import convae
from conftest import COLOURS, make_image
from convae.cli import main
from convae.commands.predict import predict
from convae.data import load_source


def _trained(tmp_path, image_folder):
    """A classifier trained through the CLI on the tiny coloured classes."""
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "--data",
                str(image_folder),
                "--cache-dir",
                str(tmp_path / "cache"),
                "--out",
                str(out),
                "--height",
                "16",
                "--width",
                "16",
                "--channels",
                "8",
                "16",
                "--latent-dim",
                "32",
                "--batch-size",
                "10",
                "--pretrain-epochs",
                "1",
                "--finetune-epochs",
                "15",
                "--lr",
                "3e-3",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    return out / "checkpoints" / "classifier.pt"


def test_predict_matches_the_training_preprocessing(tmp_path, image_folder, capsys):
    ckpt = _trained(tmp_path, image_folder)
    rows = predict(ckpt, [str(image_folder / "class_1")], device="cpu")
    assert len(rows) == 10 and all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)
    # the same images through the training data path give the same probabilities
    model = convae.load(ckpt)
    ds = load_source(str(image_folder), 3, 16, 16, tmp_path / "cache", log=lambda m: None)
    idx = [i for i, f in enumerate(ds.files) if f.startswith("class_1/")]
    with torch.no_grad():
        probs = torch.softmax(model(ds.images[idx].float() / 255), 1)
    got = torch.tensor([[r["probabilities"][c] for c in model.classes] for r in rows])
    torch.testing.assert_close(got, probs, atol=1e-5, rtol=1e-4)
    assert sum(r["class"] == "class_1" for r in rows) >= 8  # it learned the colours


def test_predict_cli_table_json_other_sizes_and_bad_files(tmp_path, image_folder, capsys):
    ckpt = _trained(tmp_path, image_folder)
    rng = np.random.default_rng(1)
    big = tmp_path / "big_red.jpg"
    make_image(rng, COLOURS[0], size=(64, 48)).save(big)  # another size: resized as in training
    grey = tmp_path / "grey.png"
    make_image(rng, COLOURS[2], size=(16, 16), mode="L").save(grey)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(ckpt), str(big), str(grey), str(bad), "--json", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [r["file"] for r in rows] == [str(big), str(grey)] and rows[0]["class"] == "class_0"
    assert "skipped" in captured.err and "bad.png" in captured.err
    assert main(["predict", "--checkpoint", str(ckpt), str(big), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("file") and "class_0" in table
    assert main(["predict", "--checkpoint", str(ckpt), str(bad)]) == 2
    assert "none of the given files" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "missing.png")]) == 2
