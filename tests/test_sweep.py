import csv
import json

import pytest

from convae.cli import main
from convae.commands.sweep_methods import parse_budgets
from convae.outputs.sweep_tables import summarise
from convae.utils.errors import ConvaeError

SMALL = [
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
    "--val-fraction",
    "0.2",
    "--device",
    "cpu",
]


def test_sweep_end_to_end(image_folder, cache_dir, tmp_path):
    out = tmp_path / "sweep"
    assert (
        main(
            [
                "sweep",
                "--data",
                str(image_folder),
                "--cache-dir",
                str(cache_dir),
                "--out",
                str(out),
                "--pretrain-epochs",
                "1",
                "--labels-per-class",
                "2",
                "all",
                "--seeds",
                "2",
                "--steps",
                "3",
            ]
            + SMALL
        )
        == 0
    )
    result = json.loads((out / "sweep.json").read_text())
    assert result["budgets"] == [2, "all"] and result["seeds"] == [0, 1]
    methods = {
        "finetune",
        "linear_probe",
        "scratch",
        "joint_plain",
        "joint_gamma",
        "joint_fixmatch",
        "joint_flexmatch",
        "joint_freematch",
        "joint_finetune",
        "finetune_gamma",
        "finetune_fixmatch",
        "finetune_flexmatch",
        "finetune_freematch",
        "knn",
        "logistic_probe",
        "knn_random",
        "logistic_random",
    }
    assert set(result["methods"]) == methods
    # with every label the frozen-feature probes see the same data for every seed: measured once
    probes = {"knn", "logistic_probe", "knn_random", "logistic_random"}
    assert len(result["cells"]) == 2 * 17 + 2 * 13 + 4  # 17 methods, 13 of them trained (every seed at 'all')
    for c in result["cells"]:
        assert c["method"] in methods and 0 <= c["accuracy"] <= 1
        assert c["labelled_images"] == (6 if c["labels_per_class"] == 2 else 24)
        assert ("epoch_losses" in c) == (c["method"] not in probes)  # a probe trains no epochs
    # the three trained methods of one budget and seed see the same labelled subset
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert {(r["method"], r["labels_per_class"]) for r in rows} == {(m, b) for m in methods for b in ("2", "all")}
    assert all(int(r["n"]) == (1 if r["labels_per_class"] == "all" and r["method"] in probes else 2) for r in rows)
    assert (out / "figures" / "label_efficiency.png").is_file()
    assert (out / "checkpoints" / "autoencoder.pt").is_file()  # pretrained once, reused by every cell
    assert 'id="sweep"' in (out / "report.html").read_text()


