"""The LAPA VLA (lapa_training.vla): configs, heads, freezing, head replacement, Hugging Face
backbones by path, checkpoints, the policy object, the IDM, and overfitting a handful of samples.

Everything is a real (tiny) torch model built in the test; nothing is downloaded."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from lapa_core.policy import PolicyLoadError, PolicyStep, load_policy
from lapa_training.checkpoint import CheckpointError
from lapa_training.vla import (IGNORE_INDEX, ActionBins, IDMConfig, IDMModel, VLAConfig, VLAModel, VLAPolicy,
                               byte_tokenizer)

INSTRUCTIONS = ["pick up the red block", "push the blue block left", "reach the green target",
                "place the block on the plate", "open the gripper", "lift the cube"]


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def random_images(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def fitted_bins(num_bins: int = 256, seed: int = 0, n: int = 4000) -> ActionBins:
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 0.01, (n, 7))
    a[:, 3:6] *= 5
    a[:, 6] = (rng.random(n) < 0.4).astype(float)
    return ActionBins.fit(a, num_bins=num_bins)


def tiny(**overrides) -> VLAModel:
    torch.manual_seed(0)
    return VLAModel(VLAConfig.tiny(**overrides))


def batch(model: VLAModel, n: int = 3, seed: int = 0):
    px = model.preprocess_images(random_images(n, model.image_size[0], seed))
    ids, mask = model.tokenize(INSTRUCTIONS[:n])
    return px, ids, mask


def fit(model: VLAModel, px, ids, mask, labels, actions, steps: int, lr: float) -> VLAModel:
    """`steps` AdamW updates on one batch; the model is left in eval mode."""
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(px, ids, mask, labels=labels, actions=actions).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def drop_config_key(path, key: str) -> None:
    """Make a saved checkpoint look as if written before config key `key` existed."""
    config = json.loads((path / "config.json").read_text())
    del config[key]
    (path / "config.json").write_text(json.dumps(config))
    meta = json.loads((path / "checkpoint.json").read_text())  # as that older writer recorded it
    meta["files"]["config.json"] = (path / "config.json").stat().st_size
    (path / "checkpoint.json").write_text(json.dumps(meta))


def assert_policy_acts_as_model(path, px, atol: float = 1e-5) -> None:
    """The policy loaded from `path` gives, for the first image and instruction, what the model decodes."""
    loaded = VLAModel.from_pretrained(path).eval()
    policy = load_policy(path)
    policy.reset(INSTRUCTIONS[0])
    step = policy.act(random_images(1, 64, seed=0)[0], INSTRUCTIONS[0])
    with torch.no_grad():
        want = loaded.decode_actions(loaded(px[:1], *loaded.tokenize(INSTRUCTIONS[:1])))[0, 0]
    np.testing.assert_allclose(step.delta, want, atol=atol)


def head_keys(state) -> set[str]:
    return {k for k in state if k.startswith(("latent_head.", "action_head."))}


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------
def test_bad_configs_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="vision_backbone 'tinyy' is not a known backbone.*'tiny'"):
        VLAConfig(vision_backbone="tinyy").validate()
    with pytest.raises(ValueError, match="looks like a path but no such directory"):
        VLAConfig(language_backbone=str(tmp_path / "missing" / "lm")).validate()
    with pytest.raises(ValueError, match="num_bins must be an integer >= 2"):
        VLAConfig(num_bins=1).validate()
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        VLAConfig(chunk_size=0).validate()
    with pytest.raises(ValueError, match="codebook_size must be an integer >= 2"):
        VLAConfig(codebook_size=1).validate()
    with pytest.raises(ValueError, match="objective must be one of latent, action, idm"):
        VLAConfig(objective="actions").validate()
    with pytest.raises(ValueError, match="stage must be one of"):
        VLAConfig(stage="train").validate()
    with pytest.raises(ValueError, match="prompt_template must contain"):
        VLAConfig(prompt_template="do it").validate()
    with pytest.raises(ValueError, match="image_std must be positive"):
        VLAConfig(image_std=(0.5, 0.0, 0.5)).validate()
    with pytest.raises(ValueError, match="unknown VLAConfig keys \\['bins'\\]"):
        VLAConfig.from_dict({"bins": 4})
    with pytest.raises(ValueError, match="multiple of 8"):
        VLAConfig.tiny(image_size=60)
    with pytest.raises(ValueError, match="exceed the language backbone's 512 positions"):
        VLAModel(VLAConfig.tiny(max_text_tokens=500))  # 16 image tokens + a class token + 500 > 512
    # hub ids and existing directories are fine without loading anything
    VLAConfig(vision_backbone="google/siglip-base-patch16-224", language_backbone=str(tmp_path)).validate()


def test_config_round_trip_presets_and_heads():
    cfg = VLAConfig.tiny(image_size=128, chunk_size=4, num_bins=64)
    assert VLAConfig.from_json(cfg.to_json()) == cfg
    assert cfg.vision_overrides == {"image_size": 128, "grid": 4} and not cfg.freeze_vision
    assert VLAModel(cfg).image_tokens == 16  # the tiny preset's 4x4 grid at any image size
    paper = VLAConfig.paper()  # described, never loaded here
    assert "siglip" in paper.vision_backbone and "Qwen" in paper.language_backbone
    assert paper.head == "latent" and paper.finetune().head == "action"
    assert VLAConfig(objective="action").head == "action" and VLAConfig(objective="idm").head == "action"


# ---------------------------------------------------------------------------------------------
# heads, loss, freezing
# ---------------------------------------------------------------------------------------------
def test_head_shapes_loss_and_accuracy():
    model = tiny(latent_tokens=3, codebook_size=5)
    px, ids, mask = batch(model)
    labels = torch.tensor([[0, 1, 4], [2, 2, 2], [4, 3, 0]])
    out = model(px, ids, mask, labels=labels)
    assert out.head == "latent" and model.action_head is None
    assert out.logits.shape == (3, 3, 5) and out.predictions.shape == (3, 3) and out.hidden.shape == (3, 128)
    expected = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 5), labels.reshape(-1))
    assert torch.allclose(out.loss, expected)
    assert out.accuracy == (out.predictions == labels).float().mean()
    # ignored positions are left out of loss and accuracy
    masked = labels.clone()
    masked[0] = IGNORE_INDEX
    out2 = model(px, ids, mask, labels=masked)
    assert torch.allclose(out2.loss, torch.nn.functional.cross_entropy(out.logits[1:].reshape(-1, 5),
                                                                       labels[1:].reshape(-1)))
    with pytest.raises(ValueError, match="latent-action tokens"):
        model(px, ids, mask, labels=labels[:, :2])
    with pytest.raises(ValueError, match="outside the head's classes"):
        model(px, ids, mask, labels=torch.full((3, 3), 5))

    action = tiny(objective="action", chunk_size=3, num_bins=16, action_head_type="bins")
    action.set_action_bins(fitted_bins(16))
    out = action(px, ids, mask)
    assert out.head == "action" and action.latent_head is None
    assert out.logits.shape == (3, 3, 7, 16) and out.predictions.shape == (3, 3, 7)
    # the gripper has 2 bins: the other 14 outputs are masked and never predicted
    assert torch.all(out.predictions[..., 6] < 2)
    assert torch.all(out.logits[..., 6, 2:] == torch.finfo(out.logits.dtype).min)
    chunk_actions = np.random.default_rng(1).normal(0, 0.01, (3, 3, 7))
    chunk_actions[2, 1:] = np.nan  # past the end of an episode
    labels = action.encode_actions(chunk_actions)
    out = action(px, ids, mask, labels=labels)
    assert torch.isfinite(out.loss) and (labels == IGNORE_INDEX).sum() == 14
    # a batch with no labelled position: zero loss that still backpropagates
    out = action(px, ids, mask, labels=torch.full((3, 3, 7), IGNORE_INDEX))
    assert float(out.loss.detach()) == 0.0
    out.loss.backward()


def test_image_preprocessing_crops_resizes_and_normalises():
    model = tiny()
    wide = random_images(1, 96, seed=7)[:, :64]  # (1, 64, 96, 3): center crop keeps columns 16..79
    px = model.preprocess_images(wide)
    assert px.shape == (1, 3, 64, 64) and px.dtype == torch.float32
    np.testing.assert_allclose(px.numpy(), model.preprocess_images(wide[:, :, 16:80]).numpy())
    expected = (wide[0, :, 16:80].astype(np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(px[0].permute(1, 2, 0).numpy(), expected, atol=1e-6)
    big = model.preprocess_images(np.repeat(np.repeat(wide[:, :, 16:80], 2, axis=1), 2, axis=2))
    np.testing.assert_allclose(big.numpy(), px.numpy(), atol=1e-5)  # 2x2 area average undoes the upscale
    with pytest.raises(ValueError, match="uint8"):
        model.preprocess_images(wide.astype(np.float32))


def test_frozen_vision_gets_no_gradient_and_stays_unchanged():
    model = tiny(objective="action", num_bins=32, freeze_vision=True)
    model.set_action_bins(fitted_bins(32))
    model.train()
    assert not model.vision.training  # frozen parts stay in eval mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # all parameters, frozen ones included
    px, ids, mask = batch(model)
    labels = model.encode_actions(np.random.default_rng(0).normal(0, 0.01, (3, 7)))
    model(px, ids, mask, labels=labels).loss.backward()
    assert all(p.grad is None for p in model.vision.parameters())
    for part in (model.projector, model.language, model.action_head):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    opt.step()
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith("vision."):
            assert torch.equal(v, after[k]), k
    for prefix in ("projector.", "language.", "action_head."):
        assert any(not torch.equal(v, after[k]) for k, v in before.items() if k.startswith(prefix)), prefix
    # trainable = everything but the vision tower
    assert model.num_parameters(trainable_only=True) == model.num_parameters() - model.parameter_counts()["vision"]
    # and unfrozen, the vision tower does learn
    thawed = tiny(objective="action", num_bins=32, freeze_vision=False)
    thawed.set_action_bins(fitted_bins(32))
    thawed(*batch(thawed), labels=labels).loss.backward()
    assert all(p.grad is not None for p in thawed.vision.parameters())


# ---------------------------------------------------------------------------------------------
# checkpoints and head replacement
# ---------------------------------------------------------------------------------------------
def test_save_load_round_trip_is_self_contained_and_identical(tmp_path):
    model = tiny(chunk_size=2, num_bins=64, objective="idm", control_rate=15.0).eval()
    model.set_action_bins(fitted_bins(64))
    path = model.save_pretrained(tmp_path / "vla")
    files = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "config.json", "checkpoint.json", "tokenizer", "action_bins.json"} <= files
    assert not [p for p in path.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".pth")]
    config = json.loads((path / "config.json").read_text())
    assert config["policy_type"] == "lapa_vla" and config["backbones"]["vision"]["model_type"] == "lapa_tiny_conv_vision"
    from safetensors.torch import load_file

    saved = load_file(str(path / "model.safetensors"))
    assert any(k.startswith("vision.") for k in saved)  # frozen weights are saved too

    loaded = VLAModel.from_pretrained(path).eval()
    assert loaded.config == model.config and loaded.action_bins == model.action_bins
    assert loaded.load_report.new == [] and loaded.load_report.dropped == []
    texts = INSTRUCTIONS + ["héllo wörld ✓", ""]
    for a, b in zip(model.tokenize(texts), loaded.tokenize(texts)):
        assert torch.equal(a, b)
    px, ids, mask = batch(model)
    with torch.inference_mode():
        assert torch.equal(model(px, ids, mask).logits, loaded(px, ids, mask).logits)
    # training-only keys may change on load; weight-shaping ones may not
    thawed = VLAModel.from_pretrained(path, config=loaded.config.finetune(stage="pretrain", freeze_language=True))
    assert thawed.num_parameters(trainable_only=True) < model.num_parameters(trainable_only=True)
    with pytest.raises(CheckpointError, match="num_bins 64 but the config asks for 32"):
        VLAModel.from_pretrained(path, config=VLAConfig.tiny(chunk_size=2, num_bins=32, objective="idm"))
    # a damaged extra file is noticed
    tok = path / "tokenizer" / "tokenizer.json"
    tok.write_text(tok.read_text()[:-10])
    with pytest.raises(CheckpointError, match="damaged: tokenizer/tokenizer.json"):
        VLAModel.from_pretrained(path)


def test_latent_pretrained_weights_load_into_finetune_model_with_only_the_head_replaced(tmp_path):
    pre = tiny(objective="latent")
    pre.save_pretrained(tmp_path / "pretrained")
    pre_state = pre.state_dict()

    torch.manual_seed(123)
    ft = VLAModel.from_pretrained(tmp_path / "pretrained",
                                  config=pre.config.finetune(num_bins=32, chunk_size=2, action_head_type="bins"),
                                  replace_heads=True)
    state = ft.state_dict()
    report = ft.load_report
    assert ft.config.stage == "finetune" and ft.head == "action" and ft.latent_head is None
    assert set(report.dropped) == head_keys(pre_state) and all(k.startswith("latent_head.") for k in report.dropped)
    assert set(report.new) == head_keys(state) and all(k.startswith("action_head.") for k in report.new)
    assert not any(k.startswith("latent_head.") for k in state)
    backbone = set(pre_state) - head_keys(pre_state)
    assert set(report.loaded) == backbone == set(state) - head_keys(state)
    for k in backbone:
        assert torch.equal(pre_state[k], state[k]), k
    assert state["action_head.net.3.weight"].shape == (2 * 7 * 32, 128)
    assert "action_head" in str(report) and "latent_head" in str(report)
    # an action-pretrained model's bins go with its head: finetuning fits its own
    act = tiny(objective="action", num_bins=32)
    act.set_action_bins(fitted_bins(32))
    act.replace_heads(num_bins=64)
    assert act.action_bins is None and act.head == "action" and act.config.num_bins == 64

    # for_finetuning does the same in one call, and the two fresh heads are independent draws
    ft2 = VLAModel.for_finetuning(tmp_path / "pretrained", num_bins=32, chunk_size=2)
    assert set(ft2.load_report.new) == set(report.new)
    assert not torch.equal(ft2.state_dict()["action_head.net.3.weight"], state["action_head.net.3.weight"])
    # head replacement refuses backbone changes
    with pytest.raises(CheckpointError, match="projector_hidden"):
        VLAModel.from_pretrained(tmp_path / "pretrained", config=pre.config.finetune(projector_hidden=64),
                                 replace_heads=True)


# ---------------------------------------------------------------------------------------------
# Hugging Face backbones by path
# ---------------------------------------------------------------------------------------------
def _save_hf_backbones(root, kind: str):
    import transformers

    torch.manual_seed(1)
    if kind == "siglip+qwen2":
        vision = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2))
        tok = byte_tokenizer()
        lm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=256)).to(torch.bfloat16)  # saved in bf16, like Qwen
    else:  # a ViT and GPT-2 with a tokenizer that has no pad token (GPT-2 style)
        vision = transformers.ViTModel(transformers.ViTConfig(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2))
        base = byte_tokenizer()
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, eos_token="<eos>")
        lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(base), n_embd=48, n_layer=1,
                                                                  n_head=2, n_positions=256))
    vision.save_pretrained(root / "vision")
    lm.save_pretrained(root / "lm")
    # a tokenizer directory of its own: saved beside these toy LMs, AutoTokenizer would pick the
    # model family's tokenizer class (Qwen2Tokenizer, GPT2Tokenizer), which these byte vocabularies are not
    tok.save_pretrained(root / "tok")
    return vision, lm


@pytest.mark.parametrize("kind", ["siglip+qwen2", "vit+gpt2"])
def test_backbones_from_pretrained_paths_checkpoint_and_policy(tmp_path, kind):
    vision, lm = _save_hf_backbones(tmp_path, kind)
    cfg = VLAConfig(vision_backbone=str(tmp_path / "vision"), language_backbone=str(tmp_path / "lm"),
                    tokenizer=str(tmp_path / "tok"), objective="action", num_bins=16, prompt_template="In: {instruction}\nOut:", max_text_tokens=32,
                    control_rate=5.0)
    with pytest.warns(UserWarning, match="no image processor config found; normalising with mean 0.5"):
        model = VLAModel(cfg).eval()
    assert model.config.image_mean == (0.5, 0.5, 0.5)
    # the backbone weights are the saved ones, not a fresh initialisation
    for k, v in vision.state_dict().items():
        assert torch.equal(model.vision.state_dict()[k], v), k
    lm_base = lm.base_model.state_dict()
    for k, v in model.language.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(lm_base[k].float(), v), k  # loaded as fp32
    assert model.image_size == (32, 32) and model.tokenizer.pad_token is not None
    model.set_action_bins(fitted_bins(16))
    px, ids, mask = batch(model)
    out = model(px, ids, mask, labels=model.encode_actions(np.zeros((3, 7))))
    assert out.logits.shape == (3, 1, 7, 16) and torch.isfinite(out.loss)

    path = model.save_pretrained(tmp_path / "vla")
    # the checkpoint no longer needs the backbone directories
    for sub in ("vision", "lm", "tok"):
        for f in (tmp_path / sub).iterdir():
            f.unlink()
        (tmp_path / sub).rmdir()
    loaded = VLAModel.from_pretrained(path).eval()
    with torch.inference_mode():
        assert torch.equal(model(px, ids, mask).logits, loaded(px, ids, mask).logits)
    policy = load_policy(path)
    assert isinstance(policy, VLAPolicy) and policy.control_rate == 5.0
    step = policy.act(random_images(1, 48)[0], "pick up the red block")
    assert isinstance(step, PolicyStep) and step.delta.shape == (7,) and np.isfinite(step.delta).all()


# ---------------------------------------------------------------------------------------------
# the policy
# ---------------------------------------------------------------------------------------------
def test_policy_act_validation_and_refusals(tmp_path):
    latent = tiny()
    latent.save_pretrained(tmp_path / "latent")
    with pytest.raises(PolicyLoadError, match="finetune it first"):
        load_policy(tmp_path / "latent")

    ft = VLAModel.for_finetuning(tmp_path / "latent", num_bins=32, control_rate=20.0, action_head_type="bins")
    ft.save_pretrained(tmp_path / "no_bins")
    with pytest.raises(PolicyLoadError, match="no action bins"):
        load_policy(tmp_path / "no_bins")
    with pytest.raises(PolicyLoadError, match="cannot load VLA checkpoint"):
        VLAPolicy.from_pretrained(tmp_path / "nowhere")

    bins = fitted_bins(32)
    ft.set_action_bins(bins)
    ft.save_pretrained(tmp_path / "ft")
    policy = load_policy(tmp_path / "ft")
    assert isinstance(policy, VLAPolicy) and policy.control_rate == 20.0
    policy.reset(INSTRUCTIONS[0])
    image = random_images(1, 64)[0]
    step = policy.act(image, INSTRUCTIONS[0])
    assert step.delta.shape == (7,) and step.delta.dtype == np.float64 and np.isfinite(step.delta).all()
    assert step.token_kind == "action" and len(step.tokens) == 7
    assert all(0 <= t < n for t, n in zip(step.tokens, bins.num_bins))
    np.testing.assert_allclose(step.delta, bins.decode(np.array([step.tokens]))[0])
    # deterministic, and equal to the model's own prediction
    assert np.array_equal(policy.act(image, INSTRUCTIONS[0]).delta, step.delta)
    model = VLAModel.from_pretrained(tmp_path / "ft").eval()
    _, actions = model.predict_actions(model.preprocess_images(image), *model.tokenize([INSTRUCTIONS[0]]))
    np.testing.assert_allclose(actions[0, 0], step.delta)
    # any camera size: center crop + resize inside act
    assert np.isfinite(policy.act(random_images(1, 200)[0][:120], INSTRUCTIONS[1]).delta).all()
    with pytest.raises(ValueError, match="uint8"):
        policy.act(image.astype(np.float32), INSTRUCTIONS[0])
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        policy.act(image[..., 0], INSTRUCTIONS[0])
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        policy.act(np.zeros((64, 64, 4), np.uint8), INSTRUCTIONS[0])
    with pytest.raises(TypeError, match="numpy array"):
        policy.act(image.tolist(), INSTRUCTIONS[0])


def test_policy_chunking_queues_steps_and_caches_the_instruction(tmp_path, monkeypatch):
    model = tiny(objective="action", chunk_size=3, num_bins=32)
    model.set_action_bins(fitted_bins(32))
    model.save_pretrained(tmp_path / "ft")
    policy = VLAPolicy.from_pretrained(tmp_path / "ft")
    calls = {"forward": 0, "tokenize": 0}
    forward, tokenize = policy.model.predict_actions, policy.model.tokenize
    monkeypatch.setattr(policy.model, "predict_actions",
                        lambda *a, **k: (calls.__setitem__("forward", calls["forward"] + 1), forward(*a, **k))[1])
    monkeypatch.setattr(policy.model, "tokenize",
                        lambda *a, **k: (calls.__setitem__("tokenize", calls["tokenize"] + 1), tokenize(*a, **k))[1])
    images = random_images(7, 64, seed=3)
    policy.reset(INSTRUCTIONS[0])
    chunk = policy.act_chunk(images[0], INSTRUCTIONS[0])
    assert chunk.shape == (3, 7) and calls["forward"] == 1
    steps = [policy.act(images[i], INSTRUCTIONS[0]).delta for i in range(3)]
    assert calls["forward"] == 2  # one inference for three steps
    np.testing.assert_allclose(np.stack(steps), chunk)  # the queue came from images[0]
    policy.act(images[3], INSTRUCTIONS[0])
    assert calls["forward"] == 3 and calls["tokenize"] == 1  # re-inferred; tokens cached
    policy.reset(INSTRUCTIONS[0])  # clears the queue
    policy.act(images[4], INSTRUCTIONS[0])
    assert calls["forward"] == 4 and calls["tokenize"] == 1
    policy.act(images[5], INSTRUCTIONS[1])  # a new instruction: new tokens, queue dropped
    assert calls["forward"] == 5 and calls["tokenize"] == 2


# ---------------------------------------------------------------------------------------------
# learning
# ---------------------------------------------------------------------------------------------
def test_overfits_a_handful_of_samples_to_within_a_bin(tmp_path):
    """Tiny preset, 6 (image, instruction, action) samples, AdamW: the finetuned model reproduces
    every sample's action within one bin, through the policy too."""
    bins = fitted_bins(64, seed=1)
    rng = np.random.default_rng(2)
    actions = rng.normal(0.0, 0.01, (6, 7))
    actions[:, 3:6] *= 5
    actions[:, 6] = [0, 1, 0, 1, 1, 0]
    images = random_images(6, 64, seed=4)
    model = tiny(objective="action", stage="finetune", num_bins=64, action_head_type="bins")
    model.set_action_bins(bins)
    px = model.preprocess_images(images)
    ids, mask = model.tokenize(INSTRUCTIONS)
    labels = model.encode_actions(actions)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(300):
        out = model(px, ids, mask, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if step % 10 == 9:
            with torch.no_grad():  # the weights as saved: after the last update
                out = model(px, ids, mask, labels=labels)
            if float(out.accuracy) == 1.0:
                break
    assert float(out.accuracy) == 1.0, f"accuracy {float(out.accuracy):.3f} after {step + 1} steps"
    model.save_pretrained(tmp_path / "ft")
    policy = load_policy(tmp_path / "ft")
    width = bins.bin_widths(bins.encode(actions))
    for image, instruction, action, w in zip(images, INSTRUCTIONS, actions, width):
        policy.reset(instruction)
        delta = policy.act(image, instruction).delta
        assert np.all(np.abs(delta - action) <= w + 1e-6), (delta, action)


def test_idm_shapes_learning_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    bins = fitted_bins(32)
    idm = IDMModel(IDMConfig(image_size=32, num_bins=32), action_bins=bins)
    frames = random_images(8, 48, seed=5)
    x_t, x_next = idm.preprocess(frames[:4]), idm.preprocess(frames[4:])
    assert x_t.shape == (4, 3, 32, 32) and float(x_t.min()) >= -1 and float(x_t.max()) <= 1
    actions = np.random.default_rng(6).normal(0.0, 0.01, (4, 7))
    actions[:, 3:6] *= 5
    actions[:, 6] = [0, 1, 1, 0]
    labels = torch.from_numpy(bins.encode(actions))
    opt = torch.optim.AdamW(idm.parameters(), lr=3e-3)
    for _ in range(60):
        out = idm(x_t, x_next, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.logits.shape == (4, 7, 32) and float(out.accuracy) == 1.0
    idm.eval()
    ids, pseudo = idm.label(frames[:4], frames[4:])
    np.testing.assert_array_equal(ids, labels.numpy())
    assert pseudo.shape == (4, 7) and np.isfinite(pseudo).all()
    idm.save_pretrained(tmp_path / "idm")
    loaded = IDMModel.from_pretrained(tmp_path / "idm").eval()
    assert loaded.action_bins == bins
    with torch.inference_mode():
        assert torch.equal(loaded(x_t, x_next).logits, idm(x_t, x_next).logits)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*stages"):
        IDMConfig(image_size=36).validate()


def test_policy_runtime_imports_no_training_code():
    """policy.py and the modules it loads import only torch/transformers/numpy-level libraries,
    the VLA modules, the checkpoint reader and the policy API (no tqdm/accelerate/dataset code of ours)."""
    import ast
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    allowed_first_party = {"lapa_training.vla", "lapa_training.checkpoint", "lapa_training.dataclass_dict",
                           "lapa_training.image_processing", "lapa_core.policy"}
    # peft: a VLM checkpoint trained with LoRA rebuilds its adapter layers
    allowed_third_party = {"numpy", "torch", "transformers", "tokenizers", "safetensors", "peft"}
    todo, seen = ["lapa_training", "lapa_training.vla", "lapa_training.vla.policy"], set()  # + parent packages
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = root / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = root / module.replace(".", "/") / "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in ("lapa_training", "lapa_policy_node", "lapa_core"):
                    assert any(name == a or name.startswith(a + ".") for a in allowed_first_party), \
                        f"{module} imports {name}"
                    todo.append(name)
                else:
                    assert top in allowed_third_party or top in sys.stdlib_module_names or top == "__future__", \
                        f"{module} imports {name}"
    assert "lapa_training.vla.modeling_vla" in seen and "lapa_training.checkpoint" in seen


def test_tiny_vision_tower_is_a_position_aware_cnn_and_siglip_tiny_checkpoints_still_load(tmp_path):
    import transformers

    from lapa_training.vla.modeling_vla import VLABuildError
    from lapa_training.vla.tiny_vision import TinyConvVisionModel

    model = tiny(objective="action", stage="finetune", num_bins=16).eval()
    assert isinstance(model.vision, TinyConvVisionModel) and not model.config.freeze_vision
    # 8x8 tokens at any image size; a flat grey image still gives different tokens at different places,
    # because the coordinate planes say where each one is
    for size in (32, 64, 128):
        tower = tiny(image_size=size, vision_overrides={"grid": 8}).vision.eval()
        with torch.no_grad():
            tokens = tower(pixel_values=torch.zeros(1, 3, size, size)).last_hidden_state
        assert tokens.shape == (1, 64, 64)
        assert (tokens[0, 0] - tokens[0, 63]).abs().max() > 1e-3
    with pytest.raises(VLABuildError, match="multiple of grid 8"):
        VLAModel(VLAConfig.tiny(vision_overrides={"image_size": 60, "grid": 8}))
    # checkpoints made while the tiny tower was a SigLIP ViT rebuild that ViT from their saved config
    vit = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        image_size=64, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, vision_use_head=False))
    old = VLAModel(VLAConfig.tiny(objective="action", stage="finetune", num_bins=16, action_head_type="bins",
                                  text_first=False, vision_film=False, keypoints=0), vision=vit,
                   language=model.language, tokenizer=model.tokenizer).eval()
    old.set_action_bins(fitted_bins(16))
    loaded = VLAModel.from_pretrained(old.save_pretrained(tmp_path / "vit")).eval()
    assert isinstance(loaded.vision, transformers.SiglipVisionModel)
    px, ids, mask = batch(old)
    with torch.no_grad():
        assert torch.equal(old(px, ids, mask).logits, loaded(px, ids, mask).logits)


