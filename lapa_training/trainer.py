"""The training loop every lapa-ros model shares: LAQ, the VLA (pretrain and finetune) and the IDM.

What a model brings is a `TrainJob` (its model, how to draw a batch for a step, its loss, its
validation); what the loop brings is everything else, once:

- AdamW, linear warmup then cosine decay to ``min_lr_ratio * lr``, gradient clipping;
- HF Accelerate for devices and scale-out: the same code runs on a CPU, one GPU, or many GPUs and
  nodes (``accelerate launch -m lapa_cli.main train ...`` or ``torchrun``); bf16/fp16 autocast on
  GPUs (``precision: auto`` picks bf16 where the GPU has it);
- tqdm progress, ``metrics.jsonl`` and ``training_curves.png`` in the run directory, periodic
  validation;
- checkpoints (safetensors + JSON, lapa_training.checkpoint) every ``save_every`` steps under
  ``<run>/checkpoints/step-NNNNNNN``, the newest ``keep_checkpoints`` kept, and the final weights in
  ``<run>/model``; Ctrl-C saves before it exits. With ``keep_best`` (e.g. "val_loss") the weights at
  the lowest validation value are kept in ``<run>/best`` and ``<run>/model`` is a copy of them
  (early stopping for small labelled sets, which overfit).

Exact resume. A batch is a function of (seed, step, process rank) only, and the torch RNG is
re-seeded from (seed, step, rank) before every step, so the run after ``resume`` sees the same
batches and the same random numbers (NSVQ noise, dropout, augmentation) as the uninterrupted run
did: its loss curve is identical on the same hardware and process count (tests/test_trainer.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn

from lapa_training import sharding
from lapa_training.checkpoint import META_FILE, CheckpointError, check_config_compatible, load_checkpoint, \
    load_model_state, load_trainer_state, read_meta, save_checkpoint
from lapa_training.dataclass_dict import dataclass_kwargs

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "model"
BEST_DIR = "best"  # train.keep_best: the weights at the best validation so far
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"
RUN_FILE = "run.json"


class TrainingError(Exception):
    """Training cannot start or go on (bad settings, a diverged loss, a run directory in the way)."""


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 32  # global: all processes together
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    # micro-batches per optimizer step: each process runs batch_size / (processes x grad_accum_steps)
    # samples at a time and steps once per batch_size (a large batch in a small GPU's memory)
    grad_accum_steps: int = 1
    # recompute activations in the backward pass instead of keeping them (transformers backbones): less
    # memory for a pretrained VLM, about a third more compute
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast on GPUs; auto = bf16 where supported)
    val_every: int = 200
    save_every: int = 500
    keep_checkpoints: int = 2
    # a validation metric, e.g. "val_loss": the weights at its lowest value are kept in best/ and
    # become model/ at the end (early stopping, for small labelled sets that overfit); "": model/ is
    # the last step's weights
    keep_best: str = ""
    log_every: int = 10
    seed: int = 0

    def validate(self) -> "TrainConfig":
        problems = []
        for name in ("steps", "batch_size", "val_every", "save_every", "log_every", "keep_checkpoints",
                     "grad_accum_steps"):
            if int(getattr(self, name)) < 1:
                problems.append(f"train.{name} must be >= 1 (got {getattr(self, name)})")
        if not self.lr > 0:
            problems.append(f"train.lr must be > 0 (got {self.lr})")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"train.min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio})")
        if self.warmup_steps < 0:
            problems.append(f"train.warmup_steps must be >= 0 (got {self.warmup_steps})")
        if self.grad_clip < 0:
            problems.append(f"train.grad_clip must be >= 0, 0 = off (got {self.grad_clip})")
        if not isinstance(self.keep_best, str) or (self.keep_best and not self.keep_best.startswith("val_")):
            problems.append(f"train.keep_best must be a validation metric such as val_loss, or empty (got "
                            f"{self.keep_best!r})")
        if not isinstance(self.gradient_checkpointing, bool):
            problems.append(f"train.gradient_checkpointing must be true or false (got {self.gradient_checkpointing!r})")
        if self.precision not in PRECISIONS:
            problems.append(f"train.precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        if problems:
            raise TrainingError("; ".join(problems))
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return cls(**dataclass_kwargs(cls, d, "train settings", error=TrainingError)).validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainJob(Protocol):
    """What one kind of training brings to the loop."""

    model: nn.Module

    def model_config(self) -> dict[str, Any]:
        """The model's config, saved as config.json of every checkpoint."""

    def batch(self, step: int, rank: int, world: int, size: int) -> dict[str, torch.Tensor]:
        """This process's `size` samples of global step `step` (CPU tensors). Must depend only on
        (the job's seed, step, rank, world), never on earlier calls: that is what makes resume exact."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss to minimise, and metrics to log (floats)."""

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics (model in eval mode, no grad); keys should start with 'val_'."""


def is_main_process() -> bool:
    """True in a single process and in rank 0 of accelerate launch / torchrun (before or after the
    Accelerator exists): where to print and write shared files."""
    return int(os.environ.get("RANK", "0")) == 0


def prepare_run_dir(run: Path, *, resume: bool, overwrite: bool, keep: tuple[str, ...] = ()) -> None:
    """Check that `run` may hold this run and make it: refuse to mix runs (an earlier run needs
    --resume or --overwrite; a non-empty folder that is not a run is refused). Entries named in
    `keep` are earlier phases of this same run (the VPT baseline's IDM): never deleted or counted."""
    run = Path(run)
    if run.exists() and not run.is_dir():
        raise TrainingError(f"{run} exists and is not a directory")
    has_run = (run / RUN_FILE).is_file() or (run / CHECKPOINTS_DIR).is_dir()
    others = [p for p in run.iterdir() if p.name not in keep] if run.is_dir() else []
    if has_run and not resume and not overwrite:
        raise TrainingError(f"{run} already holds a training run; pass --resume to continue it or "
                            f"--overwrite to start again")
    if others and not has_run and not overwrite:
        raise TrainingError(f"{run} is not empty and is not a training run; choose another --out")
    if overwrite and not resume:
        for p in others:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    run.mkdir(parents=True, exist_ok=True)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based): linear warmup, then cosine."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A seed for (run seed, step, rank), well mixed (numpy SeedSequence)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] % (2**63))


