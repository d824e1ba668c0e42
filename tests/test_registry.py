"""The seams: every registered architecture with every objective that trains it, at two image formats,
through a training step, transfer, probes and every way out of convae (checkpoint, hub folder,
safetensors, ONNX, torch.export); and an architecture registered here, in the test, trained and
exported through the command line, which proves no other module needs editing to add one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convae
from conftest import make_image_folder
from convae.cli import main
from convae.commands.export import export
from convae.config import build_config
from convae.evaluation.probes import extract_features, linear_probe_accuracy
from convae.models import AutoEncoder, Classifier, ModelConfig, count_parameters, model_size
from convae.models.objectives import OBJECTIVES, make_objective
from convae.models.registry import (
    ARCHITECTURES,
    Architecture,
    EncoderBase,
    register_architecture,
    unregister_architecture,
)
from convae.outputs.checkpoint import load_checkpoint, save_checkpoint
from convae.training.loop import classification_criterion, make_optimizer, train_step
from convae.utils.errors import ConvaeError
from convae.utils.records import Batch

SMALL = {
    "stages": {"channels": [8, 16], "latent_dim": 24, "output_activation": "none"},
    "patch": {"channels": [12], "kernel_size": 5},
    "blocks": {"channels": [8, 16], "output_activation": "none"},
}
FORMATS = [(1, 28, 28), (3, 32, 32)]


def trains(arch: str, objective: str) -> bool:
    a, o = ARCHITECTURES[arch], OBJECTIVES[objective]
    return (a.objectives is None or objective in a.objectives) and (o.archs is None or arch in o.archs)


PAIRS = [(a, o) for a in SMALL for o in OBJECTIVES if trains(a, o)]


def config(arch: str, objective: str, fmt: tuple[int, int, int]):
    c, h, w = fmt
    return build_config(
        "seed",
        None,
        {
            "arch": arch,
            "objective": objective,
            "in_channels": c,
            "height": h,
            "width": w,
            "sparse_k": 4,
            "lifetime_rate": 0.5,
            **SMALL[arch],
        },
    )


def test_every_architecture_is_covered_and_every_objective_trains_one():
    assert set(SMALL) == set(ARCHITECTURES)
    assert {o for _, o in PAIRS} == set(OBJECTIVES)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: "x".join(map(str, f)))
@pytest.mark.parametrize("arch, objective", PAIRS)
def test_a_step_of_every_objective_transfers_and_probes(arch, objective, fmt):
    torch.manual_seed(0)
    cfg = config(arch, objective, fmt)
    ae = AutoEncoder(cfg.model_config(num_classes=3))
    x = torch.rand(8, *fmt)
    assert ae(x).shape == x.shape
    before = {k: v.clone() for k, v in ae.state_dict().items()}
    loss = train_step(
        ae,
        Batch(x),
        make_optimizer(ae.parameters(), "adam", 1e-2),
        make_objective(cfg.objective_config()),
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.isfinite(loss) and loss > 0
    assert any(not torch.equal(before[k], v) for k, v in ae.state_dict().items())  # the step changed weights
    clf = Classifier.from_autoencoder(ae, 3)
    torch.testing.assert_close(clf.encoder.kernels(), ae.encoder.kernels())  # transfer copies the encoder
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    train_step(clf, Batch(x, y), make_optimizer(clf.parameters(), "adam", 1e-2), classification_criterion)
    feats = extract_features(clf.encoder, (x * 255).to(torch.uint8), features="pooled")
    assert feats.shape[0] == 8 and torch.isfinite(feats).all()
    assert 0 <= linear_probe_accuracy(feats, y, feats, y, 3) <= 1


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: "x".join(map(str, f)))
@pytest.mark.parametrize("arch", list(SMALL))
def test_every_part_round_trips_through_every_format(arch, fmt, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    torch.manual_seed(0)
    objective = next(o for a, o in PAIRS if a == arch)
    ae = AutoEncoder(config(arch, objective, fmt).model_config(num_classes=3))
    with torch.no_grad():  # non-trivial buffers (the patch network's whitening) travel too
        for b in ae.buffers():
            if b.is_floating_point():
                b.add_(0.01 * torch.rand_like(b))
    clf = Classifier.from_autoencoder(ae, 3).eval()
    save_checkpoint(tmp_path / "classifier.pt", clf, "classifier", ["a", "b", "c"])
    save_checkpoint(tmp_path / "autoencoder.pt", ae, "autoencoder", ["a", "b", "c"])
    x = torch.rand(5, *fmt)
    for part, module in (("encoder", clf.encoder), ("classifier", clf), ("autoencoder", ae)):
        with torch.no_grad():
            expected = module.eval()(x)
        ckpt = tmp_path / ("autoencoder.pt" if part == "autoencoder" else "classifier.pt")
        loaded, _ = load_checkpoint(ckpt)
        got = {"checkpoint": (loaded.encoder if part == "encoder" else loaded).eval()(x)}
        got["hub"] = convae.from_pretrained(convae.save_pretrained(module, tmp_path / f"hub_{part}"))(x)
        for fmt_name in ("safetensors", "onnx", "pt2"):
            out = export(ckpt, fmt_name, part, tmp_path / f"{part}.{fmt_name}")
            if fmt_name == "safetensors":
                got[fmt_name] = convae.load(out)(x)
            elif fmt_name == "onnx":
                sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
                got[fmt_name] = torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])
            else:
                got[fmt_name] = torch.export.load(str(out)).module()(x)
        for how, y in got.items():
            torch.testing.assert_close(y.detach(), expected, atol=1e-4, rtol=1e-4, msg=f"{part} through {how}")
    assert type(convae.from_pretrained(tmp_path / "hub_encoder")) is type(clf.encoder)


@pytest.mark.parametrize("arch", list(SMALL))
def test_sizes_come_from_the_real_modules(arch):
    cfg = config(arch, next(o for a, o in PAIRS if a == arch), (3, 32, 32)).model_config(num_classes=7)
    params, activations = model_size(cfg)
    ae, clf = AutoEncoder(cfg), Classifier(cfg)
    assert params == count_parameters(ae) + count_parameters(clf.head)
    assert activations > cfg.in_channels * cfg.height * cfg.width  # at least the reconstruction itself
    # a huge input is sized on the meta device, without allocating it
    big = replace(cfg, height=20_000, width=20_000)
    assert model_size(big)[1] > 100 * activations


def test_a_head_too_large_for_memory_is_refused_before_anything_is_allocated():
    with pytest.raises(ConvaeError, match="1000000 classes\\) needs at least"):  # within the class bound
        convae.config.validation.validate_model(ModelConfig(num_classes=10**6, latent_dim=2**16))
    with pytest.raises(ConvaeError, match="num_classes must be an integer in \\[1, 1000000\\]"):
        convae.config.validation.validate_model(ModelConfig(num_classes=10**10))


# ----------------------------------------------------------------------------- a toy architecture


class ToyEncoder(EncoderBase):
    """One stride-2 conv, features averaged over the map."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.conv = nn.Conv2d(cfg.in_channels, cfg.channels[0], 3, stride=2, padding=1)

    def code(self, x: torch.Tensor):
        return F.relu(self.conv(x)), x.shape[-2:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.code(x)[0].mean((2, 3))

    def kernels(self) -> torch.Tensor:
        return self.conv.weight.detach().clone()


class ToyDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cfg.channels[0], cfg.in_channels, 3, padding=1)

    def forward(self, h: torch.Tensor, size) -> torch.Tensor:
        return torch.sigmoid(self.conv(F.interpolate(h, size=tuple(size), mode="nearest")))


