"""Pretrained vision-language models as the VLA's backbone (VLAConfig.backbone): tiny random-weight
models of real families (tests/tiny_vlms.py), saved with their processors and loaded by path.

Each family trains its heads through its own processor and prompt format with its vision tower
frozen; LoRA trains only its adapters; a saved policy loads with no source directory and acts; the
training commands run with it end to end.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_vlms
from lapa_cli.main import main as lapa
from lapa_training.vla import ActionBins, VLAConfig, VLAModel

INSTRUCTIONS = ["pick up the red block", "push the blue block left", "go to the green target", "stop"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlms")
    return {family: tiny_vlms.build(family, root / family) for family in tiny_vlms.FAMILIES}


def images(n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 48, 64, 3), dtype=np.uint8)


def action_bins() -> ActionBins:
    return ActionBins.fit(np.random.default_rng(0).normal(size=(2000, 7)) * 0.005, num_bins=8)


def vlm_config(backbone: Path, **overrides) -> VLAConfig:
    return VLAConfig.vlm(backbone=str(backbone), **overrides)


def fit_batch(model: VLAModel, labels: torch.Tensor, steps: int = 25, lr: float = 3e-3) -> list[float]:
    """Train on one fixed batch; the losses of every step."""
    inputs = model.prepare_inputs(images(len(labels)), INSTRUCTIONS[:len(labels)])
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        out = model(**inputs, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    return losses


def grads_by_part(model: VLAModel, labels: torch.Tensor) -> dict[str, set[bool]]:
    """For each part of the VLM (and the head): which of its parameters got a gradient in one backward."""
    model.zero_grad(set_to_none=True)
    out = model(**model.prepare_inputs(images(len(labels)), INSTRUCTIONS[:len(labels)]), labels=labels)
    out.loss.backward()
    parts: dict[str, set[bool]] = {}
    for name, p in model.named_parameters():
        part = model.vlm.part(name[len("vlm.model."):]) if name.startswith("vlm.model.") else "head"
        parts.setdefault(part, set()).add(p.grad is not None)
    model.zero_grad(set_to_none=True)
    return parts


@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
@pytest.mark.parametrize("head", ["latent", "action"])
def test_each_family_learns_with_its_vision_tower_frozen(vlm_dirs, family, head):
    torch.manual_seed(0)
    if head == "latent":
        model = VLAModel(vlm_config(vlm_dirs[family], objective="latent"))
        labels = torch.tensor([[1, 2, 3, 4], [0, 5, 0, 6], [7, 7, 1, 2], [3, 0, 6, 5]])
    else:
        model = VLAModel(vlm_config(vlm_dirs[family], objective="action", stage="finetune", num_bins=8),
                         action_bins=action_bins())
        labels = model.encode_actions(np.random.default_rng(1).normal(size=(4, 7)) * 0.005)
    assert type(model.vlm.model).__name__.lower().startswith(family)
    parts = grads_by_part(model, labels)
    assert parts["vision"] == {False}, "the frozen vision tower got gradients"
    assert parts["connector"] == {True} and parts["language"] == {True} and parts["head"] == {True}
    vision_before = {k: v.clone() for k, v in model.state_dict().items()
                     if k.startswith("vlm.model.") and model.vlm.part(k[len("vlm.model."):]) == "vision"}
    losses = fit_batch(model, labels)
    assert min(losses[-5:]) < 0.8 * losses[0], losses
    after = model.state_dict()
    assert vision_before and all(torch.equal(v, after[k]) for k, v in vision_before.items())


@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
def test_lora_trains_only_its_adapters_and_saves_them(vlm_dirs, family, tmp_path):
    torch.manual_seed(0)
    model = VLAModel(vlm_config(vlm_dirs[family], objective="latent", lora_rank=4), action_bins=None)
    labels = torch.tensor([[1, 2, 3, 4], [0, 5, 0, 6], [7, 7, 1, 2], [3, 0, 6, 5]])
    parts = grads_by_part(model, labels)
    assert parts["vision"] == {False} and parts["language"] == {False}, parts
    assert parts["lora"] == {True} and parts["connector"] == {True} and parts["head"] == {True}
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k and "language" in k}
    lora = {k: v.clone() for k, v in model.state_dict().items() if "lora_B" in k}
    losses = fit_batch(model, labels, steps=15)
    assert losses[-1] < losses[0]
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base.items()), "LoRA changed the language model's own weights"
    assert any(not torch.equal(v, after[k]) for k, v in lora.items()), "the adapters did not train"
    loaded = VLAModel.from_pretrained(model.save_pretrained(tmp_path / "lora"))
    assert loaded.config.lora_rank == 4
    inputs = model.prepare_inputs(images(2), INSTRUCTIONS[:2])
    model.eval()
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("family", tiny_vlms.FAMILIES)
def test_a_saved_vlm_policy_loads_without_its_source_and_acts(vlm_dirs, family, tmp_path):
    from lapa_core.policy import load_policy

    source = tmp_path / "source"
    shutil.copytree(vlm_dirs[family], source)
    torch.manual_seed(0)
    model = VLAModel(vlm_config(source, objective="action", stage="finetune", num_bins=8), action_bins=action_bins())
    path = model.save_pretrained(tmp_path / "policy")
    assert (path / "processor").is_dir() and not (path / "tokenizer").exists()
    shutil.rmtree(source)  # the checkpoint alone: its VLM config, its weights and the processor's files
    policy = load_policy(path)
    frame = images(1)[0]
    policy.reset(INSTRUCTIONS[0])  # as the policy server starts a goal
    step = policy.act(frame, INSTRUCTIONS[0])
    assert step.delta.shape == (7,) and np.isfinite(step.delta).all() and step.token_kind == "action"
    model.eval()
    _, expected = model.predict_actions(**model.prepare_inputs(frame[None], [INSTRUCTIONS[0]]))
    np.testing.assert_allclose(step.delta, expected[0, 0], rtol=1e-5, atol=1e-7)


def test_vlm_settings_mistakes_are_clear(vlm_dirs, tmp_path):
    with pytest.raises(ValueError, match="keypoints is for the tiny composed backbones"):
        vlm_config(vlm_dirs["idefics3"], keypoints=4)
    with pytest.raises(ValueError, match="lora_rank needs a VLM backbone"):
        VLAConfig(lora_rank=4).validate()
    with pytest.raises(ValueError, match="set freeze_language false"):
        vlm_config(vlm_dirs["idefics3"], lora_rank=4, freeze_language=True)
    from lapa_training.vla.backbones import VLABuildError

    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(VLABuildError, match="'gpt2' model; supported VLM families"):
        VLAModel(vlm_config(tmp_path / "gpt"))


def test_latent_pretraining_then_finetuning_through_the_commands(vlm_dirs, sim_dataset, tmp_path):
    """lapa train pretrain (latent) and finetune with the idefics3 backbone, then the policy acts."""
    from lapa_core.policy import load_policy
    from lapa_training.laq import LAQConfig, LAQModel
    from lapa_training.laq.labelling import label_dataset

    data = tmp_path / "data"
    shutil.copytree(sim_dataset, data)
    torch.manual_seed(0)  # an untrained LAQ: its labels are arbitrary but valid tokens
    label_dataset(LAQModel(LAQConfig.tiny(dim=32, heads=2, spatial_depth=1, temporal_depth=1, decoder_depth=1)),
                  data, progress=False)
    model = ["--set", "model.preset=vlm", "--set", f"model.backbone={vlm_dirs['idefics3']}"]
    quick = ["--steps", "3", "--batch-size", "4", "--set", "train.val_every=100", "--set", "data.val_samples=8",
             "--quiet"]
    assert lapa(["train", "pretrain", "--objective", "latent", "--data", str(data), "--out", str(tmp_path / "pre"),
                 *model, *quick]) == 0
    assert lapa(["train", "finetune", "--init", str(tmp_path / "pre"), "--data", str(data),
                 "--out", str(tmp_path / "ft"), "--set", "model.num_bins=8", *quick]) == 0
    pretrained = VLAModel.from_pretrained(tmp_path / "pre" / "model")
    finetuned = VLAModel.from_pretrained(tmp_path / "ft" / "model")
    assert pretrained.head == "latent" and finetuned.head == "action" and finetuned.vlm is not None
    vision = [k for k in pretrained.state_dict() if k.startswith("vlm.model.vision_model.")]
    assert vision and all(torch.equal(pretrained.state_dict()[k], finetuned.state_dict()[k]) for k in vision)
    step = load_policy(tmp_path / "ft" / "model").act(images(1)[0], "go to the red block")
    assert np.isfinite(step.delta).all()


def test_gradient_checkpointing_recomputes_to_the_same_gradients(vlm_dirs):
    import copy

    torch.manual_seed(0)
    plain = VLAModel(vlm_config(vlm_dirs["idefics3"], objective="latent"))
    checkpointed = copy.deepcopy(plain)
    checkpointed.enable_gradient_checkpointing()
    assert checkpointed.vlm.model.is_activation_checkpointing and not plain.vlm.model.is_activation_checkpointing
    labels = torch.tensor([[1, 2, 3, 4], [0, 5, 0, 6]])
    inputs = plain.prepare_inputs(images(2), INSTRUCTIONS[:2])
    for model in (plain, checkpointed):
        model.train()
        model(**inputs, labels=labels).loss.backward()
    grads = dict(checkpointed.named_parameters())
    for name, p in plain.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-6)


def test_a_named_preset_is_the_base_the_settings_go_over(tmp_path):
    """--preset NAME: the preset file first, then --config and --set; dict settings merge key by key."""
    import argparse

    from lapa_cli import UserError
    from lapa_cli.train import _sections, named_presets

    assert {"smolvlm-500m", "smolvlm2-500m", "paligemma-3b", "qwen2.5-vl-3b"} <= set(named_presets())
    args = argparse.Namespace(config=None, preset="smolvlm-500m", steps=None, batch_size=8, lr=None, seed=None,
                              overrides=["model.processor_overrides={max_image_size: {longest_edge: 256}}",
                                         "train.lr=3e-5"])
    config = _sections(args)
    assert config["model"]["preset"] == "vlm" and config["model"]["backbone"] == "HuggingFaceTB/SmolVLM-500M-Instruct"
    assert config["model"]["processor_overrides"] == {"do_image_splitting": False,
                                                      "max_image_size": {"longest_edge": 256}}
    assert config["train"]["lr"] == 3e-5 and config["train"]["batch_size"] == 8
    assert config["train"]["precision"] == "bf16"  # from the preset
    for name in named_presets():  # every preset file makes a valid VLA config (no download: names only)
        from lapa_training.vla.train_vla import vla_config_from_dict

        cfg = _sections(argparse.Namespace(config=None, preset=name, steps=None, batch_size=None, lr=None,
                                           seed=None, overrides=[]))
        model = vla_config_from_dict(cfg["model"])
        assert model.backbone and model.freeze_vision
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  preset: tiny\n")
    with pytest.raises(UserError, match="leave model.preset out"):
        _sections(argparse.Namespace(config=recipe, preset="smolvlm-500m", steps=None, batch_size=None, lr=None,
                                     seed=None, overrides=[]))