def test_sweep_reuses_a_given_checkpoint(image_folder, cache_dir, tmp_path, capsys):
    pre = tmp_path / "pre"
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(image_folder),
                "--cache-dir",
                str(cache_dir),
                "--out",
                str(pre),
                "--pretrain-epochs",
                "1",
            ]
            + SMALL
        )
        == 0
    )
    out = tmp_path / "sweep"
    assert (
        main(
            [
                "sweep",
                "--checkpoint",
                str(pre / "checkpoints" / "autoencoder.pt"),
                "--data",
                str(image_folder),
                "--cache-dir",
                str(cache_dir),
                "--out",
                str(out),
                "--labels-per-class",
                "3",
                "--seeds",
                "1",
                "--steps",
                "2",
                "--batch-size",
                "8",
                "--val-fraction",
                "0.2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert not (out / "checkpoints" / "autoencoder.pt").exists()
    assert json.loads((out / "sweep.json").read_text())["autoencoder"].endswith("autoencoder.pt")
    page = (out / "report.html").read_text()  # the report shows what happened: no pretraining recipe it never ran
    assert "No pretraining in this run" in page and '<td class="l">pretrain_epochs</td>' not in page
    # the checkpoint decides the network: a model flag that says otherwise is one line, before any work
    ckpt = str(pre / "checkpoints" / "autoencoder.pt")
    base = ["sweep", "--checkpoint", ckpt, "--data", str(image_folder), "--cache-dir", str(cache_dir)]
    base += ["--labels-per-class", "3", "--seeds", "1", "--steps", "1"]
    code = main([*base, "--out", str(tmp_path / "other"), *SMALL[:-6], "--channels", "8", "32"])
    err = capsys.readouterr().err
    assert code == 2 and "--channels (the checkpoint's: (8, 16))" in err and err.count("\n") == 1, err
    assert not (tmp_path / "other").exists()
    # the same flags as the checkpoint's, and the classifier's own (--tta), are the user's to give
    assert main([*base, "--out", str(tmp_path / "same"), *SMALL, "--tta"]) == 0
    assert json.loads((tmp_path / "same" / "config.json").read_text())["tta"] is True


def test_budget_parsing_and_summary():
    assert parse_budgets(["25", "ALL", "3"]) == [25, None, 3]
    with pytest.raises(ConvaeError, match="integers > 0 or 'all'"):
        parse_budgets(["0"])
    rows = summarise([{"method": "knn", "labels_per_class": 5, "accuracy": a} for a in (0.5, 0.7)])
    assert rows[0]["mean"] == pytest.approx(0.6) and rows[0]["std"] == pytest.approx(0.1414213, rel=1e-5)


def test_sweep_measures_only_the_methods_asked_for(image_folder, cache_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert (
        main(
            [
                "sweep",
                "--data",
                str(image_folder),
                "--cache-dir",
                str(cache_dir),
                "--out",
                str(out),
                "--pretrain-epochs",
                "1",
                "--labels-per-class",
                "2",
                "--seeds",
                "2",
                "--steps",
                "2",
                "--methods",
                "finetune",
                "scratch",
            ]
            + SMALL
        )
        == 0
    )
    result = json.loads((out / "sweep.json").read_text())
    assert list(result["methods"]) == ["finetune", "scratch"]
    assert sorted((c["method"], c["seed"]) for c in result["cells"]) == [
        ("finetune", 0),
        ("finetune", 1),
        ("scratch", 0),
        ("scratch", 1),
    ]
    assert (out / "figures" / "label_efficiency.png").is_file()
    with pytest.raises(SystemExit) as stop:
        main(["sweep", "--data", str(image_folder), "--methods", "knn", "finetuned"])
    assert stop.value.code == 2 and "invalid choice: 'finetuned'" in capsys.readouterr().err


def test_a_sweep_cell_that_diverges_stops_with_one_line(image_folder, cache_dir, tmp_path, monkeypatch, capsys):
    """The cells train through the run's loop, so the NaN guard stops them too."""
    import convae.training.supervised

    real = convae.training.supervised.classification_loss
    monkeypatch.setattr(
        convae.training.supervised,
        "classification_loss",
        lambda smoothing: lambda model, batch, g=None: real(smoothing)(model, batch, g) * float("nan"),
    )
    assert (
        main(
            [
                "sweep",
                "--data",
                str(image_folder),
                "--cache-dir",
                str(cache_dir),
                "--out",
                str(tmp_path / "s"),
                "--pretrain-epochs",
                "1",
                "--labels-per-class",
                "2",
                "--seeds",
                "1",
                "--steps",
                "3",
                "--methods",
                "scratch",
            ]
            + SMALL
        )
        == 2
    )
    assert "fine-tuning loss became nan after 1 step(s) of a sweep cell" in capsys.readouterr().err


def test_cells_train_the_runs_recipe_or_a_fixed_step_count(image_folder, cache_dir, tmp_path, capsys, monkeypatch):
    """With --epoch-images a cell is the run's fine-tuning (its epochs); without it, 300 steps.
    Logged to a file (no progress bar), a cell says where it is and how long it has left."""
    import convae.outputs.rundir

    common = [
        "sweep",
        "--data",
        str(image_folder),
        "--cache-dir",
        str(cache_dir),
        "--pretrain-epochs",
        "1",
        "--labels-per-class",
        "2",
        "--seeds",
        "1",
        "--methods",
        "scratch",
    ] + SMALL
    assert main(common + ["--out", str(tmp_path / "fixed")]) == 0
    capsys.readouterr()
    monkeypatch.setattr(convae.outputs.rundir, "HEARTBEAT_SECONDS", 0.0)  # a progress line after every step
    assert (
        main(
            common
            + [
                "--out",
                str(tmp_path / "recipe"),
                "--epoch-images",
                "12",
                "--finetune-epochs",
                "2",
                "--augment",
                "--crop-padding",
                "2",
                "--jitter",
                "0.3",
            ]
        )
        == 0
    )
    beats = [line for line in capsys.readouterr().out.splitlines() if " left in cell " in line]
    assert beats[0].startswith("cell 2/class seed 0 scratch  epoch 1/2  step 1/")
    assert beats[-1].startswith("cell 2/class seed 0 scratch  epoch 2/2") and "about 0 s left" in beats[-1]
    fixed, recipe = (json.loads((tmp_path / d / "sweep.json").read_text()) for d in ("fixed", "recipe"))
    assert fixed["steps"] == 300 and recipe["steps"] is None and recipe["epoch_images"] == 12
    assert (recipe["augment"], recipe["crop_padding"], recipe["jitter"]) == (True, 2, 0.3)  # what trained
    losses = recipe["cells"][0]["epoch_losses"]  # one mean training loss per epoch, to see a cell converge
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)
    assert "every cell trains 300 steps" in (tmp_path / "fixed" / "report.html").read_text()
    assert "2 epochs of at least 12 images" in (tmp_path / "recipe" / "report.html").read_text()


def test_curves_record_the_accuracy_along_a_cell_without_changing_it(image_folder, cache_dir, tmp_path):
    """--curves evaluates the weight average along a cell; the cells train exactly as without it."""
    args = [
        "--data",
        str(image_folder),
        "--cache-dir",
        str(cache_dir),
        "--pretrain-epochs",
        "1",
        "--labels-per-class",
        "2",
        "--seeds",
        "1",
        "--finetune-epochs",
        "3",
        "--epoch-images",
        "6",
        "--ema",
        "0.5",
        "--methods",
        "finetune",
        "scratch",
        "knn",
    ] + SMALL
    assert main(["sweep", "--out", str(tmp_path / "plain"), *args]) == 0
    assert main(["sweep", "--out", str(tmp_path / "curves"), "--curves", *args]) == 0
    plain, curves = (json.loads((tmp_path / name / "sweep.json").read_text())["cells"] for name in ("plain", "curves"))
    for a, b in zip(plain, curves):
        assert a["method"] == b["method"] and a["accuracy"] == b["accuracy"]
        assert a.get("epoch_losses") == b.get("epoch_losses") and "curve" not in a
        if b["method"] == "knn":
            assert "curve" not in b  # a probe trains no epochs
        else:  # 6 labelled images, batch 8: one step an epoch
            assert [s for s, *_ in b["curve"]] == [1, 2, 3] and len(b["epoch_losses"]) == 3
            assert b["curve"][-1][1] == b["accuracy"] and all(0 <= v <= 1 for _, v, _ in b["curve"])
            seconds = [t for *_, t in b["curve"]]
            assert seconds == sorted(seconds) and seconds[0] > 0  # the training time at each point
    assert (tmp_path / "curves" / "figures" / "cell_curves.png").is_file()
    assert not (tmp_path / "plain" / "figures" / "cell_curves.png").exists()
    assert (tmp_path / "curves" / "figures" / "cell_curves_seconds.png").is_file()
    assert "along its steps (--curves)" in (tmp_path / "curves" / "report.html").read_text()
    # a longer cell of the same one-step epochs: an evaluation at each tenth of its steps, not after every epoch
    assert main(["sweep", "--out", str(tmp_path / "long"), "--curves", *args, "--steps", "30"]) == 0
    for c in json.loads((tmp_path / "long" / "sweep.json").read_text())["cells"]:
        if "curve" in c:
            assert [s for s, *_ in c["curve"]] == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]


def test_a_budget_above_a_class_size_is_marked_with_what_it_trained_on(image_folder, cache_dir, tmp_path, capsys):
    """Every class of the folder has 8 training images: 100 per class trains on 8 per class, and says so."""
    out = tmp_path / "sweep"
    args = ["sweep", "--data", str(image_folder), "--cache-dir", str(cache_dir), "--out", str(out)]
    args += ["--labels-per-class", "2", "100", "--seeds", "1", "--methods", "knn"] + SMALL
    assert main(args) == 0
    log = capsys.readouterr().out
    result = json.loads((out / "sweep.json").read_text())
    fewest = result["capped"]["100"]["fewest"]
    assert list(result["capped"]) == ["100"] and fewest < 100  # 2 per class is within every class
    (cell,) = [c for c in result["cells"] if c["labels_per_class"] == 100]
    assert result["capped"]["100"]["labelled_images"] == cell["labelled_images"] < 100 * len(result["classes"])
    assert f"warning: 100 labels per class: a class has only {fewest} training image(s)" in log
    assert "100/class*" in log and "2/class*" not in log and "every one of them is used" in log
    report = (out / "report.html").read_text()
    assert "100 / class*" in report and "every one of them is used" in report


def test_a_rule_the_checkpoints_network_breaks_is_not_advised_away_with_a_model_flag(image_folder, tmp_path, capsys):
    """A --skips network pretrained with the masked objective, swept with another objective: the rule is the
    network's, which the checkpoint decides, so the advice names the other flags, not --no-skips."""
    net = ["--arch", "blocks", "--channels", "8", "16", "--height", "16", "--width", "16", "--device", "cpu"]
    common = ["--data", str(image_folder), "--cache-dir", str(tmp_path / "cache")]
    args = ["pretrain", *common, "--out", str(tmp_path / "ae"), *net, "--skips", "--objective", "masked"]
    assert main([*args, "--pretrain-epochs", "1", "--batch-size", "8"]) == 0
    ckpt = str(tmp_path / "ae" / "checkpoints" / "autoencoder.pt")
    code = main(["sweep", *common, "--out", str(tmp_path / "s"), "--checkpoint", ckpt, "--objective", "denoise"])
    err = capsys.readouterr().err
    assert code == 2 and "with the checkpoint's network: --skips" in err and "--no-skips" not in err, err