def _toy_rules(cfg: ModelConfig, where: str) -> None:
    if len(cfg.channels) != 1:
        raise ConvaeError(f"{where}the toy architecture has one layer")


@pytest.fixture
def toy():
    register_architecture(
        Architecture(
            "toy",
            ToyEncoder,
            ToyDecoder,
            feature_dim=lambda cfg: cfg.channels[0],
            check=_toy_rules,
            presets={"toy": {"arch": "toy", "channels": [6]}},
        )
    )
    yield
    unregister_architecture("toy")


def test_a_registered_architecture_runs_end_to_end_through_the_cli(toy, tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=8)
    out = tmp_path / "run"
    args = [
        "run",
        "--preset",
        "toy",
        "--data",
        str(data),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
        "--height",
        "16",
        "--width",
        "16",
        "--pretrain-epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--batch-size",
        "8",
        "--objective",
        "denoise",
    ]
    assert main(args) == 0, capsys.readouterr().err
    assert (out / "report.html").is_file() and (out / "figures" / "kernels_pretrained.png").is_file()
    assert "6 kernels of 3×3 RGB" in (out / "report.html").read_text()
    clf = convae.load(out / "checkpoints" / "classifier.pt")
    assert type(clf.encoder) is ToyEncoder and clf.head.in_features == 6
    onnx = tmp_path / "toy.onnx"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(out / "checkpoints" / "classifier.pt"),
                "--format",
                "safetensors",
                "--part",
                "encoder",
                "--out",
                str(onnx.with_suffix(".safetensors")),
            ]
        )
        == 0
    )
    assert type(convae.load(onnx.with_suffix(".safetensors"))) is ToyEncoder
    assert type(convae.build("encoder", arch="toy", channels=[5])) is ToyEncoder  # the API asks the same registry
    assert (
        main(["run", "--arch", "toy", "--channels", "4", "8", "--data", str(data), "--out", str(tmp_path / "r2")]) == 2
    )
    assert "the toy architecture has one layer" in capsys.readouterr().err


