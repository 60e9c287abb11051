"""Training LAQ (stage 1 of LAPA): frame pairs (x_t, x_{t+H}) of one or more datasets in, a model that
reconstructs x_{t+H} from x_t and L latent-action tokens out. The loop is lapa_training.trainer;
this module is what is LAQ-specific: the pair sampler, the loss, and the validation against the
"nothing moves" baseline (predict x_{t+H} = x_t).

    lapa train laq --data runs/data/sim --out runs/laq --preset tiny --steps 3000
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lapa_training.data.dataset import Dataset, gather_frames
from lapa_training.laq.configuration_laq import TRAINING_ONLY_KEYS, LAQConfig
from lapa_training.laq.modeling_laq import LAQModel, frames_to_input
from lapa_training.trainer import EpochOrder, Trainer, TrainConfig, TrainingError
from lapa_training.dataclass_dict import dataclass_kwargs

PRESETS = ("tiny", "small", "paper")


@dataclass
class LAQDataOptions:
    window_frames: int | None = None  # H in stored frames; None: each episode's own window
    camera: str | None = None  # a camera of datasets ingested with several (None: the first)
    val_pairs: int = 256  # pairs validated on (a fixed, seeded subset of the val split)
    val_batch_size: int = 64

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LAQDataOptions":
        opts = cls(**dataclass_kwargs(cls, d, "data settings", error=TrainingError))
        if opts.window_frames is not None and int(opts.window_frames) < 1:
            raise TrainingError(f"data.window_frames must be >= 1 (got {opts.window_frames})")
        if opts.val_pairs < 1 or opts.val_batch_size < 1:
            raise TrainingError("data.val_pairs and data.val_batch_size must be >= 1")
        return opts


def laq_config_from_dict(d: dict[str, Any]) -> LAQConfig:
    """A model section ({'preset': name, field: value, ...}) -> a validated LAQConfig."""
    d = dict(d)
    preset = d.pop("preset", "tiny")
    if preset not in PRESETS:
        raise TrainingError(f"unknown LAQ preset {preset!r}; presets are {', '.join(PRESETS)}")
    try:
        return getattr(LAQConfig, preset)(**d).validate()
    except TypeError as e:
        known = sorted(f.name for f in fields(LAQConfig))
        raise TrainingError(f"bad model setting ({e}); LAQ model settings are {known}") from None
    except ValueError as e:
        raise TrainingError(str(e)) from None


class FramePairs:
    """The (x_t, x_{t+H}) pairs of some datasets' split, read in a seeded order.

    The order of pairs is lapa_training.trainer.EpochOrder's (a function of seed and step).
    """

    def __init__(self, datasets: list[Dataset], split: str | None, window_frames: int | None = None, seed: int = 0):
        self.datasets = datasets
        sizes = {tuple(ds.frames.shape[1:]) for ds in datasets if len(ds)}
        if len(sizes) > 1:
            raise TrainingError(f"the datasets have different frame sizes {sorted(sizes)}; ingest them with the "
                                f"same --image-size")
        chunks = []
        for k, ds in enumerate(datasets):
            p = ds.pairs(split, window_frames)
            chunks.append(np.concatenate([np.full((len(p), 1), k, dtype=np.int64), p], axis=1))
        self.pairs = np.concatenate(chunks) if chunks else np.zeros((0, 3), dtype=np.int64)
        self.order = EpochOrder(len(self.pairs), seed)

    def __len__(self) -> int:
        return len(self.pairs)

    def rows(self, step: int, rank: int, world: int, size: int) -> np.ndarray:
        return self.pairs[self.order.indices(step, rank, world, size)]

    def load(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, H, W, 3) tensors of x_t and x_{t+H} for pair rows (dataset, i, j)."""
        return (torch.from_numpy(gather_frames(self.datasets, rows[:, 0], rows[:, 1])),
                torch.from_numpy(gather_frames(self.datasets, rows[:, 0], rows[:, 2])))


