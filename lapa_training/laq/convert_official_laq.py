"""The LAPA release's LAQ weights (`laq_openx.pt`: a raw PyTorch state dict of the release's
`LatentActionQuantization`) into an OfficialLAQModel checkpoint (safetensors + JSON).

The file is read with ``torch.load(weights_only=True)``: tensors and plain containers only, never
arbitrary pickled objects. Every tensor of the file is mapped onto one of ours or named as unused by
the release's forward (self-attention's empty null key/values and its context norm, which only
cross-attention reads), and shape-checked; missing, unexpected or misshapen keys are one error that
lists them.

The architecture's sizes come from the weights (width, patch, depths, heads, code size, codebook);
the image size and token count do not show in them, and default to the release's 256 and 4.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any

import torch

from lapa_training.checkpoint import abbreviate
from lapa_training.laq.configuration_official_laq import DOWNSAMPLING, OfficialLAQConfig
from lapa_training.laq.modeling_official_laq import OfficialLAQModel

DDP_PREFIX = "module."  # a state dict saved from a DistributedDataParallel wrapper


# (config field, the release's tensor whose first dimension it is, that tensor's dimensions)
SIZE_TENSORS = (("heads", "spatial_rel_pos_bias.net.2.weight", 2),
                ("dim_head", "enc_spatial_transformer.layers.0.1.q_scale", 1),
                ("code_dim", "vq.project_in.weight", 2),
                ("codebook_size", "vq.codebooks", 2))


class ConversionError(ValueError):
    """The file cannot be read, or its tensors do not fit the release's architecture; the message says which."""


def read_release_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The file's tensors by name (a DataParallel 'module.' prefix removed, as the release's own loader does)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"no such file: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a refused pickle, a truncated zip, not a torch file: each its own type
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"cannot read {path} as a PyTorch state dict (weights only): {first}") from e
    if not isinstance(obj, dict) or not obj:
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v))
    if bad:
        raise ConversionError(f"{path} is not a flat state dict: [{abbreviate(bad)}] are not named tensors")
    return {k[len(DDP_PREFIX):] if k.startswith(DDP_PREFIX) else k: v for k, v in obj.items()}


