"""The loop (convae.training.loop): micro-batching, learning, schedules."""

import copy
import itertools
import json
import math
from dataclasses import replace

import pytest
import torch

from convae.data import DeviceBatches
from convae.models import AutoEncoder, Classifier, ModelConfig
from convae.models.objectives import ObjectiveConfig, make_objective
from convae.training.loop import (
    StepSettings,
    classification_criterion,
    make_optimizer,
    make_scheduler,
    train_one_epoch,
)
from convae.utils.device import micro_batch_size

reconstruction = make_objective(ObjectiveConfig("reconstruct"))

SMALL = ModelConfig(channels=(8, 16, 16), latent_dim=32, num_classes=3)


def test_micro_batches_give_the_whole_batch_update():
    torch.manual_seed(0)
    a = AutoEncoder(SMALL)
    b = copy.deepcopy(a)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    la = train_one_epoch(
        a, DeviceBatches(images, None, 20, True, 0), torch.optim.SGD(a.parameters(), 0.5), reconstruction
    )
    lb = train_one_epoch(
        b,
        DeviceBatches(images, None, 20, True, 0),
        torch.optim.SGD(b.parameters(), 0.5),
        reconstruction,
        StepSettings(micro_batch=7),
    )
    assert la == pytest.approx(lb, rel=1e-6)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    clf = Classifier(SMALL)
    images = torch.zeros(60, 3, 32, 32, dtype=torch.uint8)
    labels = torch.arange(60) % 3
    for k in range(3):
        images[labels == k, k] = 200  # class k is bright in channel k
    batches = DeviceBatches(images, labels, 20, True, 0)
    opt = torch.optim.Adam(clf.parameters(), 1e-3)
    losses = []
    for epoch in range(10):
        batches.set_epoch(epoch)
        losses.append(train_one_epoch(clf, batches, opt, classification_criterion))
    assert losses[-1] < 0.5 * losses[0]


def test_micro_batch_auto_and_schedules():
    assert micro_batch_size(0, "fp32", torch.device("cpu")) == 200
    assert micro_batch_size(0, "fp32", torch.device("cuda")) is None
    assert micro_batch_size(0, "bf16", torch.device("cpu")) == 500
    assert micro_batch_size(0, "bf16", torch.device("cuda")) is None
    assert micro_batch_size(64, "bf16", torch.device("cuda")) == 64
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    assert make_scheduler(opt, "none", 5) is None
    sched = make_scheduler(opt, "cosine", 4)
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    step = make_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), "step", 10, step_size=2)
    for _ in range(2):
        step.optimizer.step()
        step.step()
    assert step.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


def test_optimizers_train_only_parameters_that_require_grad():
    clf = Classifier(SMALL)
    for p in clf.encoder.parameters():
        p.requires_grad_(False)
    for name, kind in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)):
        opt = make_optimizer(clf.parameters(), name, 1e-3, 0.01)
        assert isinstance(opt, kind) and opt.param_groups[0]["weight_decay"] == 0.01
        assert sum(p.numel() for p in opt.param_groups[0]["params"]) == SMALL.latent_dim * 3 + 3


def test_a_frozen_encoder_keeps_its_batch_norm_statistics():
    from convae.training.loop import freeze

    torch.manual_seed(0)
    clf = Classifier(ModelConfig(channels=(8, 16), latent_dim=16, num_classes=3, norm="batch"))
    freeze(clf.encoder)
    before = {k: v.clone() for k, v in clf.encoder.state_dict().items()}
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(24) % 3
    opt = make_optimizer(clf.parameters(), "adam", 1e-2)
    train_one_epoch(clf, DeviceBatches(images, labels, 8, True, 0), opt, classification_criterion)
    after = clf.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running means and variances too
    assert any(m.training for m in clf.modules()) and not clf.encoder.conv[1].training