def test_an_unregistered_architecture_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--arch", "toy", "--out", str(tmp_path / "r")])
    assert exit_.value.code == 2 and "invalid choice: 'toy'" in capsys.readouterr().err
    with pytest.raises(ConvaeError, match="arch must be one of stages, patch"):
        build_config("seed", None, {"arch": "toy"})


# ----------------------------------------------------------------------------- an architecture with a knob of its own

TOY_WITH_A_KNOB = '''
"""A toy architecture with a knob of its own: one stride-2 conv whose features are scaled by --gain."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.knobs import Num, knob
from .registry import Architecture, EncoderBase, register_architecture


@dataclass(frozen=True)
class GainedKnobs:
    gain: float = knob(1.0, Num(0), "gained: the features' scale (default 1)", group="model", metavar="G")


class GainedEncoder(EncoderBase):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.config = cfg
        self.conv = nn.Conv2d(cfg.in_channels, cfg.channels[0], 3, stride=2, padding=1)

    def code(self, x: torch.Tensor):
        return F.relu(self.conv(x)), x.shape[-2:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.config.gain * self.code(x)[0].mean((2, 3))

    def kernels(self) -> torch.Tensor:
        return self.conv.weight.detach().clone()


class GainedDecoder(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cfg.channels[0], cfg.in_channels, 3, padding=1)

    def forward(self, h: torch.Tensor, size) -> torch.Tensor:
        return torch.sigmoid(self.conv(F.interpolate(h, size=tuple(size), mode="nearest")))


register_architecture(
    Architecture("gained", GainedEncoder, GainedDecoder, feature_dim=lambda cfg: cfg.channels[0], knobs=GainedKnobs)
)
'''


def test_an_architecture_with_a_knob_of_its_own_is_its_module_and_its_name_in_one_list(tmp_path):
    """The package copied, the toy's module added and imported in ``models/model_config.py``, nothing else:
    its flag, its saved config, its checkpoint, the sweep and the other architectures' refusal follow."""
    pkg = tmp_path / "pkg"
    shutil.copytree(Path(convae.__file__).parent, pkg / "convae", ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "convae" / "models" / "gained.py").write_text(TOY_WITH_A_KNOB)
    registry = pkg / "convae" / "models" / "model_config.py"
    text = registry.read_text()
    names = 'ARCHITECTURE_MODULES = ("stages", "patch", "blocks")'
    assert names in text
    registry.write_text(text.replace(names, 'ARCHITECTURE_MODULES = ("stages", "patch", "blocks", "gained")'))
    data = make_image_folder(tmp_path / "data", classes=2, per_class=8)
    env = {**os.environ, "PYTHONPATH": str(pkg), "OMP_NUM_THREADS": "1"}
    common = ["--data", str(data), "--cache-dir", str(tmp_path / "cache"), "--height", "16", "--width", "16"]

    def convae_cmd(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "convae", *args], env=env, capture_output=True, text=True)

    toy = ["--arch", "gained", "--channels", "6", "--gain", "2.5"]
    done = convae_cmd(
        "run", *toy, *common, "--pretrain-epochs", "1", "--finetune-epochs", "1", "--out", str(tmp_path / "run")
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["gain"] == 2.5
    probe = "import sys, convae; m = convae.load(sys.argv[1]); print(type(m.encoder).__name__, m.config.gain)"
    shown = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "run" / "checkpoints" / "classifier.pt")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert shown.stdout.split() == ["GainedEncoder", "2.5"], shown.stderr
    swept = convae_cmd(
        "sweep",
        *toy,
        *common,
        "--pretrain-epochs",
        "1",
        "--labels-per-class",
        "2",
        "--seeds",
        "1",
        "--steps",
        "2",
        "--methods",
        "finetune",
        "scratch",
        "--out",
        str(tmp_path / "sweep"),
    )
    assert swept.returncode == 0, swept.stderr
    cells = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["cells"]
    assert {c["method"] for c in cells} == {"finetune", "scratch"}
    refused = convae_cmd("run", "--gain", "2", *common, "--out", str(tmp_path / "stages"))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "convae: error: --gain is a setting of --arch gained, and this run's architecture is stages (leave --gain out)"
    ]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--kernel-size", "5"], "--kernel-size is a setting of --arch patch, and this run's architecture is stages"),
        (["--whiten"], "--whiten is a setting of --arch patch, and this run's architecture is stages (--no-whiten"),
        (["--preset", "blocks", "--arch", "stages"], "--skips is a setting of --arch blocks, and this run's"),
        (["--preset", "blocks", "--objective", "reconstruct"], "--skips feeds the decoder every block's map"),
    ],
)
def test_a_knob_read_by_no_architecture_of_the_run_is_refused_in_one_line(flags, message, tmp_path, capsys):
    assert main(["run", *flags, "--data", str(tmp_path / "none"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
