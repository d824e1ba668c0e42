"""report.html: structure, TensorBoard logs, and a real browser rendering the page."""

import json
import shutil

import pytest

from convae.cli import main

TINY = [
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
    "--pretrain-epochs",
    "2",
    "--finetune-epochs",
    "2",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from conftest import make_image_folder

    root = tmp_path_factory.mktemp("report")
    data = make_image_folder(root / "data")
    out = root / "run"
    assert main(["run", "--data", str(data), "--cache-dir", str(root / "cache"), "--out", str(out)] + TINY) == 0
    return out


def test_report_is_self_contained_and_complete(run_dir):
    page = (run_dir / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert 'src="data:image/png;base64,' in page and 'src="figures/' not in page  # images inlined
    figures = sorted(p.name for p in (run_dir / "figures").glob("*.png"))
    assert page.count("<img ") == len(figures) == 11
    for section in (
        "Training",
        "First-layer kernels",
        "Reconstructions",
        "Per-class accuracy",
        "The frozen representation",
        "Configuration",
    ):
        assert f"<h2>{section}</h2>" in page
    assert page.count('<tr><td class="l">class_') == 3  # one per-class row per class


def test_report_command_rewrites_the_page(run_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "report.html").unlink()
    assert main(["report", str(copy)]) == 0
    original = (run_dir / "report.html").read_text()
    assert (copy / "report.html").read_text() == original.replace("convae report: run", "convae report: copy")
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a convae run folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "setting, shown",
    [
        ({}, True),  # the lecture's recipe on a full validation split
        ({"pretrain_epochs": 1, "finetune_epochs": 1}, False),  # a short run is not set beside the lecture
        ({"num_images": 1000}, False),  # nor a run on a slice
    ],
)
def test_lecture_figures_stand_only_beside_the_lecture_setting(tmp_path, setting, shown):
    from convae.config import Config
    from convae.outputs.report import CIFAR10, build_report

    cfg = {**Config(data="cifar10").to_dict(), **{k: v for k, v in setting.items() if k != "num_images"}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    per_class = {c: {"accuracy": 0.5, "correct": 50, "total": 100} for c in CIFAR10}
    (tmp_path / "results.json").write_text(
        json.dumps(
            {
                "accuracy": 0.5,
                "num_images": setting.get("num_images", 5000),
                "classes": CIFAR10,
                "per_class": per_class,
                "eval_set": "validation split (10% of cifar10, seed 0)",
            }
        )
    )
    rec = {
        "phase": "finetune",
        "epoch": 5,
        "epochs": 5,
        "train_loss": 1.0,
        "val_loss": 1.0,
        "val_accuracy": 0.5,
        "seconds": 1.0,
        "images_per_s": 10.0,
    }
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rec) + "\n")
    page = build_report(tmp_path)
    assert ("55.72 %" in page and "lecture (test)" in page and "72.8 %" in page) == shown
    assert ("The lecture's figures are not shown beside this run" in page) != shown


def test_the_report_says_what_happened(run_dir):
    """Captions from the model and the set used, provenance, a short run flagged, text left-aligned."""
    from convae.outputs.report import build_report

    page = build_report(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    assert f"{cfg['channels'][0]} kernels of 3×3 RGB" in page and "64 kernels" not in page
    assert "images of the validation split (top)" in page and "accuracy on the validation split" in page
    prov = json.loads((run_dir / "results.json").read_text())["provenance"]
    assert {"convae", "torch", "date", "device", "device_name", "precision"} <= set(prov)
    assert f"torch {prov['torch']}" in page and f"precision {prov['precision']}" in page
    assert (
        "optimizer step(s), fewer than 200: the reconstructions" in page
    )  # a few steps: the figures show an early stage
    assert '<td class="l">cpu</td>' in page and '"cpu"' not in page  # config values without JSON quotes
    # the recipe is what differs from the defaults; the rest is in config.json
    main_table, rest = page.split('id="config"')[1].split('id="config-rest"')
    assert '<td class="l">channels</td>' in main_table and '<td class="l">upsample</td>' not in main_table
    assert "other keys: at their defaults, or for a training mode this run did not use" in page
    assert '<td class="l">upsample</td>' in rest  # folded, not gone
    assert '<td class="l">k=' in page  # the probe table's setting column is text, left-aligned


def test_tensorboard_logs_scalars_and_images(run_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert {"pretrain/train_loss", "pretrain/val_loss", "finetune/val_accuracy"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("finetune/val_accuracy")] == [1, 2]
    assert {"kernels/initial", "kernels/pretrained", "kernels/finetuned", "reconstructions"} <= set(tags["images"])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_the_report_renders_in_a_real_browser(run_dir, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    from PIL import Image, ImageStat

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto((run_dir / "report.html").resolve().as_uri())
        page.wait_for_load_state("load")
        widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
        assert len(widths) == 11 and all(w > 0 for w in widths)
        rows = page.eval_on_selector_all("#per-class tbody tr", "rows => rows.length")
        assert rows == 3
        # figures of many small numbers or thumbnails are never scaled down: legible at 100 % zoom
        scale = page.eval_on_selector_all("figure.native img", "imgs => imgs.map(i => i.clientWidth / i.naturalWidth)")
        assert len(scale) == 2 and all(s >= 0.99 for s in scale), scale
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    stat = ImageStat.Stat(Image.open(shot).convert("L"))
    assert stat.stddev[0] > 10  # not a blank page


def test_a_training_modes_knobs_are_shown_only_where_the_run_trained_with_it():
    from convae.outputs.report import _used

    assert _used("channels", {"joint": "off"}) and _used("joint", {"joint": "off"})
    assert not _used("joint_noise", {"joint": "off"}) and _used("joint_noise", {"joint": "gamma"})
    assert not _used("joint_noise", {"joint": "fixmatch"}) and _used("unlabelled_ratio", {"joint": "fixmatch"})
    assert _used("threshold_momentum", {"joint": "freematch"}) and not _used("threshold_momentum", {"joint": "plain"})
    assert _used("joint_weight", {"joint": "plain"}) and not _used("joint_weight", {"joint": "off"})
