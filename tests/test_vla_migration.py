"""Older VLA checkpoints and configs: one migration (configuration_vla.migrate_vla_config), checked on
checkpoints stored as an earlier version wrote them (tests/data/vla_b11fa8d_*, made by
tests/data/make_vla_b11fa8d.py at commit b11fa8d); removed options accepted at their off values and
refused otherwise; the tiny preset is the recipe in config/train/vla_tiny.yaml."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch
import yaml

from lapa_core.policy import PolicyLoadError, load_policy
from lapa_training.checkpoint import CheckpointError
from lapa_training.vla import VLAConfig, VLAModel, migrate_vla_config
from lapa_training.vla.configuration_vla import REMOVED_KEYS, SAVED_BEFORE_KEY
from lapa_training.vla.train_vla import TrainingError, vla_config_from_dict

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
EXPECTED = json.loads((DATA / "vla_b11fa8d_expected.json").read_text())
IMAGE = np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8)  # as EXPECTED["image"] says


def rewrite_config(path: Path, **changes) -> None:
    """Change a stored checkpoint's config.json (None deletes a key), keeping checkpoint.json's record of it."""
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    meta = json.loads((path / "checkpoint.json").read_text())
    meta["files"]["config.json"] = (path / "config.json").stat().st_size
    (path / "checkpoint.json").write_text(json.dumps(meta))


# ---------------------------------------------------------------------------------------------
# the stored checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["recipe", "bins"])
def test_b11fa8d_checkpoints_load_and_act_as_they_did(name):
    path = DATA / f"vla_b11fa8d_{name}"
    saved = json.loads((path / "config.json").read_text())
    assert {"spatial_readout", "action_decoding", "expectation_loss"} <= set(saved)  # the old format
    assert IMAGE.shape == (48, 40, 3) and EXPECTED["image"].startswith("np.random.default_rng(1)")
    expected = EXPECTED[name]

    model = VLAModel.from_pretrained(path).eval()
    assert not {"spatial_readout", "action_decoding", "expectation_loss"} & set(model.config.to_dict())
    assert model.load_report.new == [] and model.load_report.dropped == []
    with torch.no_grad():
        out = model(model.preprocess_images(IMAGE), *model.tokenize([EXPECTED["instruction"]]))
        actions = model.decode_actions(out)
    # the same numbers as the code that wrote it, to float32 rounding: CPUs with other vector units
    # take other kernel paths and differ in the last bits (3e-8 seen); a wrong weight moves them by far more
    np.testing.assert_allclose(out.logits[0].numpy(), np.asarray(expected["logits"], dtype=np.float32),
                               rtol=1e-5, atol=1e-6)
    assert out.predictions[0].tolist() == expected["predictions"]
    np.testing.assert_allclose(actions[0], np.asarray(expected["actions"], dtype=np.float32), rtol=1e-5, atol=1e-6)

    policy = load_policy(path)
    policy.reset(EXPECTED["instruction"])
    step = policy.act(IMAGE, EXPECTED["instruction"])
    np.testing.assert_allclose(step.delta, np.asarray(expected["actions"][0], dtype=np.float32), rtol=1e-5, atol=1e-6)

    # finetuning reads it through the same migration
    ft = VLAModel.for_finetuning(path, num_bins=8)
    assert ft.config.action_head_type == model.config.action_head_type and "action_head.net.3.weight" in ft.load_report.new
    if name == "bins":
        kept = VLAModel.for_finetuning(path, keep_head=True)
        assert torch.equal(kept.action_head.net[3].weight, model.action_head.net[3].weight)


def test_a_checkpoint_asking_for_a_removed_option_is_refused_in_one_line(tmp_path):
    for key, value in (("spatial_readout", 16), ("expectation_loss", 2.0), ("action_decoding", "expectation")):
        path = tmp_path / key
        shutil.copytree(DATA / "vla_b11fa8d_bins", path)
        rewrite_config(path, **{key: value})
        with pytest.raises(CheckpointError, match=f"{key} was removed") as e:
            VLAModel.from_pretrained(path)
        assert "\n" not in str(e.value)
        with pytest.raises(PolicyLoadError, match=f"{key} was removed"):
            load_policy(path)
        with pytest.raises(ValueError, match=f"{key} was removed"):
            VLAModel.for_finetuning(path)


def test_a_checkpoint_from_before_a_key_keeps_the_behaviour_it_was_trained_with(tmp_path):
    path = tmp_path / "older"
    shutil.copytree(DATA / "vla_b11fa8d_bins", path)
    rewrite_config(path, spatial_readout=None, action_decoding=None, expectation_loss=None, text_first=None,
                   keypoints=None, action_head_type=None, vision_film=None, zero_init_head=None,
                   action_spread_floor=None)
    model = VLAModel.from_pretrained(path)
    for key, value in SAVED_BEFORE_KEY.items():
        got = model.config.to_dict()[key]
        assert got == value, (key, got)
    np.testing.assert_allclose(model.bin_spread.numpy(), model.action_bins.spreads(), rtol=1e-6)  # own spreads


# ---------------------------------------------------------------------------------------------
# the migration function and the config entry points
# ---------------------------------------------------------------------------------------------
def test_migrate_vla_config_drops_off_values_fills_missing_keys_and_refuses_removed_behaviour():
    saved = {"policy_type": "lapa_vla", "backbones": {"vision": {}, "language": {}}, "num_bins": 16,
             "spatial_readout": 0, "action_decoding": "argmax", "expectation_loss": 0.0}
    migrated = migrate_vla_config(saved)
    assert "spatial_readout" in saved  # its argument is left alone
    assert migrated["policy_type"] == "lapa_vla" and migrated["backbones"] == saved["backbones"]
    assert not set(REMOVED_KEYS) & set(migrated)
    assert {k: migrated[k] for k in SAVED_BEFORE_KEY} == SAVED_BEFORE_KEY
    assert migrated["num_bins"] == 16
    present = migrate_vla_config({"text_first": True, "action_spread_floor": [0.001, 0.005]})
    assert present["text_first"] is True and present["action_spread_floor"] == [0.001, 0.005]  # kept as saved
    for off in ({"expectation_loss": False}, {"expectation_loss": 0}, {"spatial_readout": None},
                {"action_decoding": None}):
        assert not set(REMOVED_KEYS) & set(migrate_vla_config(off))
    for key, value in (("spatial_readout", 16), ("spatial_readout", True), ("expectation_loss", 5),
                       ("expectation_loss", True), ("action_decoding", "expectation")):
        with pytest.raises(ValueError, match=f"VLAConfig.{key} was removed .*docs/DECISIONS.md.*got") as e:
            migrate_vla_config({key: value})
        assert "\n" not in str(e.value)


def test_configs_that_still_carry_a_removed_key_at_its_off_value_are_accepted():
    plain = VLAConfig.tiny(num_bins=32)
    assert VLAConfig.tiny(num_bins=32, spatial_readout=0, expectation_loss=False, action_decoding="argmax") == plain
    assert VLAConfig.from_dict({**plain.to_dict(), "spatial_readout": 0}) == plain
    assert plain.finetune(expectation_loss=0.0) == plain.finetune()
    assert vla_config_from_dict({"preset": "tiny", "num_bins": 32, "spatial_readout": 0}) == plain
    with pytest.raises(ValueError, match="spatial_readout was removed"):
        VLAConfig.tiny(spatial_readout=16)
    with pytest.raises(TrainingError, match="expectation_loss was removed"):
        vla_config_from_dict({"preset": "tiny", "expectation_loss": 5})


def test_the_tiny_preset_is_the_recipe_in_config_train():
    """preset: tiny with the recipe's explicit values is byte for byte the preset alone: a run of the
    recipe file and one of the bare preset build the same model."""
    for name in ("vla_tiny.yaml", "actionvla_tiny.yaml"):
        model = yaml.safe_load((ROOT / "config" / "train" / name).read_text())["model"]
        explicit = {k: v for k, v in model.items() if k not in ("chunk_size", "zero_init_head")}
        assert explicit.pop("preset") == "tiny"
        assert vla_config_from_dict({"preset": "tiny", **explicit, "num_bins": 32}).to_json() == \
            VLAConfig.tiny(num_bins=32).to_json(), name
    cfg = VLAConfig.tiny()
    assert (cfg.action_head_type, cfg.text_first, cfg.vision_film, cfg.keypoints) == ("regression", True, True, 16)
    assert cfg.vision_overrides == {"image_size": 64, "grid": 4} and cfg.action_spread_floor == (0.001, 0.005)