class EpochOrder:
    """Which of n samples each process takes at each step: global step s takes positions
    s*B .. s*B + B - 1 of an endless sequence made of one seeded random permutation of 0..n-1 per
    epoch; process r of w takes its B / w consecutive positions. A pure function of (seed, step,
    rank, world), which is what exact resume relies on."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = int(n), int(seed)
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 4:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._orders[epoch]

    def indices(self, step: int, rank: int, world: int, size: int) -> np.ndarray:
        if self.n == 0:
            raise TrainingError("no training samples")
        start = (step * world + rank) * size
        return np.array([self._order(p // self.n)[p % self.n] for p in range(start, start + size)], dtype=np.int64)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters, with weight decay on matrices only (not on biases, norms, embeddings
    of size 1 in a dimension)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete step checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.glob("step-*"):
        if p.is_dir() and (p / "checkpoint.json").is_file() and p.name[5:].isdigit():
            found.append((int(p.name[5:]), p))
    return [p for _, p in sorted(found)]


def latest_model_dir(path: str | Path) -> Path:
    """The weights a finished or running training run stands for: `path` itself when it is a
    checkpoint, else its final model, else its newest step checkpoint."""
    path = Path(path)
    if (path / "checkpoint.json").is_file():
        return path
    if (path / FINAL_DIR / "checkpoint.json").is_file():
        return path / FINAL_DIR
    steps = checkpoint_dirs(path)
    if steps:
        return steps[-1]
    raise CheckpointError(f"{path} is neither a checkpoint nor a training run with one "
                          f"(no checkpoint.json, {FINAL_DIR}/ or {CHECKPOINTS_DIR}/step-*)")


class Trainer:
    """Runs a TrainJob for cfg.steps steps into run_dir. See the module doc."""

    def __init__(self, job: TrainJob, cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False,
                 overwrite: bool = False, progress: bool = True, run_info: dict[str, Any] | None = None,
                 callbacks: list[Callable[[int, dict[str, float]], None]] | None = None, keep: tuple[str, ...] = ()):
        self.job, self.cfg = job, cfg.validate()
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.callbacks = list(callbacks or [])
        self.keep = tuple(keep)
        try:
            self.accelerator = sharding.accelerator_for(self._mixed_precision(cfg.precision))
            self.sharded = sharding.is_sharded(self.accelerator)
        except sharding.ShardingError as e:
            raise TrainingError(str(e)) from None
        acc = self.accelerator
        if self.sharded and not getattr(job, "shardable", False):
            raise TrainingError(f"{type(job.model).__name__} trains data-parallel only (launch without FSDP)")
        if cfg.batch_size % (acc.num_processes * cfg.grad_accum_steps):
            raise TrainingError(f"train.batch_size {cfg.batch_size} must be divisible by the number of processes "
                                f"({acc.num_processes}) times train.grad_accum_steps ({cfg.grad_accum_steps})")
        self.per_process = cfg.batch_size // acc.num_processes
        self.step = 0
        self.best: tuple[float, int] | None = None  # train.keep_best: (value, step) of best/
        self._prepare_run_dir(resume, overwrite, run_info or {})

        model = job.model
        if cfg.gradient_checkpointing:
            enable = getattr(model, "enable_gradient_checkpointing", None)
            if enable is None:
                raise TrainingError(f"train.gradient_checkpointing: {type(model).__name__} does not support it")
            try:
                enable()
            except ValueError as e:
                raise TrainingError(str(e)) from None
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        if resume and checkpoint_dirs(self.run_dir):
            self._resume(checkpoint_dirs(self.run_dir)[-1])
        resumed = None
        if self.sharded and self.optimizer.state:  # loaded into whole parameters: it goes in again once sharded
            resumed = self.optimizer.state_dict(), sharding.optimizer_parameter_names(model, self.optimizer)
            self.optimizer.state.clear()
        self.model, self.wrapped_optimizer = acc.prepare(model, self.optimizer)
        if resumed is not None:
            try:
                sharding.load_optimizer_state(self.model, self.optimizer, *resumed)
            except sharding.ShardingError as e:
                raise TrainingError(str(e)) from None

    # ---- setup ---------------------------------------------------------------------------
    @staticmethod
    def _mixed_precision(precision: str) -> str:
        if not torch.cuda.is_available() or precision == "fp32":
            return "no"
        if precision == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return precision

    def _prepare_run_dir(self, resume: bool, overwrite: bool, run_info: dict[str, Any]) -> None:
        acc, run = self.accelerator, self.run_dir
        if acc.is_main_process:
            prepare_run_dir(run, resume=resume, overwrite=overwrite, keep=self.keep)
            info = {"train": self.cfg.to_dict(), "model": self.job.model_config(), "processes": acc.num_processes,
                    "sharded": self.sharded, "mixed_precision": acc.mixed_precision, **run_info}
            (run / RUN_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
        acc.wait_for_everyone()

    def _resume(self, directory: Path) -> None:
        state, saved_config, _ = load_checkpoint(directory)
        check_config_compatible(saved_config, self.job.model_config(), source=directory,
                                ignore=getattr(self.job, "training_only_keys", ()))
        load_model_state(self.job.model, state, source=directory)
        self.step = load_trainer_state(directory, self.optimizer, self.scheduler, restore_rng=False)
        self.best = self._read_best()
        if self.step >= self.cfg.steps:
            raise TrainingError(f"{directory} is at step {self.step}; train.steps is {self.cfg.steps}: "
                                f"nothing left to do (raise --steps to train longer)")
        if self.accelerator.is_main_process:
            self._truncate_metrics(self.step)
            print(f"resuming from {directory} at step {self.step}")

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics logged after `step` by the run that crashed, so the log is one clean curve."""
        path = self.run_dir / METRICS_FILE
        if path.is_file():
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            path.write_text("".join(line + "\n" for line in keep))

    # ---- the loop ------------------------------------------------------------------------
    def train(self) -> Path:
        """Train to cfg.steps; returns the final model directory."""
        from tqdm import tqdm

        acc, cfg, job = self.accelerator, self.cfg, self.job
        bar = tqdm(total=cfg.steps, initial=self.step, desc="training", unit="step", dynamic_ncols=True,
                   mininterval=0.2 if sys.stderr.isatty() else 30.0,  # a log file gets a line per 30 s
                   disable=not (self.progress and acc.is_main_process))
        window: list[dict[str, float]] = []
        t_window = time.perf_counter()
        if self.step == 0:
            self._validate(bar)  # where the curves start: the untrained (or just-loaded) model
        self.model.train()
        try:
            while self.step < cfg.steps:
                torch.manual_seed(step_seed(cfg.seed, self.step, acc.process_index))
                batch = job.batch(self.step, acc.process_index, acc.num_processes, self.per_process)
                loss, metrics = self._accumulate(batch)
                grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip) if cfg.grad_clip else None
                self.wrapped_optimizer.step()
                self.wrapped_optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.step += 1
                record = {"loss": float(loss.detach()), "lr": self.scheduler.get_last_lr()[0], **metrics}
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                window.append(record)
                bar.update(1)
                for callback in self.callbacks:  # tests and benchmarks: after the update, before val/save
                    callback(self.step, record)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    elapsed = time.perf_counter() - t_window
                    line = {"step": self.step, **_mean(window),
                            "samples_per_s": len(window) * cfg.batch_size / max(elapsed, 1e-9)}
                    self._log(line)
                    bar.set_postfix(loss=f"{line['loss']:.4g}", lr=f"{line['lr']:.2g}", refresh=False)
                    window, t_window = [], time.perf_counter()
                if self.step % cfg.val_every == 0 or self.step == cfg.steps:
                    self._validate(bar)
                    t_window = time.perf_counter()
                if self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save_step_checkpoint()
                    t_window = time.perf_counter()
        except KeyboardInterrupt:
            bar.close()
            if self.sharded:  # the processes stop at different collectives: a gather now would hang
                if acc.is_main_process:
                    print(f"\ninterrupted at step {self.step}; a sharded run keeps its last step checkpoint "
                          f"(train.save_every); continue with --resume")
            elif self.step > 0:
                where = self.save_step_checkpoint()
                if acc.is_main_process:
                    print(f"\ninterrupted at step {self.step}; saved {where}; continue with --resume")
            raise
        bar.close()
        return self.save_final()

    def _accumulate(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward and backward over the batch in train.grad_accum_steps micro-batches (gradients
        synchronised across processes on the last only); -> the mean loss and metrics."""
        acc, n = self.accelerator, self.cfg.grad_accum_steps
        losses, metrics = [], []
        for i, part in enumerate(micro_batches(batch, n)):
            part = {k: v.to(acc.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in part.items()}
            with acc.no_sync(self.model) if i < n - 1 else contextlib.nullcontext():
                with acc.autocast():
                    loss, found = self.job.loss(self.model, part)
                if not torch.isfinite(loss.detach()):
                    raise TrainingError(f"loss is {loss.item()} at step {self.step}; stopping (the last good "
                                        f"checkpoint is kept). Lower train.lr or check the data.")
                acc.backward(loss / n if n > 1 else loss)
            losses.append(loss.detach())
            metrics.append(found)
        return (losses[0] if n == 1 else torch.stack(losses).mean()), _mean(metrics)

    def _log(self, line: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with open(self.run_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(line) + "\n")

    def _validate(self, bar) -> None:
        acc = self.accelerator
        if acc.is_main_process or self.sharded:  # a sharded forward pass needs every process
            model = acc.unwrap_model(self.model)
            model.eval()
            with torch.no_grad(), acc.autocast():
                metrics = self.job.validate(model)
            model.train()
            if self.sharded:  # every process decides about best/ on the main process's numbers
                shared = [metrics]
                torch.distributed.broadcast_object_list(shared, src=0)
                metrics = shared[0]
            if acc.is_main_process:
                self._log({"step": self.step, **metrics})
                shown = {k: f"{v:.4g}" for k, v in list(metrics.items())[:2]}
                bar.write(f"step {self.step}: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
                plot_curves(self.run_dir / METRICS_FILE, self.run_dir / CURVES_FILE)
            if self.cfg.keep_best:
                self._keep_if_best(metrics)
        acc.wait_for_everyone()

    def _keep_if_best(self, metrics: dict[str, float]) -> None:
        """Write best/ when this validation's keep_best metric is the lowest so far (the main
        process; every process when sharded, as the weights are gathered from all)."""
        name = self.cfg.keep_best
        if name not in metrics:
            raise TrainingError(f"train.keep_best is {name!r}, but validation reports only "
                                f"{', '.join(metrics) or 'nothing'}")
        value = float(metrics[name])
        if self.best is None or value < self.best[0]:
            self._write(self.run_dir / BEST_DIR, with_trainer_state=False,
                        best={"metric": name, "value": value, "step": self.step}, state=self._gather(False))
            self.best = (value, self.step)

    def _read_best(self) -> tuple[float, int] | None:
        """(value, step) of the run's best/ (a resumed run goes on comparing against it)."""
        if not self.cfg.keep_best or not (self.run_dir / BEST_DIR / META_FILE).is_file():
            return None
        best = read_meta(self.run_dir / BEST_DIR).get("extra", {}).get("best", {})
        if best.get("metric") != self.cfg.keep_best:
            return None  # kept for another metric: the first validation replaces it
        return float(best["value"]), int(best["step"])

    # ---- saving --------------------------------------------------------------------------
    def save_step_checkpoint(self) -> Path:
        directory = self.run_dir / CHECKPOINTS_DIR / f"step-{self.step:07d}"
        self._save(directory, with_trainer_state=True)
        if self.accelerator.is_main_process:
            for old in checkpoint_dirs(self.run_dir)[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        return directory

    def check_replicas_agree(self) -> None:
        """Under several processes, every replica must hold the same weights (DDP averages the
        gradients; NSVQ syncs its codebook replacements). A fingerprint of all parameters and
        buffers is compared across processes; a mismatch is an error, not a silent bad model."""
        acc = self.accelerator
        if acc.num_processes == 1 or self.sharded:  # sharded: no replicas to compare
            return
        model = acc.unwrap_model(self.model)
        with torch.no_grad():
            fingerprint = torch.stack([t.detach().double().sum() for t in model.state_dict().values()])
        gathered = acc.gather(fingerprint.to(acc.device)[None]).cpu()
        if not torch.equal(gathered.min(0).values, gathered.max(0).values):
            raise TrainingError("the training processes hold different weights at the end of training "
                                "(replicas diverged); the model is not saved")

    def save_final(self) -> Path:
        """model/: the last step's weights, or with train.keep_best those of best/ (the same files)."""
        self.check_replicas_agree()
        directory = self.run_dir / FINAL_DIR
        acc = self.accelerator
        if self.cfg.keep_best and (self.run_dir / BEST_DIR / META_FILE).is_file():
            acc.wait_for_everyone()
            if acc.is_main_process:
                staging = self.run_dir / (FINAL_DIR + ".tmp")
                shutil.rmtree(staging, ignore_errors=True)
                shutil.copytree(self.run_dir / BEST_DIR, staging)
                shutil.rmtree(directory, ignore_errors=True)
                staging.rename(directory)
                value, step = self.best if self.best is not None else (float("nan"), -1)
                if self.progress:
                    print(f"{FINAL_DIR}/ holds step {step} of {self.step}: the lowest {self.cfg.keep_best} "
                          f"({value:.4g}, train.keep_best)")
            acc.wait_for_everyone()
        else:
            self._save(directory, with_trainer_state=False)
        if acc.is_main_process:
            plot_curves(self.run_dir / METRICS_FILE, self.run_dir / CURVES_FILE)
        return directory

    def _save(self, directory: Path, with_trainer_state: bool) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        state = self._gather(with_trainer_state)
        if acc.is_main_process:
            self._write(directory, with_trainer_state, state=state)
        acc.wait_for_everyone()

    def _gather(self, with_optimizer: bool) -> dict[str, Any]:
        """Every process, when sharded: the whole weights (and optimizer state) for the main
        process to write; {} otherwise (the main process writes its own replica)."""
        if not self.sharded:
            return {}
        state = {"state_dict": sharding.full_model_state(self.accelerator, self.model)}
        if with_optimizer:
            state["optimizer_state"] = sharding.full_optimizer_state(self.model, self.optimizer)
        return state

    def _write(self, directory: Path, with_trainer_state: bool, best: dict[str, Any] | None = None,
               state: dict[str, Any] | None = None) -> None:
        """Main process: write a checkpoint of the current weights (no synchronisation); `state`:
        _gather's whole tensors of a sharded run."""
        if not self.accelerator.is_main_process:
            return
        model = self.accelerator.unwrap_model(self.model)
        kwargs = dict(optimizer=self.optimizer, scheduler=self.scheduler) if with_trainer_state else {}
        kwargs.update(state or {})
        extra = {"train": self.cfg.to_dict(), **getattr(self.job, "checkpoint_extra", lambda: {})()}
        if best is not None:
            extra["best"] = best
        # Ctrl-C during the write must not leave half a checkpoint: hold SIGINT until it is done.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
        try:
            saver = getattr(self.job, "save", None)
            if saver is not None:
                saver(directory, model, step=self.step, extra=extra, **kwargs)
            else:
                save_checkpoint(directory, model, self.job.model_config(), step=self.step, extra=extra, **kwargs)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def micro_batches(batch: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """A batch (tensors, arrays and lists of equal length; anything else shared) in n equal parts."""
    if n == 1:
        return [batch]
    sizes = {len(v) for v in batch.values() if isinstance(v, (torch.Tensor, np.ndarray, list, tuple))}
    if len(sizes) != 1 or next(iter(sizes)) % n:
        raise TrainingError(f"cannot cut a batch of sizes {sorted(sizes)} into {n} equal micro-batches")
    size = next(iter(sizes)) // n
    return [{k: v[i * size:(i + 1) * size] if isinstance(v, (torch.Tensor, np.ndarray, list, tuple)) else v
             for k, v in batch.items()} for i in range(n)]


def _mean(records: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for r in records for k in r}
    return {k: float(np.mean([r[k] for r in records if k in r])) for k in sorted(keys)}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: str | Path, out_png: str | Path) -> None:
    """Training loss, validation metrics and learning rate against step, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = read_metrics(metrics_path)
    train = [r for r in lines if "loss" in r]
    val = [r for r in lines if any(k.startswith("val_") for k in r)]
    val_keys = sorted({k for r in val for k in r if k.startswith("val_")})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if train:
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
        axes[0].set_yscale("log")
        axes[2].plot([r["step"] for r in train], [r["lr"] for r in train])
    loss_like = [k for k in val_keys if "loss" in k or "mse" in k]
    for k in loss_like:
        pts = [(r["step"], r[k]) for r in val if k in r]
        axes[0].plot(*zip(*pts), "o-", label=k)
    for k in val_keys:
        if k in loss_like:
            continue
        pts = [(r["step"], r[k]) for r in val if k in r]
        axes[1].plot(*zip(*pts), "o-", label=k)
    axes[0].set_title("loss")
    axes[1].set_title("validation")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = Path(out_png).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(out_png)

