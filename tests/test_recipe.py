"""The fine-tuning recipe: per-step schedule, weight average, label smoothing, repeated epochs,
LP-FT, test-time flip, and the blocks network's whitening stem and masked code."""

import json

import pytest
import torch
import torch.nn.functional as F

from convae.cli import main
from convae.data import DeviceBatches
from convae.evaluation.probes import fit_head, linear_probe_accuracy
from convae.models import AutoEncoder, Classifier, ModelConfig
from convae.models.blocks import BlocksEncoder
from convae.training.loop import classification_criterion, classification_loss, make_scheduler
from convae.training.recipe import WeightAverage, repeats
from convae.utils.records import Batch

BLOCKS = ["--arch", "blocks", "--channels", "8", "16", "--height", "16", "--width", "16", "--device", "cpu"]


def _lrs(name, epochs, per_epoch, warmup):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, name, epochs, steps_per_epoch=per_epoch, warmup=warmup)
    out = []
    for _ in range(epochs * per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_the_triangle_schedule_rises_over_the_warmup_then_falls_to_zero():
    lrs = _lrs("triangle", 4, 5, 0.25)  # 20 steps, 5 of warm-up
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))  # strictly falling after the peak
    assert lrs[-1] == pytest.approx(1 / 16) and lrs[-1] > 0  # the last step still moves; zero after it


def test_the_weight_average_follows_the_formula_and_is_applied_only_inside_its_block():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    avg = WeightAverage(model, decay=0.5)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model.train()(torch.randn(8, 3))  # moves the batch-norm statistics too
    avg.update(model)  # first update: decay min(0.5, 2 / 11)
    d = 2 / 11
    expect = start["0.weight"] * d + model[0].weight.detach() * (1 - d)
    assert torch.allclose(avg.shadow["0.weight"], expect)
    assert torch.allclose(avg.shadow["1.running_mean"], start["1.running_mean"] * d + model[1].running_mean * (1 - d))
    assert avg.shadow["1.num_batches_tracked"] == model[1].num_batches_tracked
    own = model[0].weight.detach().clone()
    with avg.applied(model):
        assert torch.equal(model[0].weight, avg.shadow["0.weight"])
    assert torch.equal(model[0].weight, own)


def test_label_smoothing_is_the_smoothed_cross_entropy_and_zero_is_the_plain_one():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    batch = Batch(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert torch.equal(classification_criterion(model, batch), F.cross_entropy(model(batch.x), batch.y))
    assert torch.allclose(
        classification_loss(0.2)(model, batch), F.cross_entropy(model(batch.x), batch.y, label_smoothing=0.2)
    )


def test_repeated_batches_make_whole_passes_each_in_its_own_order():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    b = DeviceBatches(images, torch.arange(10), batch_size=4, shuffle=True, seed=3).repeated(repeats(10, 25))
    assert b.repeat == 3 and len(b) == 8 and b.num_images == 30
    b.set_epoch(1)
    seen = torch.cat([y for _, y in b])
    passes = seen.view(3, 10)
    assert all(sorted(p.tolist()) == list(range(10)) for p in passes)  # every image once per pass
    assert not torch.equal(passes[0], passes[1])  # each pass reshuffled
    assert torch.equal(torch.cat([y for _, y in b]), seen)  # a function of (seed, epoch): replayable
    assert repeats(10, 0) == 1 and repeats(10, 10) == 1 and repeats(10, 11) == 2
    with pytest.raises(ValueError):
        DeviceBatches(images, None, 4).repeated(2)


def test_lp_ft_starts_from_the_converged_logistic_probe():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="blocks", channels=(8, 16), height=16, width=16, num_classes=3)
    clf = Classifier(cfg).eval()
    x = torch.rand(60, 3, 16, 16)
    x[:20, 0] += 0.5
    x[20:40, 1] += 0.5
    y = torch.arange(3).repeat_interleave(20)
    acc = fit_head(clf, x.clamp(0, 1), y, "fp32", seed=0)
    with torch.no_grad():
        feats = clf.encoder(x.clamp(0, 1))
        pred = clf(x.clamp(0, 1)).argmax(1)
    # the folded head predicts what the probe fitted on standardised features predicts
    assert acc == pytest.approx(float((pred == y).float().mean()))
    assert acc == pytest.approx(linear_probe_accuracy(feats, y, feats, y, 3, seed=0))
    assert acc > 0.9