class LAQTrainJob:
    """The LAQ TrainJob: reconstruction MSE of x_{t+H} (the paper's only loss)."""

    training_only_keys = TRAINING_ONLY_KEYS

    def __init__(self, config: LAQConfig, datasets: list[Dataset], options: LAQDataOptions | None = None,
                 seed: int = 0, dataset_paths: list[str] | None = None):
        self.config, self.options, self.seed = config, options or LAQDataOptions(), seed
        self.train_pairs = FramePairs(datasets, "train", self.options.window_frames, seed)
        if len(self.train_pairs) == 0:
            raise TrainingError("the datasets have no training pairs: their train split is empty or every episode "
                                "is shorter than the window (see `lapa data info`)")
        val = FramePairs(datasets, "val", self.options.window_frames, seed)
        self.val_source = "val"
        if len(val) == 0:
            val, self.val_source = self.train_pairs, "train (the val split is empty)"
        pick = np.random.default_rng([seed, 12345]).permutation(len(val))[: self.options.val_pairs]
        self.val_rows = val.pairs[np.sort(pick)]
        self.val_pairs = val
        self.dataset_paths = dataset_paths or [str(ds.root) for ds in datasets]
        self.model = LAQModel(config)

    def model_config(self) -> dict[str, Any]:
        return self.config.to_dict()

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"kind": "laq", "datasets": self.dataset_paths, "window_frames": self.options.window_frames,
                "val_source": self.val_source}

    def batch(self, step: int, rank: int, world: int, size: int) -> dict[str, torch.Tensor]:
        x_t, x_next = self.train_pairs.load(self.train_pairs.rows(step, rank, world, size))
        return {"x_t": x_t, "x_next": x_next}

    def _inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.config.image_size
        return frames_to_input(batch["x_t"], size=size), frames_to_input(batch["x_next"], size=size)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        x_t, x_next = self._inputs(batch)
        out = model(x_t, x_next)
        return out.loss, {"perplexity": float(out.perplexity), "codebook_usage": float(out.codebook_usage),
                          "replaced_codes": float(out.replaced_codes)}

    def validate(self, model: LAQModel) -> dict[str, float]:
        device = next(model.parameters()).device
        se = copy_se = 0.0
        count = 0
        tokens = []
        for start in range(0, len(self.val_rows), self.options.val_batch_size):
            x_t, x_next = self.val_pairs.load(self.val_rows[start:start + self.options.val_batch_size])
            x_t, x_next = self._inputs({"x_t": x_t.to(device), "x_next": x_next.to(device)})
            out = model(x_t, x_next)
            se += float(((out.recon.float() - x_next) ** 2).sum())
            copy_se += float(((x_t - x_next) ** 2).sum())
            count += x_next.numel()
            tokens.append(out.tokens.cpu())
        mse, copy_mse = se / count, copy_se / count
        usage, perplexity = code_statistics(torch.cat(tokens), self.config.codebook_size)
        return {"val_mse": mse, "val_copy_mse": copy_mse, "val_mse_over_copy": mse / max(copy_mse, 1e-12),
                "val_codebook_usage": float(usage.mean()), "val_perplexity": float(perplexity.mean())}


def code_statistics(tokens: torch.Tensor, codebook_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per token position: fraction of the codebook used, and perplexity (exp entropy) of the code
    histogram, for tokens (M, L)."""
    usage, perplexity = [], []
    for pos in range(tokens.shape[1]):
        counts = torch.bincount(tokens[:, pos], minlength=codebook_size).double()
        p = counts / counts.sum().clamp_min(1)
        usage.append(float((counts > 0).double().mean()))
        perplexity.append(float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())))
    return np.array(usage), np.array(perplexity)


def train_laq(data: list[str | Path], out: str | Path, model_section: dict[str, Any],
              train_section: dict[str, Any], data_section: dict[str, Any], *, resume: bool = False,
              overwrite: bool = False, progress: bool = True, callbacks=None) -> Path:
    """Train LAQ on datasets `data` into run directory `out`; returns the final model directory."""
    from lapa_training.data.errors import IngestError

    config = laq_config_from_dict(model_section)
    train_cfg = TrainConfig.from_dict({**LAQ_TRAIN_DEFAULTS, **train_section})
    if train_cfg.grad_accum_steps != 1:
        # NSVQ counts every training forward as a step of its dead-code schedule and may replace codes
        # between micro-batches
        raise TrainingError("train.grad_accum_steps must be 1 for LAQ: its codebook replacement runs per forward "
                            "pass; lower train.batch_size or use more processes instead")
    options = LAQDataOptions.from_dict(data_section)
    if not data:
        raise TrainingError("no dataset given (--data)")
    try:
        datasets = [Dataset(p, camera=options.camera) for p in data]
    except IngestError as e:
        raise TrainingError(str(e)) from None
    torch.manual_seed(train_cfg.seed)  # model initialisation
    job = LAQTrainJob(config, datasets, options, seed=train_cfg.seed,
                      dataset_paths=[str(Path(p).resolve()) for p in data])
    trainer = Trainer(job, train_cfg, out, resume=resume, overwrite=overwrite, progress=progress,
                      callbacks=callbacks, run_info={"job": "laq", "data": job.dataset_paths,
                                                     "data_options": vars(options),
                                                     "train_pairs": len(job.train_pairs),
                                                     "val_pairs": len(job.val_rows), "val_source": job.val_source})
    if progress and trainer.accelerator.is_main_process:
        print(f"LAQ {model_section.get('preset', 'tiny')}: {job.model.num_parameters() / 1e6:.2f} M parameters, "
              f"{len(job.train_pairs)} training pairs, validating on {len(job.val_rows)} {job.val_source} pairs, "
              f"device {trainer.accelerator.device}, {trainer.accelerator.num_processes} process(es)")
    return trainer.train()


# The trainer defaults, tuned for LAQ on the simulator (lr 2e-3 stalls the tiny model; 1e-3 learns).
LAQ_TRAIN_DEFAULTS: dict[str, Any] = {"lr": 1e-3, "grad_clip": 0.5, "batch_size": 32, "warmup_steps": 100}
