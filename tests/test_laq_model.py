"""LAQ model (lapa_training.laq) and checkpoints (lapa_training.checkpoint): real tiny torch models on CPU."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lapa_training import checkpoint as ckpt
from lapa_training.checkpoint import CheckpointError, load_checkpoint, load_trainer_state, save_checkpoint
from lapa_training.laq import LAQConfig, LAQModel, frames_to_input, output_to_uint8

# 32x32 frames, 4x4 patches (8x8 grid), 2x2 action grid, |C| = 8: a second or so per 10 steps on 2 cores.
MICRO = dict(image_size=32, patch_size=4, dim=64, heads=4, spatial_depth=1, temporal_depth=1, decoder_depth=2,
             code_dim=16, codebook_size=8, action_grid=(2, 2))


def micro(**overrides) -> LAQConfig:
    return LAQConfig(**{**MICRO, **overrides})


def pair(cfg: LAQConfig, b: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.image_size
    return (torch.rand(b, cfg.channels, h, w, generator=g) * 2 - 1,
            torch.rand(b, cfg.channels, h, w, generator=g) * 2 - 1)


def blob_pairs(n: int, size: int, gen: torch.Generator, shift: int = 4, sigma: float = 2.5):
    """Frame pairs in [-1, 1]: one coloured Gaussian blob that moves `shift` px up/down/left/right."""
    direction = torch.randint(0, 4, (n,), generator=gen)
    dy = torch.tensor([-1, 1, 0, 0])[direction] * shift
    dx = torch.tensor([0, 0, -1, 1])[direction] * shift
    margin = shift + 4
    cy = torch.randint(margin, size - margin, (n,), generator=gen).float()
    cx = torch.randint(margin, size - margin, (n,), generator=gen).float()
    colour = torch.rand(n, 3, generator=gen) * 1.5 + 0.5
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")

    def render(cy, cx):
        g = torch.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / (2 * sigma ** 2))
        return colour[:, :, None, None] * g[:, None] - 1.0

    return render(cy, cx), render(cy + dy, cx + dx), direction


# ---------------------------------------------------------------------------------------------
# shapes and data flow
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg, grid", [
    (LAQConfig.tiny(), (8, 8)),
    # non-square, 4x6 patch grid reduced to 2x3 = 6 tokens, 3 heads of 16, additive conditioning
    (LAQConfig(image_size=(48, 72), patch_size=12, dim=48, heads=3, spatial_depth=1, temporal_depth=1,
               decoder_depth=1, code_dim=8, codebook_size=5, action_grid=(2, 3), conditioning="additive"), (4, 6)),
    # L = 1: the whole grid pooled into one token
    (micro(action_grid=(1, 1), conditioning="cross_attention"), (8, 8)),
])
def test_output_shapes(cfg, grid):
    torch.manual_seed(0)
    model = LAQModel(cfg)
    assert cfg.patch_grid == grid
    x_t, x_next = pair(cfg, b=3)
    out = model(x_t, x_next)
    h, w = cfg.image_size
    assert out.recon.shape == (3, 3, h, w)
    assert out.tokens.shape == (3, cfg.num_tokens) and out.tokens.dtype == torch.int64
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert 1.0 <= out.perplexity.item() <= cfg.codebook_size + 1e-4
    assert 0 < out.codebook_usage.item() <= 1
    assert model.codebook.shape == (cfg.codebook_size, cfg.code_dim)
    model.eval()
    tokens = model.encode(x_t, x_next)
    assert tokens.shape == (3, cfg.num_tokens) and int(tokens.max()) < cfg.codebook_size
    assert model.decode(x_t, tokens).shape == (3, 3, h, w)
    assert model.decode(x_t, tokens[0]).shape == (3, 3, h, w)  # one token set for every frame


def test_gradients_reach_encoder_codebook_and_decoder():
    torch.manual_seed(0)
    model = LAQModel(micro())
    out = model(*pair(model.config))
    out.loss.backward()
    for name in ("encoder.patch_embed.weight", "encoder.spatial_pos", "encoder.time_embed",
                 "encoder.spatial.0.attn.q.weight", "encoder.temporal.0.mlp.0.weight", "to_code.weight",
                 "quantizer.codebook", "decoder.action_in.weight", "decoder.blocks.0.cross_attn.kv.weight",
                 "decoder.blocks.1.attn.q.weight", "decoder.to_pixels.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_decoder_reads_x_t_through_a_stop_gradient():
    """The decoder's x_t path uses the encoder's patch embedding detached: with the latent action
    fixed (discrete tokens), the reconstruction loss must give the encoder no gradient at all."""
    torch.manual_seed(0)
    model = LAQModel(micro())
    x_t, x_next = pair(model.config)
    tokens = torch.randint(0, 8, (x_t.shape[0], 4))
    F.mse_loss(model.decode(x_t, tokens), x_next).backward()
    for name, p in model.encoder.named_parameters():
        assert p.grad is None, f"decoder loss leaks into encoder.{name}"
    assert model.decoder.pos.grad is not None and model.decoder.to_pixels.weight.grad.abs().sum() > 0

    # and in the full forward pass the x_t embedding handed to the decoder is detached too
    model.zero_grad()
    model.eval()
    seen = {}
    hook = model.decoder.register_forward_pre_hook(lambda mod, args: seen.update(xt=args[0]))
    model(x_t, x_next)
    hook.remove()
    assert not seen["xt"].requires_grad


def test_temporal_attention_is_causal():
    torch.manual_seed(0)
    model = LAQModel(micro(temporal_depth=2)).eval()
    x_t, x_next = pair(model.config)
    _, other = pair(model.config, seed=1)
    _, e1, e2 = model.encode_frames(x_t, x_next)
    _, e1b, e2b = model.encode_frames(x_t, other)
    torch.testing.assert_close(e1, e1b, rtol=0, atol=0)  # e1 sees only x_t
    assert (e2 - e2b).abs().max() > 1e-3  # e2 sees x_next
    _, e1c, _ = model.encode_frames(other, x_next)
    assert (e1 - e1c).abs().max() > 1e-3


def test_eval_is_deterministic_noise_free_and_matches_encode_decode():
    torch.manual_seed(0)
    model = LAQModel(micro(dropout=0.1))
    x_t, x_next = pair(model.config, b=8)
    train_recon = model(x_t, x_next).recon.detach()
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a, b = model(x_t, x_next), model(x_t, x_next)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.recon, b.recon)
    assert torch.equal(a.tokens, model.encode(x_t, x_next))
    torch.testing.assert_close(model.decode(x_t, a.tokens), a.recon, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(train_recon, a.recon, atol=1e-4)  # training adds noise (and dropout)
    for k, v in model.state_dict().items():  # eval never touches codebook, counts or step
        assert torch.equal(v, state[k]), k


def test_nsvq_noise_substitution():
    torch.manual_seed(0)
    quantizer = LAQModel(micro(replace_schedule=())).quantizer
    z = torch.randn(64, 16, requires_grad=True)
    idx = quantizer.nearest(z)
    brute = torch.cdist(z.detach(), quantizer.codebook.detach()).argmin(1)
    assert torch.equal(idx, brute)
    q = quantizer.codebook[idx].detach()

    quantizer.eval()
    out, out_idx, _ = quantizer(z)
    assert torch.equal(out, q) and torch.equal(out_idx, idx)

    quantizer.train()
    out, out_idx, _ = quantizer(z)
    # as far from z as the nearest code, but not the code itself
    torch.testing.assert_close((out - z).norm(dim=1), (z - q).norm(dim=1), rtol=1e-5, atol=1e-5)
    assert (out - q).norm(dim=1).min() > 1e-3
    out.pow(2).sum().backward()
    assert z.grad.abs().sum() > 0 and quantizer.codebook.grad.abs().sum() > 0
    assert torch.equal(quantizer.usage_counts, torch.bincount(idx, minlength=8))
    assert int(quantizer.steps) == 1


def test_replacement_schedule_thins_out():
    cfg = LAQConfig.tiny()
    steps = [s for s in range(1, 6001) if cfg.is_replacement_step(s)]
    assert steps[:11] == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 200]
    assert 1000 in steps and 1100 not in steps and 1500 in steps and steps[-1] == 5000
    assert len(steps) == 10 + 9 + 8
    assert not any(LAQConfig.tiny(replace_schedule=()).is_replacement_step(s) for s in range(1, 6001))


def test_dead_codes_are_reinitialised_from_the_batch():
    torch.manual_seed(0)
    quantizer = LAQModel(micro(replace_schedule=((2, 10),))).quantizer
    with torch.no_grad():  # code 0 near the data, the other codes far away: only code 0 is used
        quantizer.codebook.copy_(torch.randn(8, 16) + 100.0)
        quantizer.codebook[0] = 0.0
    z = torch.randn(32, 16)
    _, idx, replaced = quantizer(z)  # step 1: no replacement
    assert replaced == 0 and set(idx.tolist()) == {0}
    z2 = torch.randn(32, 16)
    _, idx2, replaced = quantizer(z2)  # step 2: the 7 unused codes move onto rows of z2
    assert replaced == 7
    for code in quantizer.codebook[1:].detach():
        assert (z2 - code).abs().sum(1).min() == 0, "a replaced code is not a vector of the batch"
    assert len(set(idx2.tolist())) > 1
    assert torch.equal(quantizer.usage_counts, torch.bincount(idx2, minlength=8))  # counts restarted


BLOB_STEPS = 150


@pytest.fixture(scope="module")
def blob_runs():
    """150 training steps on moving blobs, with dead-code replacement every 10 steps and without
    (~12 s each). Reports codes used in the last 10 training batches and on 256 held-out pairs."""
    results = {}
    for name, schedule in (("replace", ((10, BLOB_STEPS),)), ("no_replace", ())):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        model = LAQModel(micro(replace_schedule=schedule))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        recent = set()
        for step in range(1, BLOB_STEPS + 1):
            x_t, x_next, _ = blob_pairs(32, 32, gen)
            out = model(x_t, x_next)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            if step > BLOB_STEPS - 10:
                recent |= set(out.tokens.flatten().tolist())
        model.eval()
        x_t, x_next, _ = blob_pairs(256, 32, torch.Generator().manual_seed(123))
        with torch.no_grad():
            out = model(x_t, x_next)
        results[name] = dict(used_train=len(recent), used_eval=out.tokens.unique().numel(), mse=out.loss.item(),
                             copy=F.mse_loss(x_t, x_next).item())
    return results


def test_dead_code_replacement_keeps_the_codebook_in_use(blob_runs):
    r, n = blob_runs["replace"], blob_runs["no_replace"]
    assert r["used_train"] >= 6 and r["used_eval"] >= 6, blob_runs
    assert n["used_train"] <= r["used_train"] and n["used_eval"] <= r["used_eval"], blob_runs


def test_short_training_beats_copying_x_t(blob_runs):
    r = blob_runs["replace"]
    assert r["mse"] < 0.85 * r["copy"], r


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def test_frames_to_input_range_and_round_trip():
    frames = np.random.default_rng(0).integers(0, 256, (2, 32, 40, 3), dtype=np.uint8)
    frames[0, 0, 0] = (0, 128, 255)
    x = frames_to_input(frames)
    assert x.shape == (2, 3, 32, 40) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert x[0, :, 0, 0].tolist() == pytest.approx([-1.0, 128 / 127.5 - 1, 1.0], abs=1e-6)
    np.testing.assert_array_equal(output_to_uint8(x), frames)
    assert frames_to_input(torch.from_numpy(frames[0])).shape == (1, 3, 32, 40)
    with pytest.raises(ValueError, match="uint8"):
        frames_to_input(frames.astype(np.float32))
    model = LAQModel(micro())
    with pytest.raises(ValueError, match=r"expects \(B, 3, 32, 32\)"):
        model(x, x)
    with pytest.raises(ValueError, match="float tensor"):
        model.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, 3, 32, 32))


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (dict(image_size=30), r"patch_size 4 does not divide image_size 30x30"),
    (dict(dim=60, heads=8), r"dim 60 is not divisible by heads 8"),
    (dict(action_grid=(3, 3)), r"action_grid 3x3 \(L = 9 tokens\) does not evenly reduce the patch grid 8x8"),
    (dict(image_size=(32, 24), action_grid=(2, 4)), r"patch grid 8x6"),
    (dict(conditioning="film"), r"conditioning must be one of cross_attention, additive"),
    (dict(codebook_size=1), r"codebook_size must be at least 2"),
    (dict(patch_size=0), r"patch_size must be a positive integer"),
    (dict(temporal_depth=0), r"temporal_depth must be >= 1"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(window_s=0), r"window_s must be positive"),
    (dict(replace_schedule=((10, 100), (100, 50))), r"'until' steps must increase"),
])
def test_bad_configs_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        micro(**overrides).validate()
    with pytest.raises(ValueError, match=message):
        LAQModel(micro(**overrides))


def test_config_presets_and_json_round_trip():
    for cfg in (LAQConfig.tiny(), LAQConfig.small(), LAQConfig.paper(), micro(image_size=(32, 48))):
        cfg.validate()
        again = LAQConfig.from_json(cfg.to_json())
        assert again == cfg
    paper = LAQConfig.paper()
    assert (paper.image_size, paper.patch_grid, paper.dim, paper.heads, paper.num_tokens, paper.codebook_size,
            paper.code_dim) == ((256, 256), (8, 8), 1024, 16, 4, 8, 32)
    assert LAQConfig.tiny().num_tokens == 4 and LAQConfig.tiny().pool_block == (4, 4)
    with pytest.raises(ValueError, match=r"unknown LAQConfig keys \['codebok_size'\]"):
        LAQConfig.from_dict({**LAQConfig.tiny().to_dict(), "codebok_size": 8})
    with pytest.raises(ValueError, match="model_type 'vla'"):
        LAQConfig.from_dict({**LAQConfig.tiny().to_dict(), "model_type": "vla"})


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = LAQModel(micro(conditioning="additive"))
    x_t, x_next = pair(model.config)
    model(x_t, x_next).loss.backward()  # one training forward: step counter and usage counts move
    model.save_pretrained(tmp_path / "laq", extra={"note": "hello"})
    loaded = LAQModel.from_pretrained(tmp_path / "laq")
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    model.eval(), loaded.eval()
    a, b = model(x_t, x_next), loaded(x_t, x_next)
    assert torch.equal(a.recon, b.recon) and torch.equal(a.tokens, b.tokens)
    _, config, extra = load_checkpoint(tmp_path / "laq")
    assert config == model.config.to_dict() and extra == {"note": "hello"}
    assert sorted(p.name for p in (tmp_path / "laq").iterdir()) == ["checkpoint.json", "config.json",
                                                                    "model.safetensors"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary leftovers
    # training-only keys may differ
    LAQModel.from_pretrained(tmp_path / "laq", config=micro(conditioning="additive", dropout=0.2))


def test_mismatched_config_names_the_keys(tmp_path):
    LAQModel(micro(codebook_size=16)).save_pretrained(tmp_path / "laq")
    with pytest.raises(CheckpointError, match=r"has codebook_size 16 but the config asks for 8$"):
        LAQModel.from_pretrained(tmp_path / "laq", config=micro())
    with pytest.raises(CheckpointError) as err:
        LAQModel.from_pretrained(tmp_path / "laq", config=micro(dim=32, conditioning="additive"))
    text = str(err.value)
    assert "codebook_size 16 but the config asks for 8" in text
    assert "dim 64 but the config asks for 32" in text
    assert "conditioning 'cross_attention' but the config asks for 'additive'" in text
    # weights that do not fit a model are named key by key
    state, _, _ = load_checkpoint(tmp_path / "laq")
    with pytest.raises(CheckpointError, match=r"shape mismatches quantizer.codebook \(16, 16\) vs model \(8, 16\)"):
        ckpt.load_model_state(LAQModel(micro()), state, source="x")
    del state["decoder.pos"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing keys decoder.pos; unexpected keys extra.weight"):
        ckpt.load_model_state(LAQModel(micro(codebook_size=16)), state, source="x")


def _train(model, opt, sched, steps, rng):
    losses = []
    for _ in range(steps):
        b = torch.from_numpy(rng.standard_normal((4, 3, 32, 32)).astype(np.float32)).clamp(-1, 1)
        x_next = torch.roll(b, shifts=int(torch.randint(1, 4, ())), dims=3)  # data uses numpy and torch RNGs
        loss = model(b, x_next).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def _setup(cfg):
    model = LAQModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    return model, opt, sched


def test_trainer_state_resume_reproduces_the_loss_curve_exactly(tmp_path):
    # dropout, NSVQ noise, dead-code replacement (every 2 steps) and data all draw random numbers
    cfg = micro(dropout=0.1, replace_schedule=((2, 20),))
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(0)
        np.random.seed(0)
        model, opt, sched = _setup(cfg)
        rng = np.random  # the global numpy RNG, so its state is part of the trainer state
        _train(model, opt, sched, 3, rng)
        save_checkpoint(tmp_path / "ck", model, cfg.to_dict(), optimizer=opt, scheduler=sched, step=3,
                        extra={"epoch": 0})
        uninterrupted = _train(model, opt, sched, 4, rng)

        torch.manual_seed(999)  # scramble everything the checkpoint must restore
        np.random.seed(999)
        state, config, extra = load_checkpoint(tmp_path / "ck")
        resumed_model, opt2, sched2 = _setup(LAQConfig.from_dict(config))
        ckpt.load_model_state(resumed_model, state)
        assert load_trainer_state(tmp_path / "ck", opt2, sched2) == 3 and extra == {"epoch": 0}
        assert sched2.last_epoch == 3 and opt2.param_groups[0]["betas"] == (0.9, 0.95)
        resumed = _train(resumed_model, opt2, sched2, 4, np.random)
        assert resumed == uninterrupted  # bitwise

        # the same without restoring the RNGs must differ, or this test could not fail
        state, _, _ = load_checkpoint(tmp_path / "ck")
        model3, opt3, sched3 = _setup(cfg)
        ckpt.load_model_state(model3, state)
        load_trainer_state(tmp_path / "ck", opt3, sched3, restore_rng=False)
        assert _train(model3, opt3, sched3, 4, np.random) != uninterrupted
    finally:
        torch.use_deterministic_algorithms(deterministic)

    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == ["checkpoint.json", "config.json", "model.safetensors", "trainer_state.json",
                     "trainer_state.safetensors"]
    json.loads((tmp_path / "ck" / "trainer_state.json").read_text())  # plain JSON, no pickle anywhere
    with pytest.raises(CheckpointError, match="holds AdamW state but the optimizer is SGD"):
        load_trainer_state(tmp_path / "ck", torch.optim.SGD(resumed_model.parameters(), lr=0.1))


def test_a_crash_mid_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = LAQModel(micro())
    target = tmp_path / "laq"
    model.save_pretrained(target)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.codebook.add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)  # crash while writing files
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(target)
    monkeypatch.undo()
    assert torch.equal(LAQModel.from_pretrained(target).codebook, good["quantizer.codebook"])
    assert [p.name for p in tmp_path.iterdir()] == ["laq"]  # the temporary directory is gone

    renames = []
    real_rename = os.rename

    def crash_on_second_rename(src, dst):
        renames.append((src, dst))
        if len(renames) == 2:
            raise OSError("power cut")
        real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", crash_on_second_rename)  # crash between the two renames
    with pytest.raises(OSError, match="power cut"):
        model.save_pretrained(target)
    monkeypatch.undo()
    assert not target.exists()
    with pytest.warns(UserWarning, match="a save was interrupted"):
        recovered = LAQModel.from_pretrained(target)
    assert torch.equal(recovered.codebook, good["quantizer.codebook"])
    model.save_pretrained(target)  # the next save completes and cleans up
    assert torch.equal(LAQModel.from_pretrained(target).codebook, model.codebook)
    assert [p.name for p in tmp_path.iterdir()] == ["laq"]


def test_missing_or_damaged_files_give_clear_errors(tmp_path):
    model = LAQModel(micro())
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        LAQModel.from_pretrained(tmp_path / "nothing")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        model.save_pretrained(tmp_path / "notes")
    with pytest.raises(CheckpointError, match="checkpoint.json is missing"):
        LAQModel.from_pretrained(tmp_path / "notes")

    model.save_pretrained(tmp_path / "a")
    with open(tmp_path / "a" / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="model.safetensors has 100 bytes"):
        LAQModel.from_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        LAQModel.from_pretrained(tmp_path / "b")
    with pytest.raises(CheckpointError, match="has no trainer state"):
        model.save_pretrained(tmp_path / "c")
        load_trainer_state(tmp_path / "c", torch.optim.SGD(model.parameters(), lr=0.1))
