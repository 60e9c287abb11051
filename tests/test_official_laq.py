"""The LAPA release's LAQ: `lapa convert laq` reads its published state dict (weights only) into our
implementation of its architecture, which must compute what the release's own code computes.

tests/data/official_laq/ holds a tiny model of the release's architecture, saved by the release's code,
with the release's tokens, pre-quantization vectors and reconstructions on fixed frame pairs
(tests/data/make_official_laq.py says how it was made).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import user_error
from lapa_cli.main import main
from lapa_training.laq import frames_to_input
from lapa_training.laq.configuration_official_laq import OfficialLAQConfig
from lapa_training.laq.convert_official_laq import (
    ConversionError, convert_release_state, infer_config, read_release_state, release_key_map)
from lapa_training.laq.loading import load_laq
from lapa_training.laq.modeling_official_laq import OfficialLAQModel

DATA = Path(__file__).parent / "data" / "official_laq"
WEIGHTS = DATA / "laq_tiny.pt"
TINY_SIZE = 64  # the fixture's image side; not visible in its weights


@pytest.fixture(scope="module")
def expected():
    with np.load(DATA / "expected.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def converted() -> OfficialLAQModel:
    state = read_release_state(WEIGHTS)
    return convert_release_state(state, infer_config(state, image_size=TINY_SIZE))


def unit_frames(frames: np.ndarray, which: int) -> torch.Tensor:
    """uint8 pairs (B, 2, H, W, 3) -> frame `which` as (B, 3, H, W) in [0, 1], as the release's ToTensor gives."""
    return torch.from_numpy(frames[:, which]).permute(0, 3, 1, 2).float().div(255)


def test_sizes_are_read_from_the_weights():
    cfg = infer_config(read_release_state(WEIGHTS), image_size=TINY_SIZE)
    assert (cfg.dim, cfg.patch_size, cfg.heads, cfg.dim_head) == (16, 8, 2, 8)
    assert (cfg.spatial_depth, cfg.temporal_depth, cfg.code_dim, cfg.codebook_size, cfg.num_tokens) == (2, 2, 8, 8, 4)


def test_the_converted_model_computes_what_the_release_computes(converted, expected):
    x_t, x_next = unit_frames(expected["frames"], 0), unit_frames(expected["frames"], 1)
    z = converted.latents_01(x_t, x_next)
    np.testing.assert_allclose(z.reshape(-1, z.shape[-1]).numpy(), expected["z"], rtol=1e-4, atol=1e-5)
    tokens = converted.encode_01(x_t, x_next)
    np.testing.assert_array_equal(tokens.numpy(), expected["tokens"])
    recon = converted.decode_01(x_t, tokens)
    np.testing.assert_allclose(recon.numpy(), expected["recon"], rtol=1e-4, atol=1e-5)


def test_the_pipelines_frames_give_the_same_tokens(converted, expected):
    """Labelling and evaluation feed frames_to_input's [-1, 1]; the model maps that back to [0, 1]."""
    frames = expected["frames"]
    tokens = converted.encode(frames_to_input(frames[:, 0]), frames_to_input(frames[:, 1]))
    np.testing.assert_array_equal(tokens.numpy(), expected["tokens"])
    recon = converted.decode(frames_to_input(frames[:, 0]), tokens)
    np.testing.assert_allclose(((recon + 1) / 2).numpy(), expected["recon"], rtol=1e-4, atol=1e-4)


def test_the_release_configuration_maps_every_tensor_once():
    """At the release's full size (built on the meta device: no memory), our modules and the key map agree,
    and the map covers the release's 343,864,688 numbers (counted by instantiating its code)."""
    cfg = OfficialLAQConfig()
    with torch.device("meta"):
        model = OfficialLAQModel(cfg)
    mapping = release_key_map(cfg)
    ours = {mine: shape for mine, shape in mapping.values() if mine is not None}
    assert len(ours) == sum(1 for v in mapping.values() if v[0] is not None), "two release keys map onto one of ours"
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == ours
    assert sum(int(np.prod(shape)) for _, shape in mapping.values()) == 343_864_688