def test_text_first_and_keypoints_make_the_image_states_depend_on_the_instruction_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match="keypoints must be an integer >= 0"):
        VLAConfig.tiny(keypoints=-1)
    torch.manual_seed(0)
    model = tiny(objective="action", stage="finetune", num_bins=16, text_first=True, keypoints=8,
                 vision_film=False, vision_overrides={"grid": 8}).eval()
    assert model.parameter_counts()["keypoint_logits"] > 0 and model.token_grid.shape == (64, 2)
    px, ids, mask = batch(model)
    assert not bool(mask.all())  # the batch's instructions differ in length: padding in the middle
    with torch.inference_mode():
        out = model.final_hidden(px, ids, mask)
        one = model.final_hidden(px[:1], ids[:1, :int(mask[0].sum())], mask[:1, :int(mask[0].sum())])
    assert out.shape == (len(ids), model.language.config.hidden_size)
    assert torch.allclose(out[:1], one, atol=1e-4)  # pads in the middle change nothing

    def image_states(m, instructions):
        """The image tokens' final states (what the keypoints read) for one image and each instruction."""
        seen = []
        hook = m.keypoint_logits.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0]))
        i, k = m.tokenize(instructions)
        with torch.inference_mode():
            m.final_hidden(px[:1].expand(len(instructions), -1, -1, -1), i, k)
        hook.remove()
        return seen[0]

    asked = ["reach the red block", "reach the blue block"]
    first = image_states(model, asked)
    assert not torch.allclose(first[0], first[1], atol=1e-4)  # text first: they depend on the instruction
    image_first = tiny(objective="action", stage="finetune", num_bins=16, keypoints=8, text_first=False,
                       vision_film=False, vision_overrides={"grid": 8}).eval()
    second = image_states(image_first, asked)
    assert torch.allclose(second[0], second[1], atol=1e-5)  # image first: causal attention cannot see it
    path = model.save_pretrained(tmp_path / "kp")
    loaded = VLAModel.from_pretrained(path).eval()
    assert loaded.config.text_first and loaded.config.keypoints == 8
    with torch.inference_mode():
        assert torch.allclose(loaded.final_hidden(px, ids, mask), out, atol=1e-5)


