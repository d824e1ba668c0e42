import json

import pytest

from convae.config import PRESETS, Config, build_config
from convae.utils.errors import ConvaeError


def test_seed_preset_is_the_lecture_recipe():
    cfg = build_config("seed")
    assert (cfg.pretrain_epochs, cfg.finetune_epochs, cfg.batch_size, cfg.lr) == (5, 5, 2000, 1e-3)
    assert (cfg.optimizer, cfg.schedule, cfg.upsample) == ("adam", "none", "bilinear")
    assert cfg.channels == (64, 128, 128) and cfg.latent_dim == 1024 and (cfg.height, cfg.width) == (32, 32)


def test_precedence_defaults_preset_file_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("batch-size: 64\nlr: 1e-2\nfinetune_epochs: 3\n")
    cfg = build_config("long", f, {"batch_size": 32})
    assert cfg.batch_size == 32  # flag beats file
    assert cfg.lr == 0.01  # file beats default; YAML's "1e-2" string is read as a number
    assert cfg.finetune_epochs == 3  # file beats preset
    assert cfg.pretrain_epochs == PRESETS["long"]["pretrain_epochs"]  # preset beats default


def test_json_config_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"channels": [8, 16], "upsample": "nearest"}))
    cfg = build_config("seed", f)
    assert cfg.channels == (8, 16) and cfg.upsample == "nearest"


@pytest.mark.parametrize(
    "content, match",
    [
        ("bogus: 1\n", "unknown config key"),
        ("- a list\n", "mapping"),
        ("lr: [\n", "could not be parsed"),
    ],
)
def test_bad_config_files(tmp_path, content, match):
    f = tmp_path / "c.yaml"
    f.write_text(content)
    with pytest.raises(ConvaeError, match=match):
        build_config("seed", f)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"pretrain_epochs": -1}, "pretrain_epochs must be an integer >= 0"),
        ({"batch_size": 0}, "batch_size must be an integer > 0"),
        ({"lr": 0}, "lr must be a number > 0"),
        ({"val_fraction": 1.0}, r"val_fraction must be in \(0, 1\)"),
        ({"val_fraction": 0}, r"val_fraction must be in \(0, 1\)"),
        ({"labels_per_class": 0}, "labels_per_class must be an integer > 0"),
        ({"upsample": "cubic"}, "upsample must be one of bilinear, nearest, transposed, unpool"),
        ({"optimizer": "lbfgs"}, "optimizer must be one of"),
        ({"height": 4}, "too small for 3 encoder stages: height and width must be >= 8"),
        ({"channels": []}, "channels must be a list of 1 to 8 integers > 0"),
        ({"nonsense": 1}, "unknown config key"),
    ],
)
def test_invalid_values_are_refused_with_the_valid_range(overrides, match):
    with pytest.raises(ConvaeError, match=match):
        build_config("seed", None, overrides)


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConvaeError, match="unknown preset 'nope'; choose one of: seed"):
        build_config("nope")
    with pytest.raises(ConvaeError, match="config file not found"):
        build_config("seed", tmp_path / "none.yaml")


def test_config_round_trips_through_json():
    cfg = build_config("seed", None, {"channels": [8, 16, 16]})
    again = build_config(
        "seed", None, {k: v for k, v in json.loads(json.dumps(cfg.to_dict())).items() if k != "preset"}
    )
    assert again == cfg and isinstance(cfg, Config)


def test_a_config_is_frozen_and_every_new_one_is_validated():
    import dataclasses

    cfg = build_config("seed")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 0.5
    assert dataclasses.replace(cfg, lr=0.5).lr == 0.5 and cfg.lr == 1e-3
    with pytest.raises(ConvaeError, match="lr must be a number > 0"):
        dataclasses.replace(cfg, lr=-1.0)
    with pytest.raises(ConvaeError, match="objective must be one of reconstruct, denoise, masked, sparse"):
        build_config("seed", overrides={"objective": "contrastive"})
    with pytest.raises(ConvaeError, match=r"mask_ratio must be in \(0, 1\)"):
        build_config("seed", overrides={"mask_ratio": 1.0})


def test_the_denoise_preset_keeps_the_lecture_widths_and_changes_only_the_recipe():
    d, seed = build_config("denoise"), build_config("seed")
    assert d.model_config().channels == seed.model_config().channels and d.latent_dim == seed.latent_dim
    assert (d.objective, d.norm, d.augment, d.probe_features) == ("denoise", "batch", True, "pooled")
    assert seed.objective == "reconstruct" and not seed.augment and seed.norm == "none"


def test_every_knob_is_declared_once_with_its_flag_and_its_rule():
    """The flags, their help and every value check come from the Config fields themselves."""
    from convae.cli import build_parser, config_flags
    from convae.utils.knobs import knobs

    flags = config_flags()
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["run"].format_help().split())
    for f in knobs(Config):
        if f.metadata["flag"]:
            flag = "--" + f.name.replace("_", "-")
            assert flag in flags and flags[flag]["help"] and flag in help_text
        with pytest.raises(ConvaeError, match=f"^{f.name} must be"):
            build_config("seed", None, {f.name: []})  # a list is no valid value of any knob but the widths'
    assert set(config_flags()) >= {"--arch", "--objective", "--whiten", "--patches-per-image", "--placement"}


@pytest.mark.parametrize("word, value", [("off", "off"), ("plain", "plain"), ("no", "off")])
def test_yaml_reads_off_as_false_and_a_choice_takes_the_word_back(tmp_path, word, value):
    """The documented ``joint: off`` in a YAML file (YAML 1.1 reads off and no as false) is the choice off."""
    path = tmp_path / "c.yaml"
    path.write_text(f"joint: {word}\n")
    assert build_config("seed", path).joint == value


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"cutout": 32}, "--cutout 32 would erase every 32x32 image whole"),
        ({"cutout": 20, "height": 16, "width": 24}, "must be below 16"),
        ({"jitter": 1e6}, "jitter must be in \\[0, 1\\)"),
        ({"jitter": 1.0}, "jitter must be in \\[0, 1\\)"),
        ({"mask_ratio": 0.0}, "mask_ratio must be in \\(0, 1\\)"),
        ({"joint_noise": 1e30}, "joint_noise must be in \\[0, 10\\)"),
        ({"joint_weight": 1e30}, "joint_weight must be in \\[0, 1000\\)"),
        ({"reconstruction_weight": 1e4}, "reconstruction_weight must be in \\[0, 1000\\)"),
    ],
)
def test_settings_that_destroy_the_data_are_refused(overrides, match):
    with pytest.raises(ConvaeError, match=match):
        build_config("seed", None, overrides)
    inside = {"cutout": 31, "jitter": 0.5, "mask_ratio": 0.05, "joint_noise": 9.0}
    ok = {k: {**inside, "joint_weight": 999.0, "reconstruction_weight": 999.0}.get(k, v) for k, v in overrides.items()}
    build_config("seed", None, {**ok, "height": 32, "width": 32})  # just inside the bounds: accepted
