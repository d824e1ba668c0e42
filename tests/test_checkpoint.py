import pickle

import pytest
import torch

from convae.models import AutoEncoder, Classifier, ModelConfig
from convae.outputs.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from convae.utils.errors import ConvaeError

SMALL = ModelConfig(channels=(8, 16, 16), latent_dim=32, num_classes=4)


def test_round_trip_with_weights_only(tmp_path):
    clf = Classifier(SMALL)
    path = tmp_path / "clf.pt"
    save_checkpoint(path, clf, "classifier", classes=["a", "b", "c", "d"], run_config={"seed": 0})
    raw = torch.load(path, weights_only=True)
    assert set(raw) >= {"model", "config", "kind", "classes"}
    again, payload = load_checkpoint(path, kind="classifier")
    assert again.config == SMALL and payload["classes"] == ["a", "b", "c", "d"]
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(again(x), clf(x))


def test_wrong_kind_is_refused(tmp_path):
    save_checkpoint(tmp_path / "ae.pt", AutoEncoder(SMALL), "autoencoder")
    with pytest.raises(ConvaeError, match="holds an autoencoder; this command needs a classifier"):
        load_checkpoint(tmp_path / "ae.pt", kind="classifier")


def test_mismatched_architecture_names_the_tensors(tmp_path):
    path = tmp_path / "ae.pt"
    save_checkpoint(path, AutoEncoder(SMALL), "autoencoder")
    raw = torch.load(path, weights_only=True)
    raw["config"]["latent_dim"] = 64  # config no longer matches the weights
    torch.save(raw, path)
    with pytest.raises(ConvaeError, match=r"does not match.*encoder\.fc\.0\.weight \(32, 256\) vs model \(64, 256\)"):
        load_checkpoint(path)


class Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_pickled_code_is_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("evil.pt", "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(ConvaeError, match="not a loadable convae checkpoint"):
        read_checkpoint("evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_foreign_and_missing_files(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ConvaeError, match="not a convae checkpoint"):
        read_checkpoint(tmp_path / "other.pt")
    with pytest.raises(ConvaeError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ConvaeError, match="not a loadable"):
        read_checkpoint(tmp_path / "junk.pt")


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A simulated full disk at the file write (test_hostile.py fills a real one)."""
    import convae.utils.files

    path = tmp_path / "ae.pt"
    save_checkpoint(path, AutoEncoder(SMALL), "autoencoder")
    before = path.read_bytes()

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convae.utils.files.os, "fsync", full_disk)
    with pytest.raises(ConvaeError, match="could not write .*ae.pt: No space left on device"):
        save_checkpoint(path, AutoEncoder(SMALL), "autoencoder")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ae.pt"]  # no temporary file left behind


def test_an_exported_file_given_as_a_checkpoint_says_what_it_is(tmp_path):
    for suffix, what in ((".onnx", "ONNX"), (".pt2", "torch.export"), (".safetensors", "safetensors")):
        path = tmp_path / f"model{suffix}"
        path.write_bytes(b"not a checkpoint")
        with pytest.raises(ConvaeError, match=f"is an exported model \\({what}") as info:
            load_checkpoint(path)
        assert "weights_only" not in str(info.value)