def test_action_spread_floor_keeps_barely_moving_dimensions_from_weighing_like_motion(tmp_path):
    """A dimension whose spread is below the floor (here roll: 0.2 mrad, tracking noise) is measured in
    the floor, so its error weighs (0.2 / 5)^2 of what it did; decoding uses the same unit."""
    for bad in ((0.001,), (0.001, -1.0), ("a", 0.0)):
        with pytest.raises(ValueError, match="action_spread_floor must be 2 numbers >= 0"):
            VLAConfig.tiny(action_spread_floor=bad)
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 0.01, (4000, 7))
    a[:, 3] *= 0.02  # roll: spread 0.2 mrad, below the 5 mrad floor
    a[:, 6] = (rng.random(4000) < 0.4).astype(float)
    bins = ActionBins.fit(a, num_bins=16)
    floored = tiny(objective="action", stage="finetune", num_bins=16, action_head_type="regression")
    own = tiny(objective="action", stage="finetune", num_bins=16, action_head_type="regression",
               action_spread_floor=(0.0, 0.0))
    for model in (floored, own):
        model.set_action_bins(bins)
    spreads = bins.spreads()
    np.testing.assert_allclose(own.bin_spread.numpy(), spreads, rtol=1e-6)
    np.testing.assert_allclose(floored.bin_spread.numpy()[[0, 1, 2, 4, 5, 6]], spreads[[0, 1, 2, 4, 5, 6]], rtol=1e-6)
    assert floored.bin_spread[3].item() == pytest.approx(0.005) and spreads[3] < 0.0003

    # the same prediction, 1 mrad or 1 mm off in every dimension: roll's share of the loss shrinks by
    # (spread / floor)^2, the others' stays
    px, ids, mask = batch(floored)
    actions = a[:3, None, :].copy()
    predicted = torch.from_numpy(actions).float() + 0.001
    per_dim = {}
    for name, model in (("floored", floored), ("own", own)):
        outputs = (predicted - model.bin_center) / model.bin_spread
        loss = model._regression_error(outputs, actions, model.encode_actions(actions))
        per_dim[name] = (0.001 / model.bin_spread).square()
        assert loss.item() == pytest.approx(per_dim[name].mean().item(), rel=1e-3)
    ratio = (per_dim["floored"][3] / per_dim["own"][3]).item()
    assert ratio == pytest.approx((spreads[3] / 0.005) ** 2, rel=1e-4) and ratio < 0.01
    assert torch.allclose(per_dim["floored"][[0, 1, 2, 4, 5]], per_dim["own"][[0, 1, 2, 4, 5]])

    # decoding reads the outputs in the same unit, saved and loaded; a checkpoint from before the
    # option (no key in config.json) keeps each dimension's own spread
    with torch.no_grad():
        out = floored(px, ids, mask)
    decoded = floored.decode_actions(out)
    assert decoded[0, 0, 3] == pytest.approx((floored.bin_center[3] + out.logits[0, 0, 3] * 0.005).item(), rel=1e-5)
    path = floored.save_pretrained(tmp_path / "floored")
    assert VLAModel.from_pretrained(path).config.action_spread_floor == (0.001, 0.005)
    assert_policy_acts_as_model(path, px, atol=1e-6)
    drop_config_key(path, "action_spread_floor")
    old = VLAModel.from_pretrained(path)
    assert old.config.action_spread_floor == (0.0, 0.0)
    np.testing.assert_allclose(old.bin_spread.numpy(), spreads, rtol=1e-6)


