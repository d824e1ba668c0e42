"""Consistency training (FixMatch, FlexMatch, FreeMatch) and its strong augmentation: the operations against
PIL's, the views replayed from the step's generator, the thresholds' meaning, a threshold no prediction passes
as supervised training, the weak pass without gradient, and the CLI, the sweep and --resume end to end."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from conftest import make_image_folder
from convae.cli import main
from convae.data import DeviceBatches
from convae.data import randaugment as ra
from convae.data.augment import AugmentConfig, augment, step_generator
from convae.models import Classifier, ModelConfig
from convae.training.consistency import ConsistencyLoss, ConsistencyModel, ConsistencySpec, Thresholds
from convae.training.loop import train_one_epoch
from convae.utils.errors import ConvaeError
from convae.utils.records import Batch

CFG = ModelConfig(arch="blocks", channels=(8, 16), height=16, width=16, num_classes=3)
BLOCKS = ["--arch", "blocks", "--channels", "8", "16", "--height", "16", "--width", "16", "--device", "cpu"]

# ----------------------------------------------------------------------------- the strong augmentation


def _images(n=4, seed=0, size=24):
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(n, 3, size, size, generator=g) ** 2) * 255).round() / 255  # 8-bit values, skewed dark


@pytest.mark.parametrize(
    "op, pil, v",
    [
        (ra.equalize, lambda im, v: ImageOps.equalize(im), 0.0),
        (ra.autocontrast, lambda im, v: ImageOps.autocontrast(im), 0.0),
        (ra.posterize, lambda im, v: ImageOps.posterize(im, int(v)), 5.0),
        (ra.solarize, lambda im, v: ImageOps.solarize(im, v), 100.0),
        (ra.color, lambda im, v: ImageEnhance.Color(im).enhance(v), 0.3),
        (ra.contrast, lambda im, v: ImageEnhance.Contrast(im).enhance(v), 0.3),
        (ra.brightness, lambda im, v: ImageEnhance.Brightness(im).enhance(v), 0.3),
        (ra.sharpness, lambda im, v: ImageEnhance.Sharpness(im).enhance(v), 0.3),
    ],
    ids=lambda p: getattr(p, "__name__", ""),
)
def test_the_photometric_operations_are_pils_to_within_rounding(op, pil, v):
    x = _images()
    ours = op(x, torch.full((len(x),), v))
    u8 = (x * 255).round().byte().permute(0, 2, 3, 1).numpy()
    ref = torch.stack(
        [torch.from_numpy(np.array(pil(Image.fromarray(a), v))).permute(2, 0, 1).float() / 255 for a in u8]
    )
    # PIL rounds to 8 bits between its steps (and its contrast to a whole grey level): a level at most
    assert (ours - ref).abs().max().item() * 255 <= 1.3


def test_a_translation_moves_every_pixel_by_its_fraction_of_the_image():
    x = _images(2, size=32)
    theta = ra._matrices(torch.tensor([0.25, -0.125]), "translate_x", 32, 32)
    out = ra._affine(x, theta)
    # output column c reads input column c + 8 (then c - 4); black where that falls outside
    torch.testing.assert_close(out[0, :, :, :24], x[0, :, :, 8:])
    assert out[0, :, :, 24:].abs().max() == 0
    torch.testing.assert_close(out[1, :, :, 4:], x[1, :, :, :28])


def test_strong_views_are_drawn_per_image_from_the_generator_and_leave_the_input_alone():
    x = _images(64, size=16)
    x[1] = x[0]  # two equal images get their own operations
    before = x.clone()
    cfg = ra.StrongAugment(ops=3, cutout=0.5)
    a = ra.strong_augment(x, cfg, torch.Generator().manual_seed(5))
    b = ra.strong_augment(x, cfg, torch.Generator().manual_seed(5))
    c = ra.strong_augment(x, cfg, torch.Generator().manual_seed(6))
    assert torch.equal(x, before)
    assert torch.equal(a, b) and not torch.equal(a, c)  # replayable from the step's seed
    assert not torch.equal(a[0], a[1])
    assert a.shape == x.shape and a.is_contiguous(memory_format=torch.channels_last)
    assert a.min() >= 0 and a.max() <= 1


def test_every_operation_of_the_pool_runs_on_a_batch_and_on_one_channel():
    for channels in (3, 1):
        x = _images(5, size=12)[:, :channels]
        for op in ra.POOL:
            v = torch.linspace(op.low, op.high, 5)
            out = ra._affine(x, ra._matrices(v, op.name, 12, 12)) if op.apply is None else op.apply(x, v)
            assert out.shape == x.shape and torch.isfinite(out).all(), op.name
            assert out.min() >= 0 and out.max() <= 1, op.name


def test_cutout_greys_a_square_no_larger_than_its_share_of_the_image():
    x = torch.zeros(200, 3, 20, 20)
    out = ra.random_cutout(x, 0.5, torch.Generator().manual_seed(0))
    grey = (out[:, 0] == 0.5).sum(dim=(1, 2))
    assert grey.max() <= 10 * 10 and grey.max() > 50 and (grey == 0).any()  # sides from 0 up to half


# ----------------------------------------------------------------------------- the thresholds


def _probs(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_fixmatch_keeps_the_predictions_at_or_above_its_threshold():
    th = Thresholds(ConsistencySpec("fixed", threshold=0.9), classes=3, images=10)
    mask = th(_probs([[0.95, 0.03, 0.02], [0.5, 0.3, 0.2], [0.05, 0.05, 0.9]]), torch.arange(3))
    assert mask.tolist() == [True, False, True]


def test_flexmatch_starts_low_and_raises_a_class_threshold_as_the_class_is_learnt():
    th = Thresholds(ConsistencySpec("flex", threshold=0.9), classes=3, images=6)
    weak = _probs([[0.4, 0.3, 0.3]] * 3)
    assert th(weak, torch.arange(3)).all()  # nothing learnt yet: every class's threshold is 0 (the warm-up)
    confident = _probs([[0.95, 0.03, 0.02]] * 6)
    th(confident, torch.arange(6))  # every image now confidently class 0
    assert th.selected.tolist() == [0] * 6
    # class 0 fully learnt: its threshold is the fixed one; the others' are still 0
    mask = th(_probs([[0.85, 0.1, 0.05], [0.05, 0.4, 0.55]]), torch.tensor([0, 1]))
    assert mask.tolist() == [False, True]
    assert th.selected.tolist() == [0] * 6  # neither passed 0.9: the memory is as it was


def test_freematch_thresholds_follow_the_mean_confidence_from_one_over_the_classes():
    th = Thresholds(ConsistencySpec("free", momentum=0.5), classes=4, images=10)
    assert th.confidence.item() == pytest.approx(0.25)
    probs = _probs([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]])
    mask = th(probs, torch.arange(2))
    assert th.confidence.item() == pytest.approx(0.5 * 0.25 + 0.5 * 0.7)  # updated first, then judged
    assert mask.all()  # 0.7 >= 0.475 times the class's share of the largest mean (1 for classes 0 and 1)
    torch.testing.assert_close(th.class_mean, torch.tensor([0.325, 0.325, 0.175, 0.175]))


# ----------------------------------------------------------------------------- the step


def _model(spec, images=16, seed=0):
    torch.manual_seed(seed)
    clf = Classifier(CFG).to(memory_format=torch.channels_last)
    return ConsistencyModel(clf, spec, images, truth=torch.arange(images) % 3)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(16, 3, 16, 16, generator=g)
    lx = torch.rand(6, 3, 16, 16, generator=g)
    return x, torch.arange(16), lx, torch.arange(6) % 3


def test_with_a_threshold_no_prediction_passes_a_step_is_supervised_trainings():
    weak = AugmentConfig(crop_padding=2)
    model = _model(ConsistencySpec("fixed", threshold=1.5, weak=weak))
    reference = copy.deepcopy(model.clf)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(3):
        x, idx, lx, ly = _batch(step)
        out = model(x, idx, lx, ly, step_generator(torch.device("cpu"), 0, 1, step))
        assert out["mask"] == 0 and out["consistency"] == 0
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        # the supervised step on the same labelled view (the labelled batch is augmented first)
        view = augment(lx, weak, step_generator(torch.device("cpu"), 0, 1, step))
        ref_opt.zero_grad()
        F.cross_entropy(reference(view).float(), ly).backward()
        ref_opt.step()
    for (name, p), q in zip(model.clf.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_the_weak_pass_gives_no_gradient_and_moves_the_running_statistics_alone():
    model = _model(ConsistencySpec("fixed", threshold=0.0 + 1e-9))  # every prediction passes
    norms = [m for m in model.clf.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    x, idx, lx, ly = _batch()
    model.train()
    with torch.no_grad():  # what the weak pass alone does to the running statistics
        probe = copy.deepcopy(model.clf)
        g = torch.Generator().manual_seed(1)
        augment(lx, model.spec.weak, g)  # the labelled view is drawn first
        probe(augment(x, model.spec.weak, g))
    calls = []
    model.clf.register_forward_hook(lambda m, i, o: calls.append((len(i[0]), o.requires_grad)))
    out = model(x, idx, lx, ly, torch.Generator().manual_seed(1))
    assert calls == [(16, False), (6 + 16, True)]  # the weak views, then the labelled and strong ones
    assert out["mask"] == 1 and out["consistency"] > 0
    probe_norms = [m for m in probe.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for a, b in zip(norms, probe_norms):
        torch.testing.assert_close(a.running_mean, b.running_mean)


def test_only_the_strong_views_that_passed_are_computed_and_the_mean_is_over_the_whole_batch():
    model = _model(ConsistencySpec("fixed", threshold=0.5))
    x, idx, lx, ly = _batch()
    with torch.no_grad():
        model.train()
        out = model(x, idx, lx, ly, torch.Generator().manual_seed(2))
    assert 0 <= out["mask"] <= 1
    assert 0 <= out["mask_correct"] <= out["mask"]


def test_the_views_replay_from_the_steps_generator():
    model = _model(ConsistencySpec("fixed", threshold=0.3))
    x, idx, lx, ly = _batch()
    model.eval()  # the running statistics stay put between the two calls
    outs = [model(x, idx, lx, ly, step_generator(torch.device("cpu"), 3, 2, 7))["loss"] for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
    other = model(x, idx, lx, ly, step_generator(torch.device("cpu"), 3, 2, 8))["loss"]
    assert not torch.equal(outs[0], other)


def test_the_loop_hands_the_batches_over_as_stored_and_the_positions_as_labels():
    images = torch.arange(12, dtype=torch.uint8).view(12, 1, 1, 1).expand(12, 3, 16, 16).contiguous()
    unlabelled = DeviceBatches(images, None, 4, shuffle=True, seed=0).indexed()
    labelled = DeviceBatches(images[:6], torch.arange(6) % 3, 3, shuffle=True, seed=1)
    seen = []

    class Recording(ConsistencyLoss):
        def __call__(self, model, batch: Batch, generator=None):
            seen.append((batch.x[:, 0, 0, 0] * 255).round().long().tolist() == batch.y.tolist())
            return 0 * model(batch.x).sum()

    clf = Classifier(CFG)
    train_one_epoch(
        clf,
        unlabelled,
        torch.optim.SGD(clf.parameters(), 0.0),
        Recording(),
        labelled=iter([(lx, ly) for lx, ly in labelled] * 3),
    )
    assert seen == [True] * 3  # each image's label is its position, and its pixels are untouched


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("consistency")
    return make_image_folder(root / "data", classes=3, per_class=12, size=(16, 16)), root / "cache"


def _run(folder, out, *extra):
    data, cache = folder
    return main(
        ["run", "--data", str(data), "--cache-dir", str(cache), "--out", str(out), *BLOCKS]
        + ["--labels-per-class", "2", "--finetune-epochs", "2", "--batch-size", "4", "--unlabelled-ratio", "2"]
        + list(extra)
    )


@pytest.mark.parametrize("mode", ["fixmatch", "flexmatch", "freematch"])
def test_a_consistency_run_records_its_terms_and_saves_a_plain_classifier(folder, tmp_path, mode):
    out = tmp_path / "run"
    extra = ["--init", "scratch", "--joint", mode, "--consistency-threshold", "0.4", "--ema", "0.9"]
    assert _run(folder, out, *extra) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert 0 < m["train_mask"] <= 1 and 0 <= m["train_mask_correct"] <= m["train_mask"]
        # the pseudo-labels' accuracy is the epoch's ratio, not a mean of the steps' ratios
        assert m["train_pseudo_accuracy"] == pytest.approx(m["train_mask_correct"] / m["train_mask"])
        parts = m["train_supervised"] + m["train_consistency"] + 0.001 * m.get("train_fairness", 0.0)
        assert m["train_loss"] == pytest.approx(parts, rel=1e-4)
        assert ("train_fairness" in m) == (mode == "freematch")
    report = (out / "report.html").read_text()
    assert ">consistency</th>" in report and ">mask</th>" in report and ">pseudo_accuracy</th>" in report
    ckpt = torch.load(out / "checkpoints" / "classifier.pt", weights_only=True)
    assert not any(k.startswith(("clf.", "thresholds", "ae.", "truth")) for k in ckpt["model"])


def test_consistency_after_pretraining_with_the_reconstruction_term(folder, tmp_path):
    out = tmp_path / "run"
    extra = ["--joint", "flexmatch", "--objective", "masked", "--pretrain-epochs", "1"]
    assert _run(folder, out, *extra, "--reconstruction-weight", "0.5") == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tuned = [m for m in metrics if m["phase"] == "finetune"]
    assert len(tuned) == 2 and all(m["train_reconstruction"] > 0 for m in tuned)
    for m in tuned:
        parts = m["train_supervised"] + m["train_consistency"] + 0.5 * m["train_reconstruction"]
        assert m["train_loss"] == pytest.approx(parts, rel=1e-4)


def test_a_class_without_a_labelled_image_is_a_clear_error(folder):
    from convae.config import build_config
    from convae.config.modes import training_mode
    from convae.data import ImageSet

    images = torch.zeros(6, 3, 16, 16, dtype=torch.uint8)
    labelled = ImageSet(images, torch.tensor([0, 0, 1, 1, 0, 1]), ["a", "b", "c"], [f"{i}.png" for i in range(6)])
    cfg = build_config(
        "blocks", None, {"joint": "fixmatch", "label_smoothing": 0.0, "channels": (8, 16), "height": 16, "width": 16}
    )
    with pytest.raises(ConvaeError, match="consistency training: class.*c.*no labelled image"):
        training_mode("fixmatch").build(
            Classifier(CFG), labelled, labelled, ["a", "b", "c"], cfg, torch.device("cpu"), 0
        )


def _sweep(folder, out, *extra):
    data, cache = folder
    return main(
        ["sweep", "--data", str(data), "--cache-dir", str(cache), "--out", str(out), *BLOCKS]
        + ["--labels-per-class", "2", "--seeds", "2", "--steps", "3", "--batch-size", "4", "--unlabelled-ratio", "2"]
        + ["--objective", "masked", "--pretrain-epochs", "1", "--curves"]
        + ["--methods", "scratch", "joint_fixmatch", "finetune_flexmatch", "logistic_probe"]
        + list(extra)
    )


def test_a_stopped_sweep_resumes_with_its_finished_cells_and_ends_as_one_that_was_not(folder, tmp_path, monkeypatch):
    from convae.commands import sweep
    from convae.training.loop import EpochInterrupted

    assert _sweep(folder, tmp_path / "whole") == 0
    whole = json.loads((tmp_path / "whole" / "sweep.json").read_text())
    methods = {"scratch", "joint_fixmatch", "finetune_flexmatch", "logistic_probe"}
    assert {c["method"] for c in whole["cells"]} == methods
    for c in whole["cells"]:  # a consistency cell's terms per epoch: its mask rate, its pseudo-labels' accuracy
        terms = c.get("epoch_terms")
        assert (terms is not None) == (c["method"] in ("joint_fixmatch", "finetune_flexmatch"))
        assert terms is None or all(0 <= t["mask"] <= 1 and "pseudo_accuracy" in t for t in terms)
    real, calls = sweep.train_cell, []

    def stopped_in_the_fourth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # seed 1's scratch cell: seed 0's four cells are done
            raise EpochInterrupted(1, 0.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "train_cell", stopped_in_the_fourth)
    out = tmp_path / "stopped"
    assert _sweep(folder, out) == 130
    assert not (out / "sweep.json").exists() and (out / "checkpoints" / "autoencoder.pt").is_file()
    monkeypatch.setattr(sweep, "train_cell", real)
    assert main(["sweep", "--out", str(out), "--resume", "--seeds", "5"]) == 2  # the plan is the saved one
    assert main(["sweep", "--out", str(out), "--resume"]) == 0
    resumed = json.loads((out / "sweep.json").read_text())
    assert resumed["timing"]["resumed_cells"] == 4
    key = ("labels_per_class", "seed", "method")
    assert [tuple(c[k] for k in key) for c in resumed["cells"]] == [tuple(c[k] for k in key) for c in whole["cells"]]
    for a, b in zip(whole["cells"], resumed["cells"]):
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-9), a["method"]
        same = [[s, acc] for s, acc, _ in a.get("curve", [])]  # the same steps and evaluations (seconds aside)
        assert [[s, acc] for s, acc, _ in b.get("curve", [])] == same
    assert main(["sweep", "--out", str(out), "--resume"]) == 2  # finished: nothing to resume


def _rank_thresholds(rank, world, init, policy, out):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        probs, idx = _shared_predictions()
        th = Thresholds(ConsistencySpec(policy, threshold=0.6, momentum=0.5), classes=3, images=12)
        for step in range(2):  # each rank judges its strided shard of the step's batch
            part = slice(6 * step + rank, 6 * step + 6, world)
            th(probs[part], idx[part])
        torch.save({k: v.clone() for k, v in th.state_dict().items()}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def _shared_predictions():
    g = torch.Generator().manual_seed(0)
    return (3 * torch.randn(12, 3, generator=g)).softmax(dim=1), torch.randperm(12, generator=g)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
@pytest.mark.parametrize("policy", ["flex", "free"])
def test_under_ddp_every_rank_keeps_the_thresholds_of_the_whole_batch(tmp_path, policy):
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_rank_thresholds, args=(2, init, policy, str(tmp_path / "state")), nprocs=2, join=True)
    probs, idx = _shared_predictions()
    whole = Thresholds(ConsistencySpec(policy, threshold=0.6, momentum=0.5), classes=3, images=12)
    for step in range(2):
        whole(probs[6 * step : 6 * step + 6], idx[6 * step : 6 * step + 6])
    for rank in range(2):
        state = torch.load(f"{tmp_path / 'state'}.{rank}", weights_only=True)
        for k, v in whole.state_dict().items():
            torch.testing.assert_close(state[k], v, msg=f"rank {rank}: {k}")
    if policy == "flex":
        assert (whole.selected >= 0).sum() > 0  # some predictions passed: the memory was written


def test_label_smoothing_that_keeps_every_confidence_below_the_threshold_is_refused(folder, tmp_path, capsys):
    """Smoothing 0.2 trains the top probability towards 0.82 (10 classes): a threshold of 0.95 never passes, and
    the run would be supervised training under another name. Refused in a run and, before any cell, a sweep."""
    data, cache = folder
    common = ["--data", str(data), "--cache-dir", str(cache), *BLOCKS]
    for command in (["run", "--joint", "fixmatch"], ["sweep", "--methods", "scratch", "joint_flexmatch"]):
        out = tmp_path / command[0]
        code = main([*command, *common, "--out", str(out), "--label-smoothing", "0.2"])
        err = capsys.readouterr().err
        assert code == 2 and "would never pass" in err and "--label-smoothing 0" in err, err
        assert not out.exists()
    from convae.config import build_config

    ok = {"joint": "fixmatch", "label_smoothing": 0.2, "consistency_threshold": 0.85}
    assert build_config("blocks", None, ok).consistency_threshold == 0.85  # below the cap: the user's choice
    assert build_config("blocks", None, {"joint": "freematch"}).label_smoothing == 0.2  # its thresholds adapt


def test_the_default_sweep_leaves_out_the_methods_its_config_cannot_train_and_says_so(folder, tmp_path, capsys):
    data, cache = folder
    args = ["sweep", "--data", str(data), "--cache-dir", str(cache), *BLOCKS, "--out", str(tmp_path / "s")]
    args += ["--label-smoothing", "0.2", "--labels-per-class", "2", "--seeds", "1", "--steps", "1"]
    args += ["--batch-size", "4", "--unlabelled-ratio", "2", "--objective", "masked", "--pretrain-epochs", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "joint_fixmatch, joint_flexmatch, finetune_fixmatch, finetune_flexmatch left out" in out
    methods = json.loads((tmp_path / "s" / "sweep.json").read_text())["methods"]
    assert "joint_freematch" in methods and "scratch" in methods and "joint_fixmatch" not in methods