def test_missing_unexpected_and_misshapen_keys_are_one_error():
    state = read_release_state(WEIGHTS)
    del state["vq.codebooks"]
    state["vq.extra_table"] = torch.zeros(3)
    state["to_pixels_first_frame.0.bias"] = torch.zeros(5)
    with pytest.raises(ConversionError) as info:
        convert_release_state(state, infer_config(state, image_size=TINY_SIZE), source="laq.pt")
    message = str(info.value)
    assert "\n" not in message
    for needle in ("missing [vq.codebooks]", "unexpected [vq.extra_table]", "misshapen [to_pixels_first_frame.0.bias (5,)"):
        assert needle in message, message


def test_a_data_parallel_prefix_is_removed(tmp_path, expected):
    state = read_release_state(WEIGHTS)
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")
    prefixed = read_release_state(tmp_path / "ddp.pt")
    model = convert_release_state(prefixed, infer_config(prefixed, image_size=TINY_SIZE))
    frames = expected["frames"]
    np.testing.assert_array_equal(model.encode_01(unit_frames(frames, 0), unit_frames(frames, 1)).numpy(),
                                  expected["tokens"])


RAN = []


def _side_effect():
    RAN.append(True)
    return torch.zeros(1)


class Payload:
    def __reduce__(self):
        return _side_effect, ()


def test_a_file_with_pickled_objects_is_refused_unrun(tmp_path, capsys):
    torch.save({"to_pixels_first_frame.0.bias": Payload()}, tmp_path / "objects.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    user_error(capsys, ["convert", "laq", str(tmp_path / "objects.pt"), "--out", str(tmp_path / "a")],
               "weights only")
    assert not RAN, "unpickling ran the file's code"
    user_error(capsys, ["convert", "laq", str(tmp_path / "garbage.pt"), "--out", str(tmp_path / "b")], "cannot read")
    user_error(capsys, ["convert", "laq", str(tmp_path / "none.pt"), "--out", str(tmp_path / "c")], "no such file")
    user_error(capsys, ["convert", "laq", str(WEIGHTS), "--out", str(tmp_path / "d")],  # 256 px is not its size
               "image size 256", "4 tokens")
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_convert_then_label_and_evaluate(tmp_path, sim_dataset, expected, capsys):
    out = tmp_path / "laq_release"
    assert main(["convert", "laq", str(WEIGHTS), "--out", str(out), "--image-size", str(TINY_SIZE)]) == 0
    assert "4 tokens from a codebook of 8" in capsys.readouterr().out
    user_error(capsys, ["convert", "laq", str(WEIGHTS), "--out", str(out), "--image-size", str(TINY_SIZE)],
               "exists", "--overwrite")
    model = load_laq(out)
    assert isinstance(model, OfficialLAQModel)
    frames = expected["frames"]
    np.testing.assert_array_equal(model.encode_01(unit_frames(frames, 0), unit_frames(frames, 1)).numpy(),
                                  expected["tokens"])

    data = tmp_path / "data"
    shutil.copytree(sim_dataset, data)
    assert main(["label", "--laq", str(out), "--data", str(data), "--quiet"]) == 0
    from lapa_training.data.dataset import Dataset
    from lapa_training.laq.labelling import read_labels

    ds = Dataset(data)
    labels = read_labels(data, "laq")
    rows = labels.labelled()[:: max(1, len(labels.labelled()) // 16)]
    partners = np.array([r + _window(ds, r) for r in rows])
    pixels = np.asarray(ds.frames)
    direct = model.encode_01(torch.from_numpy(pixels[rows]).permute(0, 3, 1, 2).float() / 255,
                             torch.from_numpy(pixels[partners]).permute(0, 3, 1, 2).float() / 255)
    np.testing.assert_array_equal(labels.tokens[rows], direct.numpy())
    assert labels.meta["laq_config"]["model_type"] == "official_laq"

    report = tmp_path / "eval"
    assert main(["eval", "laq", "--checkpoint", str(out), "--data", str(data), "--out", str(report),
                 "--max-pairs", "64"]) == 0
    assert (report / "report.json").is_file() and (report / "codebook_usage.png").is_file()


def _window(ds, frame: int) -> int:
    for e in ds.episodes:
        if e["start"] <= frame < e["start"] + e["length"]:
            return int(e["window_frames"])
    raise AssertionError(f"frame {frame} is in no episode")
