"""The CLI end to end, as a user runs it, on tiny generated data."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import convae
from conftest import make_image_folder
from convae.cli import main
from convae.models import Classifier

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
PRETRAIN = SMALL + ["--pretrain-epochs", "2"]
TINY = PRETRAIN + ["--finetune-epochs", "3"]

FIGURES = {
    "pretrain_loss.png",
    "finetune_loss.png",
    "finetune_accuracy.png",
    "kernels_initial.png",
    "kernels_pretrained.png",
    "kernels_pretrain_delta.png",
    "kernels_finetuned.png",
    "kernels_finetune_delta.png",
    "reconstructions.png",
    "confusion_matrix.png",
    "embedding_map.png",
}


def _png_ok(path):
    with Image.open(path) as im:
        im.load()
        return im.size[0] > 50 and im.size[1] > 50


def test_run_writes_the_whole_run_folder(image_folder, cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--data", str(image_folder), "--cache-dir", str(cache_dir), "--out", str(out)] + TINY) == 0
    printed = capsys.readouterr().out
    # a log file (no terminal, no progress bars) still says what each long stage is doing, before it starts
    for stage in ("measuring the frozen representation: features of", "drawing the t-SNE map of"):
        assert stage in printed

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["batch_size"] == 8 and cfg["channels"] == [8, 16] and cfg["data"] == str(image_folder)
    assert "out" not in cfg and cfg["preset"] == "seed"  # the folder is where config.json is

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in lines] == [
        ("pretrain", 1),
        ("pretrain", 2),
        ("finetune", 1),
        ("finetune", 2),
        ("finetune", 3),
    ]
    for r in lines:
        assert {"train_loss", "seconds", "images_per_s", "val_loss"} <= set(r)
        assert r["train_loss"] > 0 and r["seconds"] > 0 and r["images_per_s"] > 0
    assert all("val_accuracy" in r for r in lines if r["phase"] == "finetune")

    results = json.loads((out / "results.json").read_text())
    assert results["classes"] == ["class_0", "class_1", "class_2"]
    assert results["num_images"] == 6 and sum(map(sum, results["confusion_matrix"])) == 6
    assert results["accuracy"] == lines[-1]["val_accuracy"]
    assert set(results["per_class"]) == set(results["classes"])

    for name, kind in (("autoencoder", "autoencoder"), ("classifier", "classifier")):
        ckpt = torch.load(out / "checkpoints" / f"{name}.pt", weights_only=True)
        assert ckpt["kind"] == kind and ckpt["config"]["channels"] == [8, 16] and "model" in ckpt

    # the classifier's encoder is the autoencoder's encoder: the same tensors, transferred tensor for
    # tensor, then changed by fine-tuning
    ae = torch.load(out / "checkpoints" / "autoencoder.pt", weights_only=True)["model"]
    clf = torch.load(out / "checkpoints" / "classifier.pt", weights_only=True)["model"]
    enc_ae = {k: v for k, v in ae.items() if k.startswith("encoder.")}
    enc_clf = {k: v for k, v in clf.items() if k.startswith("encoder.")}
    assert enc_ae.keys() == enc_clf.keys() and all(enc_ae[k].shape == enc_clf[k].shape for k in enc_ae)
    transferred = Classifier.from_autoencoder(convae.load(out / "checkpoints" / "autoencoder.pt"), 3).state_dict()
    assert all(torch.equal(transferred[k], enc_ae[k]) for k in enc_ae)
    assert not torch.equal(enc_clf["encoder.conv.0.weight"], enc_ae["encoder.conv.0.weight"])  # fine-tuned

    rep = results["representation"]
    assert 0 <= rep["knn_accuracy"] <= 1 and 0 <= rep["linear_probe_accuracy"] <= 1 and rep["knn"]["k"] == 24
    assert (out / "report.html").is_file()

    assert {p.name for p in (out / "figures").iterdir()} == FIGURES
    assert all(_png_ok(out / "figures" / f) for f in FIGURES)

    assert "pretrain  epoch 1/2" in printed and "finetune  epoch 3/3" in printed
    assert "class_2" in printed and "overall" in printed


def test_frozen_encoder_keeps_the_pretrained_weights(image_folder, cache_dir, tmp_path):
    out = tmp_path / "probe"
    assert (
        main(
            ["run", "--data", str(image_folder), "--cache-dir", str(cache_dir), "--out", str(out), "--freeze-encoder"]
            + TINY
        )
        == 0
    )
    ae = torch.load(out / "checkpoints" / "autoencoder.pt", weights_only=True)["model"]
    clf = torch.load(out / "checkpoints" / "classifier.pt", weights_only=True)["model"]
    for k, v in clf.items():
        if k.startswith("encoder."):
            assert torch.equal(v, ae[k]), k  # the classifier's encoder IS the autoencoder's


def test_pretrain_then_finetune_then_evaluate(image_folder, cache_dir, tmp_path, capsys):
    common = ["--cache-dir", str(cache_dir)]
    assert (
        main(
            ["pretrain", "--data", str(image_folder), "--out", str(tmp_path / "pre")]
            + common
            + SMALL
            + ["--pretrain-epochs", "1"]
        )
        == 0
    )
    ae = tmp_path / "pre" / "checkpoints" / "autoencoder.pt"
    assert ae.is_file() and not (tmp_path / "pre" / "checkpoints" / "classifier.pt").exists()
    pre = json.loads((tmp_path / "pre" / "results.json").read_text())  # what ran, and that it finished
    assert pre["phase"] == "pretrain" and pre["precision"] == "fp32" and "finished" in pre and "per_class" not in pre

    assert (
        main(
            [
                "finetune",
                "--checkpoint",
                str(ae),
                "--data",
                str(image_folder),
                "--out",
                str(tmp_path / "ft"),
                "--finetune-epochs",
                "2",
                "--batch-size",
                "8",
                "--labels-per-class",
                "4",
                "--device",
                "cpu",
            ]
            + common
        )
        == 0
    )
    ft_cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert ft_cfg["channels"] == [8, 16] and ft_cfg["height"] == 16  # the model came from the checkpoint
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert results["labelled_images"] == 12

    clf = tmp_path / "ft" / "checkpoints" / "classifier.pt"
    capsys.readouterr()
    assert (
        main(
            ["evaluate", "--checkpoint", str(clf), "--data", str(image_folder), "--out", str(tmp_path / "ev")] + common
        )
        == 0
    )
    ev = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert ev["num_images"] == 30 and (tmp_path / "ev" / "figures" / "confusion_matrix.png").is_file()
    printed = capsys.readouterr().out
    assert "overall" in printed and f"wrote {tmp_path / 'ev'}: results.json, report.html" in printed
    assert not (tmp_path / "ev" / "checkpoints").exists()  # nothing trained, no empty folder
    ev_cfg = json.loads((tmp_path / "ev" / "config.json").read_text())
    assert ev_cfg["command"] == "evaluate" and ev_cfg["checkpoint"] == str(clf)
    assert "pretrain_epochs" not in ev_cfg and "lr" not in ev_cfg  # no training defaults it never used


def test_scratch_init_skips_pretraining(image_folder, cache_dir, tmp_path):
    out = tmp_path / "scratch"
    assert (
        main(
            ["run", "--data", str(image_folder), "--cache-dir", str(cache_dir), "--out", str(out), "--init", "scratch"]
            + TINY
        )
        == 0
    )
    assert not (out / "checkpoints" / "autoencoder.pt").exists()
    phases = {json.loads(x)["phase"] for x in (out / "metrics.jsonl").read_text().splitlines()}
    assert phases == {"finetune"}


def test_seeded_cpu_runs_repeat_exactly(image_folder, cache_dir, tmp_path):
    args = ["run", "--data", str(image_folder), "--cache-dir", str(cache_dir)] + TINY
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    a = torch.load(tmp_path / "a" / "checkpoints" / "classifier.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoints" / "classifier.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_both_placements_train_the_same_weights(image_folder, cache_dir, tmp_path):
    """Batches read from the cache file (host, the CPU's auto) and sliced from one in-memory tensor
    (device) are the same batches: the runs end with the same weights."""
    args = ["run", "--data", str(image_folder), "--cache-dir", str(cache_dir)] + TINY
    assert main(args + ["--out", str(tmp_path / "h"), "--placement", "host"]) == 0
    assert main(args + ["--out", str(tmp_path / "d"), "--placement", "device"]) == 0
    h = torch.load(tmp_path / "h" / "checkpoints" / "classifier.pt", weights_only=True)["model"]
    d = torch.load(tmp_path / "d" / "checkpoints" / "classifier.pt", weights_only=True)["model"]
    assert all(torch.equal(h[k], d[k]) for k in h)
    assert json.loads((tmp_path / "d" / "config.json").read_text())["placement"] == "device"


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--data", "/no/such/folder"], "data source not found: /no/such/folder"),
        (["run", "--batch-size", "0"], "batch_size must be an integer > 0"),
        (["run", "--val-fraction", "1.5"], r"val_fraction must be in (0, 1)"),
        (["finetune", "--data", "DATA"], "needs an autoencoder checkpoint; pass --checkpoint AE.pt"),
        (["evaluate", "--checkpoint", "/no/such.pt", "--data", "DATA"], "checkpoint not found"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(args, message, image_folder, cache_dir, capsys):
    args = [str(image_folder) if a == "DATA" else a for a in args] + ["--cache-dir", str(cache_dir)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("convae: error: ") and message in err


def test_unlabelled_data_cannot_be_fine_tuned(tmp_path, cache_dir, capsys):
    root = make_image_folder(tmp_path / "u", labelled=False)
    assert main(["run", "--data", str(root), "--cache-dir", str(cache_dir), "--out", str(tmp_path / "r")] + TINY) == 2
    assert "fine-tuning needs labelled data" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything was written
    # ... but pretraining on it is fine
    assert (
        main(["pretrain", "--data", str(root), "--cache-dir", str(cache_dir), "--out", str(tmp_path / "p")] + PRETRAIN)
        == 0
    )


def test_an_existing_run_is_never_overwritten(image_folder, cache_dir, tmp_path, capsys):
    out = tmp_path / "old"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert main(["run", "--data", str(image_folder), "--cache-dir", str(cache_dir), "--out", str(out)] + TINY) == 2
    assert "already holds files" in capsys.readouterr().err
    assert (out / "config.json").read_text() == "{}"


def test_checkpoint_of_another_architecture(image_folder, cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["pretrain", "--data", str(image_folder), "--cache-dir", str(cache_dir), "--out", str(out)] + PRETRAIN)
        == 0
    )
    path = out / "checkpoints" / "autoencoder.pt"
    ck = torch.load(path, weights_only=True)
    ck["config"]["channels"] = [8, 32]
    torch.save(ck, path)
    capsys.readouterr()
    assert (
        main(
            [
                "finetune",
                "--checkpoint",
                str(path),
                "--data",
                str(image_folder),
                "--cache-dir",
                str(cache_dir),
                "--out",
                str(tmp_path / "ft"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "does not match the model architecture" in err and "encoder.conv.2.weight" in err


def test_console_script_end_to_end(image_folder, cache_dir, tmp_path, capsys):
    """The installed command, in a real process: help, version, a run and a user mistake."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    exe = [sys.executable, "-m", "convae"]
    version = subprocess.run(exe + ["--version"], capture_output=True, text=True, env=env)
    assert version.returncode == 0 and version.stdout.startswith("convae ")
    h = subprocess.run(exe + ["run", "--help"], capture_output=True, text=True, env=env)
    assert h.returncode == 0 and "--preset" in h.stdout and "--config" in h.stdout
    for cmd in ("pretrain", "finetune", "sweep"):  # the same parser code: in this process (a start costs seconds)
        with pytest.raises(SystemExit) as stop:
            main([cmd, "--help"])
        text = capsys.readouterr().out
        assert stop.value.code == 0 and "--preset" in text and "--config" in text
    out = tmp_path / "cli"
    done = subprocess.run(
        exe + ["run", "--data", str(image_folder), "--cache-dir", str(cache_dir), "--out", str(out)] + TINY,
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert (out / "results.json").is_file() and "per-class accuracy" in done.stdout
    bad = subprocess.run(
        exe + ["run", "--data", str(tmp_path / "missing"), "--cache-dir", str(cache_dir)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        f"convae: error: data source not found: {tmp_path / 'missing'} (expected cifar10, a folder or an archive)"
    ]


def test_a_single_class_cannot_be_fine_tuned(tmp_path, cache_dir, capsys):
    root = make_image_folder(tmp_path / "one", classes=1)
    assert main(["run", "--data", str(root), "--cache-dir", str(cache_dir), "--out", str(tmp_path / "r")] + TINY) == 2
    assert "1 class folder(s): a classifier needs at least 2" in capsys.readouterr().err


def test_help_states_each_commands_own_batch_size_default(capsys):
    for command, expected in (
        ("sweep", "default 256 for the sweep"),
        ("encode", "default 1024"),
        ("evaluate", "default 1024"),
    ):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"--batch-size N images per {'step' if command == 'sweep' else 'forward pass'} ({expected})" in text
        if command == "evaluate":  # the architecture comes from the checkpoint: no recipe to choose
            assert "--preset" not in text and "--config" not in text and "random-weights baseline" in text


@pytest.mark.parametrize(
    "args, hint",
    [
        (["run", "--epochs", "3"], "(did you mean --finetune-epochs or --pretrain-epochs?)"),
        (["sweep", "--epochs", "3"], "(did you mean --steps?)"),
        (["pretrain", "--latentdim", "3"], "(did you mean --latent-dim?)"),
        (["run", "--channel", "8", "16"], "(did you mean --channels?)"),  # no prefix matching
    ],
)
def test_unknown_flags_name_the_flags_meant(args, hint, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"convae {args[0]}: error: unrecognized arguments" in err and hint in err


def test_unknown_config_keys_name_the_key_meant(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("latentdim: 64\n")
    assert main(["pretrain", "--config", str(cfg)]) == 2
    assert "unknown config key(s): latentdim (did you mean latent_dim?)" in capsys.readouterr().err


def test_a_run_config_reruns_as_a_config_file(image_folder, cache_dir, tmp_path, monkeypatch, capsys):
    first = tmp_path / "first"
    assert (
        main(
            ["pretrain", "--data", str(image_folder), "--cache-dir", str(cache_dir), "--out", str(first)]
            + SMALL
            + ["--pretrain-epochs", "1"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    ckpt = first / "checkpoints" / "autoencoder.pt"
    assert f"autoencoder: {ckpt}" in printed and f"convae finetune --checkpoint {ckpt}" in printed  # the next step
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--config", str(first / "config.json")]) == 0  # a new timestamped folder
    (again,) = (tmp_path / "runs").iterdir()
    a, b = (json.loads((d / "config.json").read_text()) for d in (first, again))
    assert a == b


def test_the_best_epochs_classifier_is_kept(image_folder, cache_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--data", str(image_folder), "--cache-dir", str(cache_dir), "--out", str(out)] + TINY) == 0
    results = json.loads((out / "results.json").read_text())
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    accs = [m["val_accuracy"] for m in metrics if m["phase"] == "finetune"]
    best = results["best"]
    assert best["epoch"] == accs.index(max(accs)) + 1 and best["val_accuracy"] == max(accs)
    assert best["checkpoint"] == "checkpoints/classifier_best.pt" and best["selected_on"].startswith("validation")
    from convae.data import DeviceBatches, load_source, split_indices
    from convae.evaluation.metrics import evaluate_classifier
    from convae.outputs.checkpoint import load_checkpoint

    clf, _ = load_checkpoint(out / "checkpoints" / "classifier_best.pt", kind="classifier")
    cfg = json.loads((out / "config.json").read_text())
    ds = load_source(str(image_folder), 3, cfg["height"], cfg["width"], cache_dir, log=lambda m: None)
    _, val = split_indices(ds.labels, len(ds), cfg["val_fraction"], cfg["seed"])
    r = evaluate_classifier(clf, DeviceBatches(ds.images[val], ds.labels[val], 64), 3)
    assert r["accuracy"] == best["val_accuracy"]  # the file holds the weights of that epoch


def test_the_stl10_case_unlabelled_pretraining_then_a_small_labelled_set_at_64x64(tmp_path, cache_dir):
    """The README's STL-10-style commands at 64x64 with four stages: pretrain on unlabelled
    images, fine-tune from that checkpoint on a small labelled folder, evaluate on a test folder."""
    unlabelled = make_image_folder(tmp_path / "unlabelled", classes=3, per_class=8, size=(64, 64), labelled=False)
    labelled = make_image_folder(tmp_path / "labelled", classes=3, per_class=3, size=(64, 64), seed=1)
    test = make_image_folder(tmp_path / "test", classes=3, per_class=2, size=(64, 64), seed=2)
    arch = [
        "--height",
        "64",
        "--width",
        "64",
        "--channels",
        "8",
        "8",
        "16",
        "16",
        "--latent-dim",
        "32",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--cache-dir",
        str(cache_dir),
    ]
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(unlabelled),
                "--out",
                str(tmp_path / "pre"),
                "--pretrain-epochs",
                "1",
                "--preset",
                "denoise",
            ]
            + arch
        )
        == 0
    )
    ckpt = tmp_path / "pre" / "checkpoints" / "autoencoder.pt"
    assert (
        main(
            [
                "finetune",
                "--checkpoint",
                str(ckpt),
                "--data",
                str(labelled),
                "--test-data",
                str(test),
                "--out",
                str(tmp_path / "ft"),
                "--finetune-epochs",
                "1",
                "--preset",
                "denoise",
                "--batch-size",
                "4",
                "--device",
                "cpu",
                "--cache-dir",
                str(cache_dir),
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert results["num_images"] == 6 and results["labelled_images"] == 9 and "finished" in results
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert (cfg["height"], cfg["width"], cfg["channels"]) == (64, 64, [8, 8, 16, 16])  # from the checkpoint


def test_the_patches_preset_end_to_end(image_folder, cache_dir, tmp_path, capsys):
    """One wide conv learned on whitened patches: pretrain, transfer, fine-tune, probe, figures."""
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "--preset",
                "patches",
                "--data",
                str(image_folder),
                "--cache-dir",
                str(cache_dir),
                "--out",
                str(out),
                "--height",
                "16",
                "--width",
                "16",
                "--channels",
                "8",
                "--kernel-size",
                "4",
                "--batch-size",
                "8",
                "--pretrain-epochs",
                "2",
                "--finetune-epochs",
                "2",
                "--val-fraction",
                "0.2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "whitening fitted" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["arch"], cfg["whiten"], cfg["objective"], cfg["channels"]) == ("patch", True, "patches", [8])
    ae, clf = (convae.load(out / "checkpoints" / f"{n}.pt") for n in ("autoencoder", "classifier"))
    assert not torch.equal(ae.encoder.whitening, torch.eye(48))  # fitted, saved, and rebuilt from the file
    assert torch.equal(clf.encoder.whitening, ae.encoder.whitening)  # transferred with the filters
    assert clf.head.in_features == 32  # 4 quadrants x 8 filters
    rep = json.loads((out / "results.json").read_text())["representation"]
    assert rep["features"] == "pooled" and set(rep["random"]) == {"knn_accuracy", "linear_probe_accuracy"}
    assert all(_png_ok(out / "figures" / f) for f in ("kernels_pretrained.png", "reconstructions.png"))


def test_a_run_logged_to_a_file_says_where_it_is_between_epochs(image_folder, cache_dir, tmp_path, capsys, monkeypatch):
    """No progress bar in a log file: a line with the step and the phase's time left instead."""
    import convae.outputs.rundir

    monkeypatch.setattr(convae.outputs.rundir, "HEARTBEAT_SECONDS", 0.0)
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
                "2",
                "--finetune-epochs",
                "1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if " left in " in line]
    pre = [line for line in lines if line.endswith("left in pretrain")]
    steps = int(pre[0].split("step 1/")[1].split()[0])  # steps per pretraining epoch
    assert len(pre) == 2 * steps and pre[-1].startswith(f"pretrain  epoch 2/2  step {steps}/{steps}  about 0 s left")
    assert lines[len(pre) :] and all(line.endswith("left in finetune") for line in lines[len(pre) :])


def test_a_network_whose_last_map_is_1x1_trains_and_its_last_image_joins_the_batch_before(
    image_folder, cache_dir, tmp_path, capsys, monkeypatch
):
    """The blocks network on 16x16 images ends on a 1x1 map: its size is measured in eval mode (a
    training-mode batch norm refuses one image there), and an epoch of 23 + 1 images trains one
    step of 24 instead of failing on a batch of one."""
    common = [
        "pretrain",
        "--preset",
        "blocks",
        "--data",
        str(image_folder),
        "--cache-dir",
        str(cache_dir),
        "--height",
        "16",
        "--width",
        "16",
        "--val-fraction",
        "0.2",
        "--pretrain-epochs",
        "1",
        "--device",
        "cpu",
    ]
    assert main(common + ["--out", str(tmp_path / "ok"), "--batch-size", "8"]) == 0  # 24 images: 3 batches of 8
    assert (tmp_path / "ok" / "checkpoints" / "autoencoder.pt").exists()
    capsys.readouterr()
    import convae.outputs.rundir

    monkeypatch.setattr(convae.outputs.rundir, "HEARTBEAT_SECONDS", 0.0)  # a progress line after every step
    assert main(common + ["--out", str(tmp_path / "one"), "--batch-size", "23"]) == 0  # 23 + 1: one step of 24
    beats = [line for line in capsys.readouterr().out.splitlines() if line.endswith("left in pretrain")]
    assert beats and all("step 1/1 " in line for line in beats)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["run", "--preset", "sed"], "invalid choice: 'sed' (choose from 'seed',"),
        (["run", "--arch", "blok"], "(did you mean blocks?)"),
        (["run", "--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
        (["sweep", "--methods", "knn", "finetuned"], "(did you mean finetune?)"),
        (["run", "--data"], "argument --data: expected one argument"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_a_bad_choice_or_value_is_one_line_with_a_suggestion_not_the_usage_block(argv, says, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert len(err.strip().splitlines()) == 1 and says in err and "usage:" not in err
    assert err.rstrip().endswith("--help")
