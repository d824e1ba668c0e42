"""Joint (semi-supervised) training: the two streams, weight 0 as supervised training, the
Gamma-model's clean pass and batch-norm statistics, and the CLI and sweep end to end."""

import copy
import json

import pytest
import torch

from conftest import make_image_folder
from convae.cli import main
from convae.config.modes import TrainingMode, register_training_mode, unregister_training_mode
from convae.data import DeviceBatches
from convae.data.augment import AugmentConfig
from convae.models import AutoEncoder, Classifier, ModelConfig
from convae.models.objectives import ObjectiveConfig, make_objective
from convae.training.joint import JointLoss, JointModel, JointSpec, check_labels, cycling
from convae.training.loop import StepSettings, classification_loss, train_one_epoch
from convae.utils.errors import ConvaeError
from convae.utils.records import Batch

CFG = ModelConfig(arch="blocks", channels=(8, 16), height=16, width=16, num_classes=3)
BLOCKS = ["--arch", "blocks", "--channels", "8", "16", "--height", "16", "--width", "16", "--device", "cpu"]


def _ids(n, start=0):
    """Images whose every pixel is their id: a batch says which images it holds."""
    return torch.arange(start, start + n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 16, 16).contiguous()


def test_the_labelled_stream_cycles_and_the_unlabelled_one_is_seen_once_per_epoch():
    unlabelled = DeviceBatches(_ids(12), None, 4, shuffle=True, seed=0)  # 3 steps an epoch
    labelled_set = DeviceBatches(_ids(8, 100), torch.arange(8) % 3, 4, shuffle=True, seed=1)  # 2 batches a pass
    clf = Classifier(CFG)
    seen_u, seen_l = [], []

    def recording(model, batch, generator=None):
        seen_u.append(sorted(round(255 * v) for v in batch.x[:, 0, 0, 0].tolist()))
        seen_l.append([round(255 * v) for v in batch.labelled.x[:, 0, 0, 0].tolist()])
        return 0 * model(batch.x).sum()

    for epoch in (1, 2):
        unlabelled.set_epoch(epoch)
        train_one_epoch(
            clf,
            unlabelled,
            torch.optim.SGD(clf.parameters(), 0.0),
            recording,
            labelled=cycling(labelled_set, (epoch - 1) * len(unlabelled)),
        )
    for e in range(2):  # every unlabelled image once per epoch
        assert sorted(sum(seen_u[3 * e : 3 * e + 3], [])) == list(range(12))
    assert len(seen_l) == 6  # one labelled batch beside every step: 3 passes over the 8 labelled images
    for p in range(3):
        assert sorted(sum(seen_l[2 * p : 2 * p + 2], [])) == list(range(100, 108))
    assert seen_l[0:2] != seen_l[2:4]  # each pass in its own order


def test_the_labelled_stream_resumes_where_it_was():
    batches = DeviceBatches(_ids(10), torch.arange(10) % 3, 4, shuffle=True, seed=3)  # 3 batches a pass
    whole = cycling(batches, 0)
    first = [next(whole)[1].tolist() for _ in range(8)]
    tail = cycling(batches, 5)
    assert [next(tail)[1].tolist() for _ in range(3)] == first[5:8]


def _supervised_twin(weight_decay=0.0):
    torch.manual_seed(0)
    clf = Classifier(CFG).to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(16) % 3
    return clf, images, labels


@pytest.mark.parametrize("mode", ["plain", "gamma"])
def test_weight_zero_is_supervised_training_step_for_step(mode):
    """Joint training with the unsupervised weight 0 updates the classifier exactly as supervised
    training on the labelled batches does (same batches, augmentation and optimizer)."""
    clf, images, labels = _supervised_twin()
    twin = copy.deepcopy(clf)
    aug = AugmentConfig(crop_padding=2, flip=True)

    def labelled_batches():
        return DeviceBatches(images, labels, 8, shuffle=True, seed=5)

    sup = labelled_batches()
    sup.set_epoch(1)
    train_one_epoch(
        clf,
        sup,
        torch.optim.AdamW(clf.parameters(), 1e-2),
        classification_loss(0.1),
        StepSettings(augmentation=aug, seed=7),
    )

    joint = JointModel(
        twin, JointSpec(mode, weight=0.0, label_smoothing=0.1), make_objective(ObjectiveConfig(objective="masked"))
    )
    assert joint.ae is None and joint.combinator is None  # nothing else trains
    unlabelled = DeviceBatches(torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8), None, 8, True, 9)
    unlabelled.set_epoch(1)
    train_one_epoch(
        joint,
        unlabelled,
        torch.optim.AdamW(joint.parameters(), 1e-2),
        JointLoss(0.0),
        StepSettings(augmentation=aug, seed=7),
        labelled=cycling(labelled_batches(), 0),
    )
    for (k, a), b in zip(clf.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), k
    assert not torch.equal(clf.head.weight, _supervised_twin()[0].head.weight)  # and it did train