def test_the_test_time_flip_averages_both_views_in_eval_mode_only():
    torch.manual_seed(0)
    clf = Classifier(ModelConfig(arch="blocks", channels=(8, 16), height=16, width=16, tta=True))
    x = torch.rand(4, 3, 16, 16)
    clf.eval()
    with torch.no_grad():
        plain = clf.head(clf.encoder(x))
        mirrored = clf.head(clf.encoder(x.flip(3)))
        assert torch.allclose(clf(x), (plain + mirrored) / 2, atol=1e-6)
        assert torch.allclose(clf(x), clf(x.flip(3)), atol=1e-6)  # invariant to the flip
    clf.train()
    assert not torch.allclose(clf(x), clf(x.flip(3)), atol=1e-4)


def test_the_whitening_stem_decorrelates_the_patches_it_was_fitted_on():
    torch.manual_seed(0)
    enc = BlocksEncoder(ModelConfig(arch="blocks", channels=(8,), height=12, width=12))
    mix = torch.tensor([[1.0, 0.8, 0.6], [0.0, 0.5, 0.4], [0.0, 0.0, 0.3]])
    x = torch.einsum("ij,bjhw->bihw", mix, torch.rand(400, 3, 12, 12))  # correlated channels
    enc.fit_to_data(x, torch.Generator().manual_seed(0))
    pre = F.conv2d(x, enc.stem_weight, enc.stem_bias)[:, :12]  # one sign of every eigenvector
    flat = pre.permute(0, 2, 3, 1).reshape(-1, 12)
    assert torch.allclose(flat.mean(0), torch.zeros(12), atol=1e-3)
    assert torch.allclose(torch.cov(flat.T), torch.eye(12), atol=0.02)


def test_masked_pretraining_zeroes_hidden_positions_so_they_do_not_reach_visible_ones():
    torch.manual_seed(0)
    ae = AutoEncoder(ModelConfig(arch="blocks", channels=(8, 16), height=16, width=16)).eval()
    x = torch.rand(2, 3, 16, 16)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, :8, :8] = 1  # the top-left quarter hidden
    with torch.no_grad():
        code, _ = ae.encoder.masked_code(x * (1 - mask), mask)  # (B, 16, 3, 3)
        dense, _ = ae.encoder.code(x * (1 - mask))
    assert code[:, :, 0, 0].abs().sum() == 0 and code[:, :, -1, -1].abs().sum() > 0
    # densely, the zeros at the hidden border shift what the visible positions next to it see
    assert not torch.allclose(code, dense)
    assert ae(x * (1 - mask), mask=mask).shape == x.shape


def test_a_run_with_the_whole_recipe_saves_the_average_and_logs_lp_ft(image_folder, cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "--data",
                str(image_folder),
                "--cache-dir",
                str(cache_dir),
                "--out",
                str(out),
                *BLOCKS,
                "--init",
                "scratch",
                "--finetune-epochs",
                "2",
                "--batch-size",
                "8",
                "--optimizer",
                "nesterov",
                "--lr",
                "0.05",
                "--schedule",
                "triangle",
                "--warmup",
                "0.3",
                "--label-smoothing",
                "0.1",
                "--ema",
                "0.9",
                "--lp-ft",
                "--tta",
                "--epoch-images",
                "40",
                "--augment",
            ]
        )
        == 0
    )
    log = capsys.readouterr().out
    assert "whitening stem fitted" in log and "LP-FT: head fitted on the frozen features" in log
    assert "passes per epoch" in log
    state = torch.load(out / "checkpoints" / "state.pt", weights_only=True)
    saved = torch.load(out / "checkpoints" / "classifier.pt", weights_only=True)
    for k, v in state["average"]["shadow"].items():  # the classifier written is the average
        assert torch.equal(saved["model"][k], v), k
    assert any(not torch.equal(state["model"][k], v) for k, v in state["average"]["shadow"].items())
    assert saved["config"]["tta"] is True
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [m["lr"] for m in metrics if m.get("phase") == "finetune"]
    assert lrs[0] < 0.05 and lrs[1] < 0.05  # stepped per step: never the peak at an epoch's start here


def test_an_epoch_resumed_mid_way_records_the_lr_of_its_first_step():
    from convae.training.loop import lr_at

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, "triangle", 2, steps_per_epoch=10, warmup=0.5)
    first = opt.param_groups[0]["lr"]
    for _ in range(13):  # epoch 2, three steps in: where a resumed process starts
        opt.step()
        sched.step()
    at_epoch_2 = _lrs("triangle", 2, 10, 0.5)[10]
    assert lr_at(opt, sched, 10) == pytest.approx(at_epoch_2) and at_epoch_2 != opt.param_groups[0]["lr"]
    assert lr_at(opt, None, 10) == opt.param_groups[0]["lr"] and first == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["cosine", "step"])