def test_regression_action_head_learns_round_trips_and_replaces_a_latent_head(tmp_path):
    with pytest.raises(ValueError, match="action_head_type must be one of bins, regression"):
        VLAConfig.tiny(action_head_type="mse")
    bins = fitted_bins(16, seed=3)
    model = tiny(objective="action", stage="finetune", num_bins=16, chunk_size=2, action_head_type="regression")
    model.set_action_bins(bins)
    assert model.action_head.net[-1].out_features == 2 * 7  # one value per dimension and step
    px, ids, mask = batch(model)
    out = model(px, ids, mask)
    assert out.logits.shape == (3, 2, 7) and out.predictions.shape == (3, 2, 7)
    center, spread = torch.from_numpy(bins.means()).float(), torch.from_numpy(bins.spreads()).float()
    values = center + out.logits * spread
    decoded = model.decode_actions(out)
    np.testing.assert_allclose(decoded[..., :6], values[..., :6].detach().numpy(), rtol=1e-5, atol=1e-7)
    assert set(decoded[..., 6].ravel().tolist()) <= {0.0, 1.0}  # the binary gripper: the nearer of its values
    # predictions are the nearest bins: the bins' own values map to their own ids
    table = torch.from_numpy(bins.value_table(16)).float()
    assert torch.equal(model._nearest_bins(table[:, 5].expand(1, 1, 7))[0, 0, :6], torch.full((6,), 5))
    assert torch.equal(model._nearest_bins(torch.tensor([[[0.0] * 6 + [0.8]]]))[0, 0, 6], torch.tensor(1))

    # the loss: squared error in spreads over the known targets; from the labels' bin values without actions
    actions = np.random.default_rng(5).normal(0, 0.01, (3, 2, 7))
    actions[..., 6] = 1.0
    actions[1, 1] = np.nan  # past an episode's end
    labels = model.encode_actions(actions)
    out = model(px, ids, mask, labels=labels, actions=actions)
    known = torch.ones(3, 2, dtype=torch.bool)
    known[1, 1] = False
    target = (torch.from_numpy(np.nan_to_num(actions)).float() - center) / spread
    assert torch.allclose(out.loss, (out.logits - target)[known].square().mean(), atol=1e-6)
    from_bins = (torch.from_numpy(np.nan_to_num(bins.decode(labels.numpy()))).float() - center) / spread
    assert torch.allclose(model(px, ids, mask, labels=labels).loss, (out.logits - from_bins)[known].square().mean(),
                          atol=1e-6)

    # it fits a handful of samples to a small fraction of their spread (the bins head gets to within a bin)
    model = tiny(objective="action", stage="finetune", num_bins=16, action_head_type="regression")
    model.set_action_bins(bins)
    targets = np.random.default_rng(6).normal(0, 0.01, (3, 1, 7))
    targets[..., 6] = [[0], [1], [0]]
    labels = model.encode_actions(targets)
    before = np.abs(model.eval().decode_actions(model(px, ids, mask)) - targets)[..., :6].mean()
    fit(model, px, ids, mask, labels, targets, steps=150, lr=1e-3)
    with torch.no_grad():
        out = model(px, ids, mask, labels=labels)
    after = np.abs(model.decode_actions(out) - targets)[..., :6] / bins.spreads()[:6]
    assert after.max() < 0.1 and after.mean() < 0.02, (before, after)  # measured: 0.0006 / 0.0003 of a spread
    assert np.array_equal(model.decode_actions(out)[..., 6], targets[..., 6])
    assert float(out.accuracy) > 0.9

    # saved and loaded as such; the policy acts with the regressed actions
    path = model.save_pretrained(tmp_path / "reg")
    loaded = VLAModel.from_pretrained(path).eval()
    assert loaded.config.action_head_type == "regression"
    assert_policy_acts_as_model(path, px, atol=1e-6)

    # a latent-pretrained model (LAPA) finetunes with a regression head in place of its latent head
    latent = tiny().save_pretrained(tmp_path / "latent")
    ft = VLAModel.for_finetuning(latent, action_head_type="regression", num_bins=16)
    assert ft.config.action_head_type == "regression" and ft.latent_head is None
    assert ft.action_head.net[-1].out_features == 7 and "action_head.net.3.weight" in ft.load_report.new