def test_a_labelled_stream_joins_every_step_and_is_split_with_the_micro_batches():
    """A criterion sees the unlabelled batch and, beside it, the next labelled batch of a cycling
    stream; micro-batching splits both into as many parts."""
    torch.manual_seed(0)
    clf = Classifier(SMALL)
    unlabelled = DeviceBatches(torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8), None, 8, True, 0)
    labelled_images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8).float() / 255
    labelled = itertools.cycle(
        [(labelled_images[:3], torch.tensor([0, 1, 2])), (labelled_images[3:], torch.tensor([2, 1, 0]))]
    )
    seen = []

    def joint(model, batch, generator=None):
        seen.append((len(batch), batch.y, batch.labelled.y.tolist()))
        return classification_criterion(model, batch.labelled) + 0 * model(batch.x).sum()

    loss = train_one_epoch(
        clf, unlabelled, torch.optim.SGD(clf.parameters(), 0.1), joint, StepSettings(micro_batch=4), labelled=labelled
    )
    assert math.isfinite(loss)
    # 3 steps of 8 unlabelled images, each in 2 micro-batches of 4; the labelled batches cycle
    assert [(n, y) for n, y, _ in seen] == [(4, None)] * 6
    assert [lab for _, _, lab in seen] == [[0, 1], [2], [2, 1], [0], [0, 1], [2]]


def test_a_criterions_named_terms_are_summed_like_its_loss_and_the_same_whatever_the_micro_batch():
    """A criterion returning a mapping trains on its "loss"; each other name comes back as its mean per image
    over the epoch, the same with micro-batches, and a resumed epoch's sums are continued."""

    def with_terms(model, batch, generator=None):
        loss = reconstruction(model, batch, generator)
        return {"loss": loss, "twice": 2 * loss, "one": torch.ones(())}

    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    results = []
    for micro in (None, 7):
        torch.manual_seed(0)
        ae = AutoEncoder(SMALL)
        terms = {}
        loss = train_one_epoch(
            ae,
            DeviceBatches(images, None, 20, True, 0),
            torch.optim.SGD(ae.parameters(), 0.5),
            with_terms,
            StepSettings(micro_batch=micro),
            terms=terms,
        )
        assert set(terms) == {"twice", "one"} and terms["one"] == pytest.approx(1.0)
        assert terms["twice"] == pytest.approx(2 * loss, rel=1e-9)
        results.append((loss, terms["twice"]))
    assert results[0] == pytest.approx(results[1], rel=1e-6)
    torch.manual_seed(0)
    ae = AutoEncoder(SMALL)
    resumed = {"one": torch.tensor(20.0, dtype=torch.float64)}  # the first batch's 20 images, as a saved state holds
    train_one_epoch(
        ae,
        DeviceBatches(images, None, 20, True, 0),
        torch.optim.SGD(ae.parameters(), 0.5),
        with_terms,
        start_step=1,
        terms=resumed,
    )
    assert resumed["one"] == pytest.approx(1.0)  # (20 saved + 20 trained) / 40 images


def test_a_step_budget_ends_the_epoch_early():
    torch.manual_seed(0)
    ae = AutoEncoder(SMALL)
    batches = DeviceBatches(torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8), None, 8, True, 0)
    calls = []

    def counting(model, batch, generator=None):
        calls.append(len(batch))
        return reconstruction(model, batch, generator)

    loss = train_one_epoch(ae, batches, torch.optim.SGD(ae.parameters(), 0.1), counting, max_steps=2)
    assert calls == [8, 8] and math.isfinite(loss) and loss > 0