def test_an_epoch_schedule_of_the_global_step_is_torchs_epoch_scheduler(name):
    """Stepped after every optimizer step, cosine and step hold the rate through an epoch and match
    torch's own schedulers stepped once per epoch (the competitor)."""
    epochs, per_epoch = 6, 4
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    torch_sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        if name == "cosine"
        else torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    )
    expected = []
    for _ in range(epochs):
        expected += [opt.param_groups[0]["lr"]] * per_epoch
        opt.step()
        torch_sched.step()
    got = [0.0] * (epochs * per_epoch)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, name, epochs, step_size=2, steps_per_epoch=per_epoch)
    for i in range(epochs * per_epoch):
        got[i] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    assert got == pytest.approx(expected, abs=1e-12)
    assert len(set(got[:per_epoch])) == 1 and got[2 * per_epoch] < got[0]


def test_a_schedule_resumes_from_its_saved_step_alone():
    """The scheduler's state is the global step: a new one loaded from it continues the same rates."""

    def fresh():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, make_scheduler(opt, "triangle", 3, steps_per_epoch=7, warmup=0.2)

    opt, sched = fresh()
    for _ in range(9):
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert state["last_epoch"] == 9
    opt2, sched2 = fresh()
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(state)
    rates = []
    for o, s in ((opt, sched), (opt2, sched2)):
        rates.append([])
        for _ in range(5):
            rates[-1].append(o.param_groups[0]["lr"])
            o.step()
            s.step()
    assert rates[0] == rates[1] and rates[0][0] == pytest.approx(_lrs("triangle", 3, 7, 0.2)[9])


def test_the_hierarchical_decoder_reads_every_block_and_learns_its_mask_tokens():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="blocks", channels=(8, 16), height=16, width=16, output_activation="none")
    plain, skips = AutoEncoder(cfg), AutoEncoder(ModelConfig(**{**cfg.to_dict(), "skips": True}))
    # without skips the autoencoder is the one old checkpoints hold: the same names, nothing more
    assert set(skips.state_dict()) - set(plain.state_dict()) == {
        "decoder.tokens.0",
        "decoder.tokens.1",
        "decoder.project.0.weight",
        "decoder.project.0.bias",
    }
    x = torch.rand(2, 3, 16, 16)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, :8, :8] = 1
    skips(x * (1 - mask), mask=mask).square().mean().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in skips.decoder.tokens)
    assert skips.decoder.project[0].weight.grad.abs().sum() > 0
    # the shallow block's map reaches the output through its own path, not only through the deepest map
    with torch.no_grad():
        code, context = skips.encoder.masked_code(x * (1 - mask), mask)
        out = skips.decoder(code, context)
        skips.decoder.project[0].weight.zero_()
        assert not torch.allclose(out, skips.decoder(code, context))


def test_skips_outside_masked_pretraining_are_one_clear_line(image_folder, tmp_path, capsys):
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(image_folder),
                "--out",
                str(tmp_path / "r"),
                *BLOCKS,
                "--objective",
                "reconstruct",
                "--skips",
            ]
        )
        != 0
    )
    err = capsys.readouterr().err
    assert "--skips" in err and "--objective masked" in err and "Traceback" not in err


def test_lp_ft_gives_no_weight_to_a_feature_that_barely_varies(monkeypatch):
    """A feature whose spread is a millionth of the others' (here it even predicts the labels): folded through
    the standardisation its weight would be a million times theirs, and the first fine-tuning step, which moves
    it by a little, would start far above a constant guess's loss."""
    from convae.evaluation import probes

    torch.manual_seed(0)
    clf = Classifier(ModelConfig(arch="blocks", channels=(8, 16), height=16, width=16, num_classes=2)).eval()
    y = torch.arange(2).repeat(30)
    feats = torch.randn(60, 16) + 2.0 * y[:, None]  # informative at the usual scale
    feats[:, 0] = 1.0 + 1e-6 * y  # informative too, at a millionth of the scale
    monkeypatch.setattr(probes, "extract_features", lambda *a, **k: feats)
    monkeypatch.setattr(probes, "recalibrate_batch_norm", lambda *a, **k: None)
    acc = fit_head(clf, torch.zeros(60, 3, 16, 16), y, "fp32", seed=0)
    assert acc > 0.9
    assert clf.head.weight[:, 0].abs().max() == 0 and clf.head.weight.abs().max() < 100
    moved = feats.clone()
    moved[:, 0] += 1e-3  # fine-tuning's first steps move the feature a little
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(clf.head(moved), y)
    assert loss < 0.69  # below a constant guess's