def test_vision_film_conditions_the_tiny_tower_on_the_instruction_and_round_trips(tmp_path):
    import transformers

    from lapa_training.vla.modeling_vla import VLABuildError

    with pytest.raises(ValueError, match="vision_film must be true or false"):
        VLAConfig.tiny(vision_film="yes")
    model = tiny(objective="action", stage="finetune", num_bins=16, vision_film=True).eval()
    plain = tiny(objective="action", stage="finetune", num_bins=16, vision_film=False).eval()
    px, ids, mask = batch(model)
    # the FiLM layer starts at zero: the same network as without it
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("instruction_film.")})
    with torch.inference_mode():
        assert torch.allclose(model.final_hidden(px, ids, mask), plain.final_hidden(px, ids, mask), atol=1e-6)
    # the instruction state ignores padding: the same as the instruction on its own
    with torch.inference_mode():
        n = int(mask[0].sum())
        assert not bool(mask.all())
        assert torch.allclose(model.instruction_state(ids, mask)[:1], model.instruction_state(ids[:1, :n]), atol=1e-5)

    def image_tokens(m, instructions):
        i, k = m.tokenize(instructions)
        with torch.inference_mode():
            film = m.instruction_film(m.instruction_state(i, k))
            return m.encode_images(px[:1].expand(len(instructions), -1, -1, -1), film)

    asked = ["reach the red block", "reach the blue block"]
    with torch.no_grad():
        torch.nn.init.normal_(model.instruction_film.weight, std=0.02)
    tokens = image_tokens(model, asked)
    # now the vision tower's own features depend on which block is asked for, even with the image first
    assert not torch.allclose(tokens[0], tokens[1], atol=1e-4)
    # and the FiLM layer learns: gradients reach it through the tower
    model.train()
    model.set_action_bins(fitted_bins(16))
    labels = model.encode_actions(np.random.default_rng(0).normal(0, 0.01, (3, 7)))
    model(px, ids, mask, labels=labels).loss.backward()
    assert model.instruction_film.weight.grad is not None and model.instruction_film.weight.grad.abs().sum() > 0
    model.eval()
    loaded = VLAModel.from_pretrained(model.save_pretrained(tmp_path / "film")).eval()
    assert loaded.config.vision_film and loaded.parameter_counts()["instruction_film"] > 0
    with torch.inference_mode():
        assert torch.allclose(loaded.final_hidden(px, ids, mask), model.final_hidden(px, ids, mask), atol=1e-6)
    # a Hugging Face vision tower has no FiLM layers: a clear error
    vit = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        image_size=64, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, vision_use_head=False))
    with pytest.raises(VLABuildError, match="vision_film needs the built-in tiny vision tower"):
        VLAModel(VLAConfig.tiny(vision_film=True), vision=vit, language=plain.language, tokenizer=plain.tokenizer)