def test_the_fp16_gradient_scaler_gives_the_same_step_and_skips_an_overflowing_one():
    """The scaler's logic on the CPU (fp16 itself is for CUDA): a scaled step is the unscaled one,
    a step whose gradient overflowed is skipped and the scale lowered."""
    from convae.training.loop import train_step
    from convae.utils.records import Batch

    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    plain, scaled = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    scaled.load_state_dict(plain.state_dict())
    crit = lambda m, b, g=None: torch.nn.functional.cross_entropy(m(b.x), b.y)
    train_step(plain, Batch(x, y), torch.optim.SGD(plain.parameters(), lr=0.1), crit, micro_batch=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    train_step(scaled, Batch(x, y), torch.optim.SGD(scaled.parameters(), lr=0.1), crit, micro_batch=3, scaler=scaler)
    for a, b in zip(plain.parameters(), scaled.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    before = [p.detach().clone() for p in scaled.parameters()]
    overflow = lambda m, b, g=None: crit(m, b) * float("inf")
    train_step(scaled, Batch(x, y), torch.optim.SGD(scaled.parameters(), lr=0.1), overflow, scaler=scaler)
    assert all(torch.equal(a, b) for a, b in zip(before, scaled.parameters()))
    assert scaler.get_scale() == 2.0**9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_trains_on_cuda_with_its_scaler(image_folder, cache_dir, tmp_path):
    from convae.cli import main

    assert (
        main(
            [
                "run",
                "--data",
                str(image_folder),
                "--cache-dir",
                str(cache_dir),
                "--out",
                str(tmp_path / "r"),
                "--device",
                "cuda",
                "--precision",
                "fp16",
                "--height",
                "16",
                "--width",
                "16",
                "--channels",
                "8",
                "16",
                "--latent-dim",
                "16",
                "--batch-size",
                "8",
                "--pretrain-epochs",
                "1",
                "--finetune-epochs",
                "1",
            ]
        )
        == 0
    )
    state = torch.load(tmp_path / "r" / "checkpoints" / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0


def test_a_last_batch_of_one_image_joins_the_one_before_when_the_network_has_batch_norm():
    """9 images in batches of 8: a network with batch norm trains one step of 9 (one image cannot
    train a batch norm), one without it two steps as before; a micro-batch of one image joins the
    micro-batch before it; a lone image is one clear error."""
    from convae.config import build_config
    from convae.training.loop import train_step
    from convae.utils.errors import ConvaeError
    from convae.utils.records import Batch

    torch.manual_seed(0)
    images = torch.randint(0, 256, (9, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(9) % 3
    bn = Classifier(build_config("blocks", overrides={"height": 16, "width": 16}).model_config())
    plain = Classifier(replace(SMALL, height=16, width=16))
    steps = {}
    for name, clf in (("bn", bn), ("plain", plain)):
        sizes = []
        loss = train_one_epoch(
            clf,
            DeviceBatches(images, labels, 8, True, 0),
            torch.optim.SGD(clf.parameters(), 0.01),
            classification_criterion,
            StepSettings(after_step=lambda: sizes.append(None)),
        )
        assert math.isfinite(loss)
        steps[name] = len(sizes)
    assert steps == {"bn": 1, "plain": 2}
    parts = [len(p) for p in Batch(images, labels).chunks(4)]
    assert parts == [4, 5]
    bn.train()
    with pytest.raises(ConvaeError, match="a training batch of 1 image"):
        train_step(
            bn,
            Batch(images[:1].float() / 255, labels[:1]),
            torch.optim.SGD(bn.parameters(), 0.01),
            classification_criterion,
        )
    # the advice names the setting that made the batch too small
    x = images[:3].float() / 255
    opt = torch.optim.SGD(bn.parameters(), 0.01)
    cases = {
        "--micro-batch 2": dict(micro_batch=1),
        "--batch-size 4": dict(global_n=3, world_size=2),
        "with --batch-size 2": {},
    }
    for advice, kw in cases.items():
        batch = Batch(x, labels[:3]) if kw.get("micro_batch") else Batch(x[:1], labels[:1])
        with pytest.raises(ConvaeError) as e:
            train_step(bn, batch, opt, classification_criterion, **kw)
        assert advice in e.value.advice


def test_micro_batches_with_batch_norm_are_said_and_recorded(image_folder, tmp_path, capsys):
    """With batch norm a micro-batch is normalised with its own statistics (not the whole batch's update):
    the log says so, and config.json records the chunk the run used (0 = auto resolved)."""
    from convae.cli import main

    common = ["--data", str(image_folder), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    net = ["--arch", "blocks", "--channels", "8", "16", "--height", "16", "--width", "16", "--batch-size", "8"]
    args = ["pretrain", *common, *net, "--pretrain-epochs", "1"]
    assert main([*args, "--out", str(tmp_path / "chunks"), "--micro-batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "computed in micro-batches of 4" in out and "its own batch-norm statistics" in out
    assert json.loads((tmp_path / "chunks" / "config.json").read_text())["micro_batch"] == 4
    assert main([*args, "--out", str(tmp_path / "auto")]) == 0
    assert "micro-batches" not in capsys.readouterr().out  # 200 images a chunk: every batch of 8 whole
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["micro_batch"] == micro_batch_size(
        0, "fp32", torch.device("cpu")
    )