def _gamma(stop_grad, seed=0):
    torch.manual_seed(seed)
    clf = Classifier(CFG)
    return JointModel(clf, JointSpec("gamma", weight=1.0, noise=0.3, stop_grad=stop_grad))


@pytest.mark.parametrize("stop_grad", [True, False])
def test_the_gamma_models_clean_pass_gets_a_gradient_only_when_the_method_lets_it(stop_grad):
    model = _gamma(stop_grad)
    outputs = []
    model.clf.head.register_forward_hook(lambda m, i, out: outputs.append(out))
    x, lx, ly = torch.rand(8, 3, 16, 16), torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    ce, unsup = model(x, lx, ly, torch.Generator().manual_seed(0))
    assert len(outputs) == 3  # clean unlabelled, corrupted unlabelled, corrupted labelled
    clean = outputs[0]
    clean.retain_grad()
    unsup.backward()
    if stop_grad:
        assert clean.grad is None  # the target is a constant to the denoising cost
    else:
        assert clean.grad is not None and clean.grad.abs().sum() > 0
    assert outputs[1].grad_fn is not None and model.combinator.a.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["gamma", "plain"])
def test_the_running_statistics_are_the_clean_classification_pass_s(mode):
    """The Gamma-model's corrupted passes and the plain mode's masked reconstruction leave the running
    batch-norm statistics (what evaluation uses) to the clean pass: the unlabelled images' for the
    Gamma-model, the labelled ones' for plain."""
    torch.manual_seed(0)
    model = JointModel(
        Classifier(CFG), JointSpec(mode, weight=1.0), make_objective(ObjectiveConfig(objective="masked"))
    )
    reference = copy.deepcopy(model.clf)
    x, lx, ly = torch.rand(8, 3, 16, 16), torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    model.train(), reference.train()
    model(x, lx, ly, torch.Generator().manual_seed(0))
    reference(x if mode == "gamma" else lx)  # the clean pass alone
    for (k, a), b in zip(model.clf.state_dict().items(), reference.state_dict().values()):
        if "running" in k:
            assert torch.allclose(a, b), k
    norms = [m for m in model.clf.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.momentum == 0.1 for m in norms) and not any(m._forward_hooks for m in norms)


def test_the_gamma_model_learns_a_consistent_top_layer():
    """A few steps of the denoising cost alone lower it: the combinator and the encoder learn."""
    model = _gamma(False, seed=1)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    x, lx, ly = torch.rand(32, 3, 16, 16), torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    costs = []
    for step in range(30):
        opt.zero_grad()
        _, unsup = model(x, lx, ly, torch.Generator().manual_seed(step))
        unsup.backward()
        opt.step()
        costs.append(unsup.item())
    assert sum(costs[-5:]) / 5 < 0.8 * sum(costs[:5]) / 5


def test_the_plain_cost_is_the_objective_on_the_unlabelled_and_labelled_images_together():
    torch.manual_seed(0)
    objective = make_objective(ObjectiveConfig(objective="reconstruct"))
    model = JointModel(Classifier(CFG), JointSpec("plain", weight=1.0), objective)
    assert model.ae.encoder is model.clf.encoder  # one encoder, two heads
    x, lx, ly = torch.rand(4, 3, 16, 16), torch.rand(2, 3, 16, 16), torch.tensor([0, 1])
    ce, unsup = model(x, lx, ly)
    assert float(unsup) == pytest.approx(objective.loss(model.ae, torch.cat([x, lx])).item(), rel=1e-6)
    assert float(ce) == pytest.approx(torch.nn.functional.cross_entropy(model.clf(lx), ly).item(), rel=1e-6)
    out = JointLoss(0.5)(model, Batch(x, None, Batch(lx, ly)))
    assert set(out) == {"loss", "supervised", "unsupervised"}  # its terms, by name, for the loop to sum
    assert float(out["loss"]) == pytest.approx(float(ce) + 0.5 * float(unsup), rel=1e-5)
    assert float(out["supervised"]) == pytest.approx(float(ce), rel=1e-5)
    assert float(out["unsupervised"]) == pytest.approx(float(unsup), rel=1e-5)


