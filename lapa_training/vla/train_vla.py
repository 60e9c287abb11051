"""Training the VLA: latent pretraining (LAPA), the paper's baselines, and action finetuning.

    pretrain --objective latent   targets: LAQ tokens of action-free frames (lapa label)      LAPA
    pretrain --objective action   targets: the true actions                                 ACTIONVLA
    pretrain --objective idm      an IDM trained on the labelled episodes pseudo-labels the
                                  data, targets: the pseudo-actions                         VPT
    finetune [--init PRETRAINED]  a fresh action head on a few labelled episodes; no --init = SCRATCH

Every job is a TrainJob for lapa_training.trainer: the same loop, checkpoints and exact resume as
LAQ. A sample is one frame x_t, its episode's instruction, and a target: L latent tokens, or the
next k actions (k = chunk_size) as bin ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lapa_training.data.dataset import Dataset, gather_frames
from lapa_training.trainer import EpochOrder, Trainer, TrainConfig, TrainingError, is_main_process, \
    latest_model_dir
from lapa_training.vla.action_bins import IGNORE_INDEX, ActionBins
from lapa_training.vla.configuration_vla import VLAConfig
from lapa_training.vla.modeling_vla import VLAModel
from lapa_training.dataclass_dict import dataclass_kwargs

PRESETS = ("tiny", "paper", "vlm")  # VLAConfig's presets; config/train/presets/ names VLMs for "vlm"
VLA_TRAIN_DEFAULTS: dict[str, Any] = {"lr": 3e-4, "batch_size": 32, "warmup_steps": 50, "grad_clip": 1.0,
                                      "weight_decay": 0.01}


@dataclass
class VLADataOptions:
    labels: str = "laq"  # latent labels name (<dataset>/labels/<name>), objective latent
    camera: str | None = None  # a camera of datasets ingested with several (None: the first)
    episodes: int | None = None  # labelled training episodes used (finetune, and the IDM); None = all
    val_samples: int = 256
    augment: bool | None = None  # random crop + colour jitter; None: on for finetuning, off for pretraining
    idm_steps: int = 1500  # objective idm: IDM training steps
    idm_batch_size: int = 64

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VLADataOptions":
        opts = cls(**dataclass_kwargs(cls, d, "data settings", error=TrainingError))
        if opts.episodes is not None and int(opts.episodes) < 1:
            raise TrainingError(f"the number of labelled episodes must be >= 1 (got {opts.episodes})")
        if opts.val_samples < 1 or opts.idm_steps < 1 or opts.idm_batch_size < 1:
            raise TrainingError("data.val_samples, data.idm_steps and data.idm_batch_size must be >= 1")
        return opts


def vla_config_from_dict(d: dict[str, Any], **fixed) -> VLAConfig:
    """A model section ({'preset': 'tiny'|'paper'|'vlm', field: value}) -> VLAConfig, with `fixed` keys set."""
    d = {**dict(d), **fixed}
    preset = d.pop("preset", "tiny")
    if preset not in PRESETS:
        raise TrainingError(f"unknown VLA preset {preset!r}; presets are {', '.join(PRESETS)}")
    try:
        return getattr(VLAConfig, preset)(**d)
    except TypeError as e:
        known = sorted(f.name for f in fields(VLAConfig))
        raise TrainingError(f"bad model setting ({e}); VLA model settings are {known}") from None
    except ValueError as e:
        raise TrainingError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# samples
# ---------------------------------------------------------------------------------------------
def pick_episodes(ds: Dataset, count: int | None, seed: int) -> list[int]:
    """Indices of `count` train-split episodes with actions, in a seeded order that does not depend
    on count (so 5 episodes are a subset of 10: sweeps over the labelled-set size are nested)."""
    have = [i for i, e in enumerate(ds.episodes) if e["split"] == "train" and e.get("has_actions")]
    order = [have[j] for j in np.random.default_rng([seed, 777]).permutation(len(have))]
    return sorted(order if count is None else order[:count])


@dataclass
class Samples:
    """Frames with targets: which[j] dataset, index[j] frame, targets[j] (L,) tokens or (k, 7) actions."""

    which: np.ndarray
    index: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    def subset(self, rows: np.ndarray) -> "Samples":
        return Samples(self.which[rows], self.index[rows], self.targets[rows])

    @staticmethod
    def concat(parts: list["Samples"], target_shape: tuple[int, ...], dtype) -> "Samples":
        if not parts:
            return Samples(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0,) + target_shape, dtype))
        return Samples(np.concatenate([p.which for p in parts]), np.concatenate([p.index for p in parts]),
                       np.concatenate([p.targets for p in parts]))


def latent_samples(datasets: list[Dataset], split: str, labels_name: str) -> Samples:
    from lapa_training.laq.labelling import LabelError, read_labels

    parts = []
    for k, ds in enumerate(datasets):
        try:
            labels = read_labels(ds.root, labels_name, ds)
        except LabelError as e:
            raise TrainingError(str(e)) from None
        tokens = np.asarray(labels.tokens)
        in_split = np.zeros(len(ds), bool)
        for e in ds.split_episodes(split):
            in_split[e["start"]:e["start"] + e["length"]] = True
        idx = np.nonzero(in_split & (tokens[:, 0] >= 0))[0]
        parts.append(Samples(np.full(len(idx), k), idx, tokens[idx].astype(np.int64)))
    return Samples.concat(parts, (labels.num_tokens,) if datasets else (0,), np.int64)


def action_samples(datasets: list[Dataset], split: str, chunk: int, episodes: list[list[int]] | None = None,
                   actions: list[np.ndarray] | None = None) -> Samples:
    """Frames whose next `chunk` actions are all known (same episode), of the split (or of the
    given episodes per dataset), with those actions (k, 7); `actions` replaces the datasets' own
    (pseudo-actions)."""
    parts = []
    for k, ds in enumerate(datasets):
        acts = np.asarray(ds.actions if actions is None else actions[k], dtype=np.float32)
        chosen = [ds.episodes[i] for i in episodes[k]] if episodes is not None else ds.split_episodes(split)
        for e in chosen:
            s, n = e["start"], e["length"]
            if n < chunk:
                continue
            windows = np.stack([acts[s + j: s + n - chunk + 1 + j] for j in range(chunk)], axis=1)  # (m, k, 7)
            ok = np.isfinite(windows).all(axis=(1, 2))
            idx = np.arange(s, s + n - chunk + 1)[ok]
            parts.append(Samples(np.full(len(idx), k), idx, windows[ok]))
    return Samples.concat(parts, (chunk, 7), np.float32)


# ---------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------
class VLATrainJob:
    """Latent targets -> cross-entropy over L positions of |C|; action targets -> bin ids, cross-
    entropy over k x 7 positions. Images are augmented (finetuning) after preprocessing."""

    shardable = True  # FSDP: no state outside the parameters that processes must keep equal (lapa_training.sharding)

    def __init__(self, model: VLAModel, datasets: list[Dataset], train: Samples, val: Samples, *,
                 seed: int, augment: bool, val_source: str, info: dict[str, Any]):
        if len(train) == 0:
            raise TrainingError("no training samples: the datasets' train split has no frame with a target "
                                "(see `lapa data info`)")
        self.model, self.datasets, self.train, self.seed, self.augment = model, datasets, train, seed, augment
        pick = np.random.default_rng([seed, 4242]).permutation(len(val))[:info.get("val_samples", 256)]
        self.val = val.subset(np.sort(pick))
        self.val_source, self.info = val_source, info
        self.order = EpochOrder(len(train), seed)

    def model_config(self) -> dict[str, Any]:
        return self.model.checkpoint_config()

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"kind": f"vla-{self.model.config.stage}-{self.model.config.objective}", **self.info}

    def save(self, directory: Path, model: VLAModel, **kwargs) -> Path:
        return model.save_pretrained(directory, **kwargs)

    def _batch(self, samples: Samples, rows: np.ndarray) -> dict[str, Any]:
        sub = samples.subset(rows)
        images = gather_frames(self.datasets, sub.which, sub.index)
        instructions = [self.datasets[int(k)].episodes[int(self.datasets[int(k)].episode_index[i])]["instruction"]
                        for k, i in zip(sub.which, sub.index)]
        if self.model.vlm is not None:  # its processor reads numpy frames on the CPU: no trip to the GPU and back
            return {"images": images, "instructions": instructions, "targets": sub.targets}
        return {"images": torch.from_numpy(images), "instructions": instructions, "targets": sub.targets}

    def batch(self, step: int, rank: int, world: int, size: int) -> dict[str, Any]:
        return self._batch(self.train, self.order.indices(step, rank, world, size))

    def _forward(self, model: nn.Module, batch: dict[str, Any], augment: bool):
        inner: VLAModel = getattr(model, "module", model)
        inputs = inner.prepare_inputs(batch["images"], batch["instructions"])
        if augment:
            inputs["pixel_values"] = augment_images(inputs["pixel_values"])
        targets = batch["targets"]
        if inner.head == "latent":
            labels = torch.as_tensor(targets, device=inner.device)
            return model(**inputs, labels=labels), labels
        labels = inner.encode_actions(targets)
        return model(**inputs, labels=labels, actions=torch.from_numpy(targets)), labels

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        out, _ = self._forward(model, batch, self.augment)
        return out.loss, {"accuracy": float(out.accuracy)}

    def validate(self, model: VLAModel) -> dict[str, float]:
        losses, hits, within, count = [], 0.0, 0.0, 0
        errors = []
        for start in range(0, len(self.val), 64):
            batch = self._batch(self.val, np.arange(start, min(len(self.val), start + 64)))
            out, labels = self._forward(model, batch, augment=False)
            valid = labels != IGNORE_INDEX
            losses.append(float(out.loss) * int(valid.sum()))
            hits += float(((out.predictions == labels) & valid).sum())
            within += float((((out.predictions - labels).abs() <= 1) & valid).sum())
            count += int(valid.sum())
            if model.head == "action":
                decoded = model.decode_actions(out)
                errors.append(np.abs(decoded - batch["targets"]))
        metrics = {"val_loss": sum(losses) / max(count, 1), "val_token_accuracy": hits / max(count, 1)}
        if model.head == "action":
            metrics["val_within_one_bin"] = within / max(count, 1)
            err = np.concatenate(errors)
            metrics["val_xyz_error_mm"] = float(np.nanmean(err[..., :3]) * 1000)
        return metrics


def augment_images(pixels: torch.Tensor, scale: tuple[float, float] = (0.85, 1.0), shift: float = 0.06,
                   jitter: float = 0.1) -> torch.Tensor:
    """Per image: a random crop (area scale, translation) resized back, and brightness/contrast
    jitter, with the torch RNG (seeded per step by the trainer)."""
    b = pixels.shape[0]
    dev = pixels.device
    s = torch.empty(b, device=dev).uniform_(*scale).sqrt()
    t = torch.empty(b, 2, device=dev).uniform_(-shift, shift)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=pixels.dtype)
    theta[:, 0, 0] = s
    theta[:, 1, 1] = s
    theta[:, :, 2] = t
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    out = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    gain = 1 + torch.empty(b, 1, 1, 1, device=dev).uniform_(-jitter, jitter)
    bias = torch.empty(b, 1, 1, 1, device=dev).uniform_(-jitter, jitter)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return (out - mean) * gain + mean + bias


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------
def _open(paths: list[str | Path], what: str, camera: str | None = None) -> list[Dataset]:
    from lapa_training.data.errors import IngestError

    if not paths:
        raise TrainingError(f"no {what} given")
    try:
        datasets = [Dataset(p, camera=camera) for p in paths]
    except IngestError as e:
        raise TrainingError(str(e)) from None
    sizes = {tuple(ds.frames.shape[1:]) for ds in datasets if len(ds)}
    if len(sizes) > 1:
        raise TrainingError(f"the {what} have different frame sizes {sorted(sizes)}; ingest them with the same "
                            f"--image-size")
    return datasets


def _control_rate(datasets: list[Dataset]) -> float:
    rates = {float(ds.meta.get("control_rate_hz", 10.0)) for ds in datasets}
    if len(rates) > 1:
        raise TrainingError(f"the datasets have different control rates {sorted(rates)} Hz: actions per step would "
                            f"mean different things; ingest them with the same --rate")
    return rates.pop()


def _val(train_or_val: Samples, val: Samples) -> tuple[Samples, str]:
    return (val, "val") if len(val) else (train_or_val, "train (the val split has no samples)")


def _run(job: VLATrainJob, train_cfg: TrainConfig, out, resume, overwrite, progress, callbacks, run_info) -> Path:
    trainer = Trainer(job, train_cfg, out, resume=resume, overwrite=overwrite, progress=progress,
                      callbacks=callbacks, run_info=run_info,
                      keep=("idm",) if job.model.config.objective == "idm" and job.model.config.stage == "pretrain" else ())
    if progress and trainer.accelerator.is_main_process:
        counts = job.model.parameter_counts()
        print(f"VLA {job.model.config.stage} ({job.model.config.objective}, {job.model.head} head): "
              f"{job.model.num_parameters() / 1e6:.2f} M parameters ({job.model.num_parameters(True) / 1e6:.2f} M "
              f"trained; {', '.join(f'{k} {v / 1e6:.2f} M' for k, v in counts.items())}); {len(job.train)} training "
              f"samples, validating on {len(job.val)} {job.val_source} samples")
    return trainer.train()


def pretrain(objective: str, data: list[str | Path], out: str | Path, model_section: dict[str, Any],
             train_section: dict[str, Any], data_section: dict[str, Any], *, labelled: list[str | Path] = (),
             resume: bool = False, overwrite: bool = False, progress: bool = True, callbacks=None) -> Path:
    """Pretrain the VLA on `data` with the objective latent (LAQ labels), action (true actions) or
    idm (pseudo-actions from an IDM trained on `labelled`). Returns the final model directory."""
    from lapa_training.vla.configuration_vla import OBJECTIVES

    if objective not in OBJECTIVES:
        raise TrainingError(f"unknown objective {objective!r}; objectives are {', '.join(OBJECTIVES)}")
    train_cfg = TrainConfig.from_dict({**VLA_TRAIN_DEFAULTS, **train_section})
    opts = VLADataOptions.from_dict(data_section)
    datasets = _open(data, "datasets (--data)", opts.camera)
    config = vla_config_from_dict(model_section, objective=objective, stage="pretrain",
                                  control_rate=_control_rate(datasets))
    torch.manual_seed(train_cfg.seed)
    info: dict[str, Any] = {"objective": objective, "data": [str(Path(p).resolve()) for p in data],
                            "val_samples": opts.val_samples}
    if objective == "latent":
        train = latent_samples(datasets, "train", opts.labels)
        val, val_source = _val(train, latent_samples(datasets, "val", opts.labels))
        model = VLAModel(config)
        if model.config.latent_tokens != train.targets.shape[1]:
            raise TrainingError(f"the labels have {train.targets.shape[1]} tokens per frame but model.latent_tokens "
                                f"is {model.config.latent_tokens}; set --set model.latent_tokens="
                                f"{train.targets.shape[1]}")
        if len(train) and int(train.targets.max()) >= model.config.codebook_size:
            raise TrainingError(f"the labels use codes up to {int(train.targets.max())} but model.codebook_size is "
                                f"{model.config.codebook_size}; set it to the LAQ's codebook size")
        info["labels"] = opts.labels
    else:
        if objective == "idm":
            from lapa_training.trainer import prepare_run_dir

            prepare_run_dir(Path(out), resume=resume, overwrite=overwrite, keep=("idm",))
            overwrite = False
            pseudo = idm_pseudo_actions(datasets, _open(labelled, "labelled datasets (--labelled)", opts.camera), Path(out), opts,
                                        train_cfg.seed, config.num_bins, resume=resume, progress=progress)
            info["labelled"] = [str(Path(p).resolve()) for p in labelled]
        else:
            pseudo = None
        train = action_samples(datasets, "train", config.chunk_size, actions=pseudo)
        val, val_source = _val(train, action_samples(datasets, "val", config.chunk_size, actions=pseudo))
        if len(train) == 0:
            raise TrainingError("no training frames with actions in --data (objective action needs action-labelled "
                                "episodes; see `lapa data info`)")
        bins = ActionBins.fit(train.targets.reshape(-1, 7), config.num_bins)
        model = VLAModel(config, action_bins=bins)
    augment = (bool(opts.augment) if opts.augment is not None else False) and model.vlm is None
    info["augment"] = augment
    job = VLATrainJob(model, datasets, train, val, seed=train_cfg.seed, augment=augment, val_source=val_source,
                      info=info)
    return _run(job, train_cfg, out, resume, overwrite, progress, callbacks,
                {"job": f"pretrain-{objective}", **info, "train_samples": len(train)})


def finetune(data: list[str | Path], out: str | Path, model_section: dict[str, Any], train_section: dict[str, Any],
             data_section: dict[str, Any], *, init: str | Path | None = None, keep_head: bool = False,
             resume: bool = False, overwrite: bool = False, progress: bool = True, callbacks=None) -> Path:
    """Finetune an action head on the labelled datasets `data` (their train-split episodes with
    actions, or the first data.episodes of them), from a pretrained run `init` or, without it,
    from scratch (the SCRATCH baseline). keep_head: go on training `init`'s own action head, with
    its action bins (a run pretrained on actions: ACTIONVLA), instead of a fresh one."""
    from lapa_training.checkpoint import CheckpointError

    if keep_head and init is None:
        raise TrainingError("keeping the action head needs a pretrained run to keep it from (--init)")
    train_cfg = TrainConfig.from_dict({**VLA_TRAIN_DEFAULTS, **train_section})
    opts = VLADataOptions.from_dict(data_section)
    datasets = _open(data, "labelled datasets (--data)", opts.camera)
    rate = _control_rate(datasets)
    torch.manual_seed(train_cfg.seed)
    section = dict(model_section)
    if init is not None:
        try:
            source = latest_model_dir(init)
            overrides = {k: v for k, v in section.items() if k != "preset"}
            model = VLAModel.for_finetuning(source, keep_head=keep_head, control_rate=rate, **overrides)
        except CheckpointError as e:
            raise TrainingError(str(e)) from None
        except (TypeError, ValueError) as e:
            raise TrainingError(f"cannot finetune {init}: {e}") from None
        config = model.config
    else:
        config = vla_config_from_dict(section, stage="finetune", objective="action", control_rate=rate)
        model = None
    episodes = [pick_episodes(ds, opts.episodes, train_cfg.seed) for ds in datasets]
    if not any(episodes):
        raise TrainingError("the labelled datasets have no train-split episodes with actions")
    train = action_samples(datasets, "train", config.chunk_size, episodes=episodes)
    val, val_source = _val(train, action_samples(datasets, "val", config.chunk_size))
    if len(train) == 0:
        raise TrainingError("the chosen labelled episodes have no frames with actions")
    if not keep_head:  # a kept head keeps the bins it was trained against
        fitted = ActionBins.fit(train.targets.reshape(-1, 7), config.num_bins)
        if model is None:
            model = VLAModel(config, action_bins=fitted)
        else:
            model.set_action_bins(fitted)
    bins = model.action_bins
    used = sum(len(e) for e in episodes)
    info = {"objective": "finetune", "init": str(Path(init).resolve()) if init else None, "keep_head": keep_head,
            "data": [str(Path(p).resolve()) for p in data], "labelled_episodes": used,
            "val_samples": opts.val_samples, "effective_bins": list(bins.num_bins)}
    # a VLM's processor owns its pixels (tiled, patchified): the composed backbones' augmentation is not for it
    augment = (True if opts.augment is None else bool(opts.augment)) and model.vlm is None
    info["augment"] = augment  # recorded in run.json: it changes what the model learns
    job = VLATrainJob(model, datasets, train, val, seed=train_cfg.seed, augment=augment, val_source=val_source,
                      info=info)
    if progress and is_main_process():
        print(f"finetuning on {used} labelled episode(s), {len(train)} frames; action bins per dim "
              f"{list(bins.num_bins)} (asked {config.num_bins}); init: {init or 'none (SCRATCH)'}"
              + (" (its action head kept)" if keep_head else ""))
    return _run(job, train_cfg, out, resume, overwrite, progress, callbacks,
                {"job": "finetune", **info, "train_samples": len(train)})


# ---------------------------------------------------------------------------------------------
# VPT baseline: inverse dynamics
# ---------------------------------------------------------------------------------------------
class IDMTrainJob:
    """The IDM on labelled (x_t, x_{t+1}) pairs -> the action of that step, as bin ids."""

    def __init__(self, model, datasets: list[Dataset], train: Samples, val: Samples, seed: int):
        self.model, self.datasets, self.train, self.val = model, datasets, train, val
        self.order = EpochOrder(len(train), seed)

    def model_config(self) -> dict[str, Any]:
        return self.model.config.to_dict()

    def save(self, directory: Path, model, **kwargs) -> Path:
        return model.save_pretrained(directory, **kwargs)

    def _pairs(self, samples: Samples, rows: np.ndarray):
        sub = samples.subset(rows)
        x_t = gather_frames(self.datasets, sub.which, sub.index)
        x_next = gather_frames(self.datasets, sub.which, sub.index + 1)
        return {"x_t": torch.from_numpy(x_t), "x_next": torch.from_numpy(x_next), "targets": sub.targets[:, 0]}

    def batch(self, step: int, rank: int, world: int, size: int) -> dict[str, Any]:
        return self._pairs(self.train, self.order.indices(step, rank, world, size))

    def _forward(self, model, batch):
        inner = getattr(model, "module", model)
        labels = torch.from_numpy(inner.action_bins.encode(batch["targets"])).to(inner.device)
        return model(inner.preprocess(batch["x_t"]), inner.preprocess(batch["x_next"]), labels=labels)

    def loss(self, model, batch):
        out = self._forward(model, batch)
        return out.loss, {"accuracy": float(out.accuracy)}

    def validate(self, model) -> dict[str, float]:
        acc, n = 0.0, 0
        for start in range(0, min(len(self.val), 512), 64):
            rows = np.arange(start, min(len(self.val), start + 64))
            out = self._forward(model, self._pairs(self.val, rows))
            acc += float(out.accuracy) * len(rows)
            n += len(rows)
        return {"val_token_accuracy": acc / max(n, 1)}


def idm_pseudo_actions(datasets: list[Dataset], labelled: list[Dataset], run_dir: Path, opts: VLADataOptions,
                       seed: int, num_bins: int, *, resume: bool, progress: bool) -> list[np.ndarray]:
    """Train the IDM on the labelled episodes (into <run>/idm, reused on resume), then label every
    step of `datasets`: (N, 7) pseudo-actions per dataset, NaN on each episode's last frame."""
    from lapa_training.vla.modeling_idm import IDMConfig, IDMModel

    idm_run = run_dir / "idm"
    final = idm_run / "model"
    if not (resume and (final / "checkpoint.json").is_file()):
        episodes = [pick_episodes(ds, opts.episodes, seed) for ds in labelled]
        train = action_samples(labelled, "train", 1, episodes=episodes)
        if len(train) == 0:
            raise TrainingError("objective idm needs labelled episodes with actions (--labelled)")
        val, _ = _val(train, action_samples(labelled, "val", 1))
        bins = ActionBins.fit(train.targets.reshape(-1, 7), num_bins)
        size = int(labelled[0].frames.shape[1])
        size = max(16, size - size % 8)
        model = IDMModel(IDMConfig(image_size=size, num_bins=num_bins), action_bins=bins)
        cfg = TrainConfig(steps=opts.idm_steps, batch_size=opts.idm_batch_size, lr=1e-3, warmup_steps=50,
                          val_every=max(1, opts.idm_steps // 3), save_every=max(1, opts.idm_steps // 3), seed=seed)
        if progress and is_main_process():
            print(f"VPT baseline: training the IDM on {sum(len(e) for e in episodes)} labelled episode(s) "
                  f"({len(train)} steps of data) for {opts.idm_steps} steps")
        Trainer(IDMTrainJob(model, labelled, train, val, seed), cfg, idm_run, resume=resume, overwrite=not resume,
                progress=progress, run_info={"job": "idm"}).train()
    idm = IDMModel.from_pretrained(final).eval()
    out = []
    for ds in datasets:
        pseudo = np.full((len(ds), 7), np.nan, dtype=np.float32)
        for e in ds.episodes:
            s, n = e["start"], e["length"]
            for a in range(s, s + n - 1, 256):
                b = min(s + n - 1, a + 256)
                _, acts = idm.label(np.asarray(ds.frames[a:b]), np.asarray(ds.frames[a + 1:b + 1]))
                pseudo[a:b] = acts
        out.append(pseudo)
    (idm_run / "pseudo_labels.json").write_text(json.dumps({"datasets": [str(ds.root) for ds in datasets],
                                                            "frames": [len(ds) for ds in datasets]}) + "\n")
    return out