def infer_config(state: dict[str, torch.Tensor], *, image_size: int = 256, num_tokens: int = 4,
                 window_s: float | None = None) -> OfficialLAQConfig:
    """The config whose shapes the weights have; what they do not show comes from the arguments."""
    defaults = OfficialLAQConfig()
    sizes: dict[str, Any] = {}
    proj = state.get("to_patch_emb_first_frame.2.weight")
    if proj is not None and proj.ndim == 2:
        sizes["dim"] = int(proj.shape[0])
        patch = math.isqrt(int(proj.shape[1]) // defaults.channels)
        if patch * patch * defaults.channels == proj.shape[1]:
            sizes["patch_size"] = patch
    for field, key, ndim in SIZE_TENSORS:  # each size is the first dimension of one tensor
        tensor = state.get(key)
        if tensor is not None and tensor.ndim == ndim:
            sizes[field] = int(tensor.shape[0])
    for field, prefix in (("spatial_depth", "enc_spatial_transformer"), ("temporal_depth", "enc_temporal_transformer")):
        layers = {int(m.group(1)) for k in state if (m := re.match(rf"{prefix}\.layers\.(\d+)\.", k))}
        if layers:
            sizes[field] = max(layers) + 1
    config = OfficialLAQConfig(image_size=image_size, num_tokens=num_tokens, **sizes,
                               **({"window_s": window_s} if window_s is not None else {}))
    try:
        return config.validate()
    except ValueError as e:
        raise ConversionError(f"the weights with image size {image_size} and {num_tokens} tokens make no valid LAQ "
                              f"(give the image size and token count it was trained with): {e}") from e


def release_key_map(cfg: OfficialLAQConfig) -> dict[str, tuple[str | None, tuple[int, ...]]]:
    """Release tensor name -> (our name, or None where the release's forward never reads it; its shape)."""
    d, h, dh, e = cfg.dim, cfg.heads, cfg.dim_head, cfg.code_dim
    inner, ff = cfg.inner_dim, cfg.ff_inner_dim
    out: dict[str, tuple[str | None, tuple[int, ...]]] = {}

    def linear(release: str, ours: str | None, n_out: int, n_in: int, bias: bool = True) -> None:
        out[f"{release}.weight"] = (ours and f"{ours}.weight", (n_out, n_in))
        if bias:
            out[f"{release}.bias"] = (ours and f"{ours}.bias", (n_out,))

    def norm(release: str, ours: str | None, n: int, names=("weight", "bias")) -> None:
        for theirs, mine in zip(names, ("weight", "bias")):
            out[f"{release}.{theirs}"] = (ours and f"{ours}.{mine}", (n,))

    def attention(release: str, ours: str, cross: bool) -> None:
        norm(f"{release}.norm", f"{ours}.norm", d, ("gamma", "beta"))
        norm(f"{release}.context_norm", f"{ours}.context_norm" if cross else None, d, ("gamma", "beta"))
        out[f"{release}.null_kv"] = (f"{ours}.null_kv" if cross else None, (h, 4 if cross else 0, dh))
        out[f"{release}.q_scale"] = (f"{ours}.q_gain", (dh,))
        out[f"{release}.k_scale"] = (f"{ours}.k_gain", (dh,))
        linear(f"{release}.to_q", f"{ours}.q", inner, d, bias=False)
        linear(f"{release}.to_kv", f"{ours}.kv", 2 * inner, d, bias=False)
        linear(f"{release}.to_out", f"{ours}.out", d, inner, bias=False)

    norm("to_patch_emb_first_frame.1", "patch_embedding.norm_in", cfg.patch_dim)
    linear("to_patch_emb_first_frame.2", "patch_embedding.proj", d, cfg.patch_dim)
    norm("to_patch_emb_first_frame.3", "patch_embedding.norm_out", d)
    linear("spatial_rel_pos_bias.net.0.0", "position_bias.mlp.0", d, 2)
    linear("spatial_rel_pos_bias.net.1.0", "position_bias.mlp.2", d, d)
    linear("spatial_rel_pos_bias.net.2", "position_bias.mlp.4", h, d)
    for release, ours, depth, cross in (("enc_spatial_transformer", "encoder_spatial", cfg.spatial_depth, False),
                                        ("enc_temporal_transformer", "encoder_temporal", cfg.temporal_depth, False),
                                        ("dec_spatial_transformer", "decoder", cfg.spatial_depth, True)):
        for i in range(depth):
            r, o = f"{release}.layers.{i}", f"{ours}.blocks.{i}"
            out[f"{r}.0.dsconv.weight"] = (f"{o}.position.conv.weight", (d, 1, 3, 3, 3))
            out[f"{r}.0.dsconv.bias"] = (f"{o}.position.conv.bias", (d,))
            attention(f"{r}.1", f"{o}.attn", cross=False)
            if cross:
                attention(f"{r}.2", f"{o}.cross_attn", cross=True)
            norm(f"{r}.3.0", f"{o}.ff.norm", d)
            linear(f"{r}.3.1", f"{o}.ff.up", 2 * ff, d, bias=False)
            linear(f"{r}.3.4", f"{o}.ff.down", d, ff, bias=False)
        norm(f"{release}.norm_out", f"{ours}.norm", d, ("gamma", "beta"))
    out["vq.codebooks"] = ("quantizer.codebook", (cfg.codebook_size, e))
    linear("vq.project_in", "quantizer.project_in", e, d)
    linear("vq.project_out", "quantizer.project_out", d, e)
    for j, (kernel, _, _) in enumerate(DOWNSAMPLING[cfg.num_tokens]):
        out[f"vq.cnn_encoder.{2 * j}.weight"] = (f"quantizer.downsample.{2 * j}.weight", (e, e, *kernel))
        out[f"vq.cnn_encoder.{2 * j}.bias"] = (f"quantizer.downsample.{2 * j}.bias", (e,))
    linear("to_pixels_first_frame.0", "to_pixels", cfg.patch_dim, d)
    return out


def convert_release_state(state: dict[str, torch.Tensor], config: OfficialLAQConfig,
                          source: Any = "the weights") -> OfficialLAQModel:
    """An OfficialLAQModel holding the release's tensors (as float32), or a ConversionError listing
    every key that is missing, unexpected or of the wrong shape."""
    mapping = release_key_map(config)
    missing = [k for k in mapping if k not in state]
    unexpected = [k for k in state if k not in mapping]
    shapes = [f"{k} {tuple(state[k].shape)} (expected {shape})" for k, (_, shape) in mapping.items()
              if k in state and tuple(state[k].shape) != shape]
    if missing or unexpected or shapes:
        parts = [f"{label} [{abbreviate(keys, 6)}]" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("misshapen", shapes)) if keys]
        raise ConversionError(f"{source} does not fit the release's LAQ ({_describe(config)}): " + "; ".join(parts))
    model = OfficialLAQModel(config)
    ours = {mine: state[theirs].to(torch.float32) for theirs, (mine, _) in mapping.items() if mine is not None}
    model.load_state_dict(ours, strict=True)  # every parameter and buffer of ours is named exactly once above
    return model.eval()


def convert_file(path: str | Path, out: str | Path, *, image_size: int = 256, num_tokens: int = 4,
                 window_s: float | None = None) -> OfficialLAQModel:
    """Read, convert and save; the checkpoint records the source file and its SHA-256."""
    state = read_release_state(path)
    model = convert_release_state(state, infer_config(state, image_size=image_size, num_tokens=num_tokens,
                                                      window_s=window_s), source=path)
    model.save_pretrained(out, extra={"converted_from": str(Path(path).resolve()), "sha256": _sha256(path),
                                      "release": "LatentActionPretraining/LAPA laq (LatentActionQuantization)"})
    return model


def _describe(cfg: OfficialLAQConfig) -> str:
    return (f"width {cfg.dim}, patch {cfg.patch_size}, {cfg.spatial_depth}+{cfg.temporal_depth} encoder blocks, "
            f"{cfg.heads} heads of {cfg.dim_head}, codebook {cfg.codebook_size}x{cfg.code_dim}, "
            f"{cfg.num_tokens} tokens")


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
