"""Export to ONNX, TorchScript and safetensors, each reloaded outside the training code."""

import json
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

import convae
from convae.cli import main
from convae.models import AutoEncoder, Classifier, ModelConfig
from convae.outputs.checkpoint import save_checkpoint

SMALL = ModelConfig(channels=(8, 16, 16), latent_dim=32, num_classes=3)


@pytest.fixture
def checkpoints(tmp_path):
    torch.manual_seed(0)
    ae = AutoEncoder(SMALL)
    clf = Classifier.from_autoencoder(ae, 3)
    save_checkpoint(tmp_path / "ae.pt", ae, "autoencoder", ["a", "b", "c"])
    save_checkpoint(tmp_path / "clf.pt", clf, "classifier", ["a", "b", "c"])
    return {"autoencoder": (tmp_path / "ae.pt", ae), "classifier": (tmp_path / "clf.pt", clf)}


def _module(checkpoints, part):
    if part == "encoder":
        return checkpoints["classifier"][0], checkpoints["classifier"][1].encoder
    return checkpoints[part]


RUN_ONNX = textwrap.dedent("""
    import sys, numpy as np, onnxruntime as ort
    sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    x = np.load(sys.argv[2])
    np.save(sys.argv[3], sess.run(None, {"images": x})[0])
""")


@pytest.mark.parametrize("part", ["encoder", "classifier", "autoencoder"])
def test_onnx_matches_pytorch_in_onnxruntime(checkpoints, tmp_path, part, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    ckpt, module = _module(checkpoints, part)
    out = tmp_path / f"{part}.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--part", part, "--out", str(out)]) == 0
    said = capsys.readouterr().out.splitlines()  # what it is doing before the seconds of tracing, then the result
    assert said[0].startswith(f"exporting the {part} to onnx: tracing the model") and said[-1].startswith("wrote ")
    x = torch.rand(5, 3, 32, 32)  # another batch size than the export's example: the axis is dynamic
    np.save(tmp_path / "x.npy", x.numpy())
    subprocess.run(
        [sys.executable, "-c", RUN_ONNX, str(out), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")], check=True
    )
    with torch.no_grad():
        expected = module.eval()(x)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected.numpy(), atol=1e-4, rtol=1e-4)
    assert sorted(p.name for p in tmp_path.glob(f"{part}.onnx*")) == [f"{part}.onnx"]  # one file, no .data beside
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["classes"]) == ["a", "b", "c"] and meta["convae_part"] == part
    assert "values in [0, 1]" in meta["preprocessing"] and json.loads(meta["convae_config"])["latent_dim"] == 32


@pytest.mark.parametrize("part", ["encoder", "classifier", "autoencoder"])
def test_torch_export_pt2_reloads_without_convae(checkpoints, tmp_path, part):
    ckpt, module = _module(checkpoints, part)
    out = tmp_path / f"{part}.pt2"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "pt2", "--part", part, "--out", str(out)]) == 0
    code = textwrap.dedent("""
        import json, sys, torch
        extra = {"convae.json": ""}
        program = torch.export.load(sys.argv[1], extra_files=extra)
        torch.save(program.module()(torch.load(sys.argv[2])), sys.argv[3])
        print(json.loads(extra["convae.json"])["classes"])
    """)
    x = torch.rand(5, 3, 32, 32)  # another batch size than the export's example
    torch.save(x, tmp_path / "x.pt")
    done = subprocess.run(
        [sys.executable, "-c", code, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        check=True,
        capture_output=True,
        text=True,
    )
    assert done.stdout.strip() == "['a', 'b', 'c']"
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), module.eval()(x), atol=1e-5, rtol=1e-5)
    assert not list(tmp_path.glob(".tmp-*"))


def test_onnx_of_the_unpool_autoencoder(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    ae = AutoEncoder(ModelConfig(channels=(8, 16), latent_dim=16, upsample="unpool", height=28, width=28))
    save_checkpoint(tmp_path / "ae.pt", ae, "autoencoder")
    out = tmp_path / "ae.onnx"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(tmp_path / "ae.pt"),
                "--format",
                "onnx",
                "--part",
                "autoencoder",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    x = torch.rand(3, 3, 28, 28)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, ae.eval()(x).numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("part", ["encoder", "autoencoder"])
def test_onnx_of_the_whitened_patch_network(tmp_path, part):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    ae = AutoEncoder(ModelConfig(arch="patch", channels=(16,), kernel_size=5, whiten=True))
    ae.encoder.fit_whitening(torch.rand(40, 3, 32, 32), torch.Generator().manual_seed(0))
    save_checkpoint(tmp_path / "ae.pt", ae, "autoencoder")
    out = tmp_path / "patch.onnx"
    assert (
        main(["export", "--checkpoint", str(tmp_path / "ae.pt"), "--format", "onnx", "--part", part, "--out", str(out)])
        == 0
    )
    x = torch.rand(3, 3, 32, 32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    module = ae.encoder if part == "encoder" else ae
    with torch.no_grad():
        np.testing.assert_allclose(got, module.eval()(x).numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("part", ["encoder", "classifier", "autoencoder"])
def test_torchscript_reloads_with_torch_jit_load(checkpoints, tmp_path, part):
    ckpt, module = _module(checkpoints, part)
    out = tmp_path / f"{part}.ts"
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        code = main(["export", "--checkpoint", str(ckpt), "--format", "torchscript", "--part", part, "--out", str(out)])
    assert code == 0
    assert not [w for w in said if "torch.jit" in str(w.message)]  # torch's deprecation notes are not the user's
    loaded = torch.jit.load(str(out))
    x = torch.rand(7, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module.eval()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("part", ["encoder", "classifier", "autoencoder"])
def test_safetensors_reloads_through_the_api(checkpoints, tmp_path, part):
    pytest.importorskip("safetensors")
    ckpt, module = _module(checkpoints, part)
    out = tmp_path / f"{part}.safetensors"
    assert (
        main(["export", "--checkpoint", str(ckpt), "--format", "safetensors", "--part", part, "--out", str(out)]) == 0
    )
    fresh = convae.load(out)
    assert type(fresh) is type(module) and fresh.config == module.config and fresh.classes == ["a", "b", "c"]
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), module.eval()(x))


def test_export_mistakes(checkpoints, tmp_path, capsys):
    ae_ckpt = str(checkpoints["autoencoder"][0])
    assert (
        main(
            [
                "export",
                "--checkpoint",
                ae_ckpt,
                "--format",
                "torchscript",
                "--part",
                "classifier",
                "--out",
                str(tmp_path / "x.ts"),
            ]
        )
        == 2
    )
    assert "has no classifier part" in capsys.readouterr().err
    (tmp_path / "taken.ts").write_text("keep me")
    assert (
        main(["export", "--checkpoint", ae_ckpt, "--format", "torchscript", "--out", str(tmp_path / "taken.ts")]) == 2
    )
    assert "already exists" in capsys.readouterr().err and (tmp_path / "taken.ts").read_text() == "keep me"