def test_plain_joint_training_after_pretraining_starts_from_a_copy_of_the_pretrained_decoder():
    torch.manual_seed(0)
    ae = AutoEncoder(CFG)
    model = JointModel(
        Classifier.from_autoencoder(ae, 3),
        JointSpec("plain"),
        make_objective(ObjectiveConfig(objective="reconstruct")),
        decoder=ae.decoder,
    )
    assert model.ae.decoder is not ae.decoder  # the pretrained autoencoder is left as it was
    for (k, a), b in zip(model.ae.decoder.state_dict().items(), ae.decoder.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_class_without_a_labelled_image_is_an_error():
    check_labels(torch.tensor([0, 1, 2]), ["a", "b", "c"])
    with pytest.raises(ConvaeError, match="class.*c.*no labelled image"):
        check_labels(torch.tensor([0, 1, 1]), ["a", "b", "c"])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("joint")
    return make_image_folder(root / "data", classes=3, per_class=12, size=(16, 16)), root / "cache"


@pytest.mark.parametrize("mode", ["plain", "gamma"])
def test_a_joint_run_from_the_command_line_with_one_label_per_class(folder, tmp_path, mode, capsys):
    data, cache = folder
    out = tmp_path / "run"
    code = main(
        [
            "run",
            "--data",
            str(data),
            "--cache-dir",
            str(cache),
            "--out",
            str(out),
            *BLOCKS,
            "--init",
            "scratch",
            "--joint",
            mode,
            "--labels-per-class",
            "1",
            "--finetune-epochs",
            "2",
            "--batch-size",
            "8",
            "--objective",
            "masked",
            "--epoch-images",
            "40",
        ]
    )
    assert code == 0
    assert "--epoch-images 40 is not used: an epoch is one pass over the unlabelled images" in (
        capsys.readouterr().out
    )  # said, not silently ignored
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and all(m["phase"] == "finetune" for m in metrics)
    for m in metrics:  # each term of the loss, and the total their weighted sum
        assert m["train_loss"] == pytest.approx(m["train_supervised"] + m["train_unsupervised"], rel=1e-4)
        assert m["train_unsupervised"] > 0
    results = json.loads((out / "results.json").read_text())
    assert results["labelled_images"] == 3 and "finished" in results
    report = (out / "report.html").read_text()
    assert ">supervised</th>" in report and ">unsupervised</th>" in report  # each term, each epoch
    ckpt = torch.load(out / "checkpoints" / "classifier.pt", weights_only=True)
    assert not any(k.startswith(("clf.", "ae.", "combinator")) for k in ckpt["model"])  # a plain classifier


def test_joint_training_refuses_a_frozen_encoder(folder, tmp_path, capsys):
    data, cache = folder
    code = main(
        [
            "run",
            "--data",
            str(data),
            "--cache-dir",
            str(cache),
            "--out",
            str(tmp_path / "r"),
            *BLOCKS,
            "--joint",
            "plain",
            "--freeze-encoder",
        ]
    )
    assert code != 0
    assert "--joint and --freeze-encoder" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_sweep_measures_the_joint_methods_without_pretraining(folder, tmp_path, capsys):
    data, cache = folder
    out = tmp_path / "sweep"
    code = main(
        [
            "sweep",
            "--data",
            str(data),
            "--cache-dir",
            str(cache),
            "--out",
            str(out),
            *BLOCKS,
            "--labels-per-class",
            "2",
            "--seeds",
            "2",
            "--steps",
            "3",
            "--batch-size",
            "8",
            "--objective",
            "masked",
            "--methods",
            "scratch",
            "joint_plain",
            "joint_gamma",
        ]
    )
    assert code == 0
    assert "no pretraining" in capsys.readouterr().out
    result = json.loads((out / "sweep.json").read_text())
    assert sorted({c["method"] for c in result["cells"]}) == ["joint_gamma", "joint_plain", "scratch"]
    assert len(result["cells"]) == 6 and result["autoencoder"] is None
    assert not (out / "checkpoints" / "autoencoder.pt").exists()


def test_the_sweeps_joint_finetuning_starts_from_the_pretrained_encoder_and_decoder(folder, tmp_path, monkeypatch):
    data, cache = folder
    seen = []
    init = JointModel.__init__

    def spy(self, clf, spec, objective=None, decoder=None):
        seen.append((copy.deepcopy(clf.encoder.state_dict()), decoder and copy.deepcopy(decoder.state_dict())))
        init(self, clf, spec, objective, decoder)

    monkeypatch.setattr(JointModel, "__init__", spy)
    out = tmp_path / "sweep"
    code = main(
        [
            "sweep",
            "--data",
            str(data),
            "--cache-dir",
            str(cache),
            "--out",
            str(out),
            *BLOCKS,
            "--pretrain-epochs",
            "1",
            "--labels-per-class",
            "2",
            "--seeds",
            "1",
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--objective",
            "masked",
            "--methods",
            "joint_finetune",
            "joint_plain",
        ]
    )
    assert code == 0
    result = json.loads((out / "sweep.json").read_text())
    assert [c["method"] for c in result["cells"]] == ["joint_plain", "joint_finetune"]
    ae = torch.load(out / "checkpoints" / "autoencoder.pt", weights_only=True)["model"]
    (scratch_enc, scratch_dec), (enc, dec) = seen
    assert dec is not None and scratch_dec is None  # joint_plain builds a fresh decoder
    for k, v in dec.items():
        assert torch.equal(v, ae[f"decoder.{k}"]), k
    for k, v in enc.items():
        assert torch.equal(v, ae[f"encoder.{k}"]), k
    assert not all(torch.equal(v, ae[f"encoder.{k}"]) for k, v in scratch_enc.items())


# ----------------------------------------------------------------------------- a training mode of one's own


class EntropyMinimisation(TrainingMode):
    """A toy semi-supervised mode (Grandvalet & Bengio's entropy minimisation): the labelled batch's
    cross-entropy plus the entropy of the predictions on the unlabelled batch, each a named term."""

    name, label, unlabelled = "entmin", "entropy minimisation", True

    def build(self, clf, labelled, unlabelled, classes, cfg, device, seed, rank=0, world_size=1, decoder=None):
        train = DeviceBatches.of(unlabelled, device, cfg.batch_size, labels=False, shuffle=True, seed=seed)
        side = DeviceBatches.of(labelled, device, cfg.batch_size, shuffle=True, seed=seed + 1)

        def criterion(model, batch, generator=None):
            ce = torch.nn.functional.cross_entropy(model(batch.labelled.x).float(), batch.labelled.y)
            p = model(batch.x).float().softmax(1)
            entropy = -(p * p.clamp_min(1e-8).log()).sum(1).mean()
            return {"loss": ce + entropy, "cross_entropy": ce, "entropy": entropy}

        return clf, train, criterion, lambda start: cycling(side, start)


@pytest.fixture
def entmin():
    register_training_mode(EntropyMinimisation)
    yield
    unregister_training_mode("entmin")


def test_a_training_mode_registered_here_runs_through_run_and_sweep_with_its_terms(entmin, folder, tmp_path, capsys):
    """Registered in this test and nowhere else: --joint takes its name, the run records, prints and reports its
    terms, and the sweep measures it as joint_entmin beside scratch."""
    data, cache = folder
    common = ["--data", str(data), "--cache-dir", str(cache), "--height", "16", "--width", "16"]
    common += ["--channels", "8", "16", "--latent-dim", "16", "--batch-size", "8", "--labels-per-class", "2"]
    out = tmp_path / "run"
    args = ["run", *common, "--joint", "entmin", "--pretrain-epochs", "1", "--finetune-epochs", "2"]
    assert main([*args, "--out", str(out)]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tuned = [m for m in metrics if m["phase"] == "finetune"]
    assert len(tuned) == 2
    for m in tuned:
        assert m["train_loss"] == pytest.approx(m["train_cross_entropy"] + m["train_entropy"], rel=1e-4)
    printed = capsys.readouterr().out
    assert "(cross_entropy " in printed and ", entropy " in printed  # the epoch line names them
    report = (out / "report.html").read_text()
    assert ">cross_entropy</th>" in report and ">entropy</th>" in report
    sweep = tmp_path / "sweep"
    sweep_args = ["sweep", *common[:-2], "--pretrain-epochs", "1", "--labels-per-class", "2", "--seeds", "1"]
    sweep_args += ["--steps", "2", "--methods", "scratch", "joint_entmin", "--out", str(sweep)]
    assert main(sweep_args) == 0
    cells = json.loads((sweep / "sweep.json").read_text())["cells"]
    assert {c["method"] for c in cells} == {"scratch", "joint_entmin"}
    assert "joint, entropy minimisation" in capsys.readouterr().out  # the sweep's table says what it measured
