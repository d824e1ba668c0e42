import csv

import numpy as np
import torch

import convae
from convae.cli import main


def test_encode_writes_embeddings_sources_and_a_map(image_folder, cache_dir, tmp_path, capsys, monkeypatch):
    run = tmp_path / "pre"
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(image_folder),
                "--cache-dir",
                str(cache_dir),
                "--out",
                str(run),
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
                "8",
                "--pretrain-epochs",
                "1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = tmp_path / "emb" / "feats.npy"
    ckpt = run / "checkpoints" / "autoencoder.pt"
    assert (
        main(
            [
                "encode",
                "--checkpoint",
                str(ckpt),
                "--data",
                str(image_folder),
                "--cache-dir",
                str(cache_dir),
                "--out",
                str(out),
                "--val-fraction",
                "0.2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    feats = np.load(out)
    assert feats.shape == (30, 32) and feats.dtype == np.float32
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert [r["index"] for r in rows] == [str(i) for i in range(30)]
    assert rows[0]["file"] == "class_0/img_0_000.png" and rows[0]["class"] == "class_0"
    assert sum(r["split"] == "val" for r in rows) == 6
    # the training source spelled relative to here (it was trained with its absolute path): the same split
    monkeypatch.chdir(image_folder.parent)
    again = tmp_path / "emb" / "relative.npy"
    args = ["encode", "--checkpoint", str(ckpt), "--data", image_folder.name, "--cache-dir", str(cache_dir)]
    assert main([*args, "--out", str(again), "--val-fraction", "0.2", "--device", "cpu", "--no-map"]) == 0
    assert [r["split"] for r in csv.DictReader(open(again.with_suffix(".csv")))] == [r["split"] for r in rows]
    the_map = tmp_path / "emb" / "feats_map.png"  # named after the output: a second encode never overwrites it
    assert the_map.is_file()
    before = the_map.read_bytes()
    # the same numbers as the API on the same images
    model = convae.load(ckpt)
    from convae.data import load_source

    ds = load_source(str(image_folder), 3, 16, 16, cache_dir, log=lambda m: None)
    np.testing.assert_allclose(feats, convae.encode(model, ds.images).numpy(), rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    assert (
        main(
            [
                "encode",
                "--checkpoint",
                str(ckpt),
                "--data",
                str(image_folder),
                "--cache-dir",
                str(cache_dir),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "already exists" in capsys.readouterr().err
    # pooled features: every stage averaged to 2x2 and concatenated, 4 * (8 + 16) per image
    pooled = tmp_path / "emb" / "pooled.npy"
    assert (
        main(
            [
                "encode",
                "--checkpoint",
                str(ckpt),
                "--data",
                str(image_folder),
                "--cache-dir",
                str(cache_dir),
                "--out",
                str(pooled),
                "--probe-features",
                "pooled",
                "--no-map",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    with torch.no_grad():
        expected = model.encoder.forward_pooled(ds.images.float() / 255)
    assert np.load(pooled).shape == (30, 96)
    np.testing.assert_allclose(np.load(pooled), expected.numpy(), rtol=1e-5, atol=1e-6)
    assert the_map.read_bytes() == before
    # a source the checkpoint was not trained on: no train/val split is claimed for its rows
    from conftest import make_image_folder

    other = make_image_folder(tmp_path / "other", classes=2, per_class=5, seed=3)
    test_out = tmp_path / "emb" / "other.npy"
    assert (
        main(
            [
                "encode",
                "--checkpoint",
                str(ckpt),
                "--data",
                str(other),
                "--cache-dir",
                str(cache_dir),
                "--out",
                str(test_out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert {r["split"] for r in csv.DictReader(open(test_out.with_suffix(".csv")))} == {""}
    assert (tmp_path / "emb" / "other_map.png").is_file() and the_map.read_bytes() == before


def test_evaluate_an_autoencoder_with_a_bank(image_folder, cache_dir, tmp_path, capsys):
    run = tmp_path / "pre"
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(image_folder),
                "--cache-dir",
                str(cache_dir),
                "--out",
                str(run),
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
                "8",
                "--pretrain-epochs",
                "1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    ckpt = str(run / "checkpoints" / "autoencoder.pt")
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", ckpt, "--data", str(image_folder), "--cache-dir", str(cache_dir)]) == 2
    assert "needs labelled training images" in capsys.readouterr().err
    out = tmp_path / "ev"
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                ckpt,
                "--data",
                str(image_folder),
                "--train-data",
                str(image_folder),
                "--cache-dir",
                str(cache_dir),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    import json

    rep = json.loads((out / "results.json").read_text())["representation"]
    assert rep["train_images"] == 30 and rep["knn"]["k"] == 30
    # the bank contains the queries themselves: kNN on separable colours is perfect
    assert rep["knn_accuracy"] == 1.0
    assert set(rep["random"]) == {"knn_accuracy", "linear_probe_accuracy"}  # the random-weights baseline
    assert all(0 <= v <= 1 for v in rep["random"].values()) and rep["features"] == "latent"
    assert 'id="representation"' in (out / "report.html").read_text()
    printed = capsys.readouterr().out
    assert "frozen encoder (latent features): kNN 100.00%" in printed and "random weights: kNN" in printed


def test_encode_that_cannot_write_its_table_takes_its_features_back_so_a_retry_works(
    image_folder, cache_dir, tmp_path, capsys, monkeypatch
):
    """A full disk while the CSV is written: one line, no .npy left behind to refuse the retry."""
    import convae.commands.encode as encode
    from convae.utils.errors import ConvaeError

    ckpt = tmp_path / "ae.pt"
    ae = convae.build("autoencoder", height=16, width=16, channels=[8, 16], latent_dim=16)
    from convae.outputs.checkpoint import save_checkpoint

    save_checkpoint(ckpt, ae, "autoencoder", [])
    out = tmp_path / "emb.npy"
    args = ["encode", "--checkpoint", str(ckpt), "--data", str(image_folder), "--cache-dir", str(cache_dir)]
    args += ["--out", str(out), "--no-map", "--device", "cpu"]

    def full_disk(path, text, exclusive=False):
        raise ConvaeError(f"could not write {path}: No space left on device")

    real = encode.atomic_write_text
    monkeypatch.setattr(encode, "atomic_write_text", full_disk)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0]
    assert not out.exists() and not out.with_suffix(".csv").exists()
    monkeypatch.setattr(encode, "atomic_write_text", real)
    assert main(args) == 0
    assert np.load(out).shape[0] == len(list(csv.DictReader(open(out.with_suffix(".csv")))))