def test_zero_init_head_starts_at_the_training_mean_still_learns_and_is_kept_by_finetuning(tmp_path):
    def largest(weight: torch.Tensor) -> float:
        return float(weight.detach().abs().max())

    with pytest.raises(ValueError, match="zero_init_head must be true or false"):
        VLAConfig.tiny(zero_init_head="yes")
    bins = fitted_bins(16, seed=3)
    default = tiny(objective="action", num_bins=16, action_head_type="regression")
    assert largest(default.action_head.net[-1].weight) > 0  # small random weights otherwise
    model = tiny(objective="action", num_bins=16, action_head_type="regression", zero_init_head=True)
    model.set_action_bins(bins)
    assert largest(model.action_head.net[-1].weight) == 0.0
    assert largest(model.action_head.net[1].weight) > 0  # only the output layer
    px, ids, mask = batch(model)
    with torch.no_grad():
        out = model(px, ids, mask)
    assert torch.equal(out.logits, torch.zeros_like(out.logits))  # every image: the training mean
    mean = np.broadcast_to(bins.means()[:6], (3, 1, 6))
    np.testing.assert_allclose(model.eval().decode_actions(out)[..., :6], mean, rtol=1e-6)
    # the output layer moves at the first step, and from the second the gradients reach the backbone
    targets = np.random.default_rng(6).normal(0, 0.01, (3, 1, 7))
    targets[..., 6] = [[0], [1], [0]]
    projector = model.projector[0].weight.detach().clone()
    fit(model, px, ids, mask, model.encode_actions(targets), targets, steps=1, lr=1e-3)
    assert largest(model.action_head.net[-1].weight) > 0 and torch.equal(model.projector[0].weight, projector)
    fit(model, px, ids, mask, model.encode_actions(targets), targets, steps=1, lr=1e-3)
    assert not torch.equal(model.projector[0].weight, projector)
    # it only shapes a fresh head: a checkpoint saved with it loads as it was, and a latent head can use it
    path = model.save_pretrained(tmp_path / "zero")
    loaded = VLAModel.from_pretrained(path)
    assert loaded.config.zero_init_head and torch.equal(loaded.action_head.net[-1].weight,
                                                        model.action_head.net[-1].weight)
    kept = VLAModel.for_finetuning(path, keep_head=True)
    assert torch.equal(kept.action_head.net[-1].weight, model.action_head.net[-1].weight)
    latent = tiny(zero_init_head=True)
    assert largest(latent.latent_head.net[-1].weight) == 0.0
