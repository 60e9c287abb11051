"""LAQ training (`lapa train laq`, lapa_training.trainer) and labelling (`lapa label`) on a real
simulator dataset, with real tiny models on the CPU."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import user_error
from lapa_cli.main import main as lapa
from lapa_training.data.dataset import Dataset
from lapa_training.laq import LAQModel, frames_to_input
from lapa_training.laq.labelling import NO_LABEL, LabelError, label_dataset, read_labels
from lapa_training.laq.train_laq import FramePairs, train_laq
from lapa_training.trainer import checkpoint_dirs, latest_model_dir, lr_factor, read_metrics, \
    TrainConfig

# The sim frames are 64x64; this model reads them at 32x32 (area-resized on the fly), 4x4 patches.
MICRO = {"preset": "tiny", "image_size": 32, "patch_size": 4, "dim": 64, "heads": 4, "spatial_depth": 1,
         "temporal_depth": 1, "decoder_depth": 2, "code_dim": 16}


def micro_train(**overrides):
    return {"batch_size": 16, "lr": 1e-3, "warmup_steps": 10, "val_every": 1000, "save_every": 1000,
            "log_every": 10, **overrides}


@pytest.fixture(scope="module")
def trained(sim_dataset, tmp_path_factory):
    """A micro LAQ trained for 250 steps on the sim dataset (~25 s)."""
    out = tmp_path_factory.mktemp("laq") / "run"
    torch.manual_seed(0)
    final = train_laq([sim_dataset], out, MICRO, micro_train(steps=250, val_every=125, save_every=125), {},
                      progress=False)
    return out, final


def test_short_training_beats_the_copy_baseline_on_sim_data(trained):
    run, final = trained
    val = [r for r in read_metrics(run / "metrics.jsonl") if "val_mse" in r]
    assert [r["step"] for r in val] == [0, 125, 250]
    last = val[-1]
    assert last["val_mse"] < 0.9 * last["val_copy_mse"], last
    assert last["val_mse"] < val[1]["val_mse"] < val[0]["val_mse"], val
    train = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert train[-1]["loss"] < 0.5 * train[0]["loss"], (train[0], train[-1])
    # the run directory a person looks at
    assert (run / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    info = json.loads((run / "run.json").read_text())
    assert info["model"]["dim"] == 64 and info["train"]["steps"] == 250
    assert latest_model_dir(run) == final and (final / "model.safetensors").is_file()
    assert [p.name for p in checkpoint_dirs(run)] == ["step-0000125"]  # the final step goes to model/


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    f = [lr_factor(s, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] == pytest.approx(0.1, abs=0.01)


def test_batches_are_a_function_of_seed_and_step_and_processes_split_them(sim_dataset):
    ds = Dataset(sim_dataset)
    a, b = FramePairs([ds], "train", seed=3), FramePairs([ds], "train", seed=3)
    assert np.array_equal(a.rows(7, 0, 1, 16), b.rows(7, 0, 1, 16))
    whole = a.rows(5, 0, 1, 16)
    halves = np.concatenate([b.rows(5, 0, 2, 8), b.rows(5, 1, 2, 8)])
    assert np.array_equal(whole, halves)
    # one epoch visits every pair once
    n = len(a)
    seen = np.concatenate([a.rows(s, 0, 1, 1) for s in range(n)])
    assert len({tuple(r) for r in seen}) == n


class Crash(Exception):
    pass


def test_resume_after_a_crash_reproduces_the_loss_curve_exactly(sim_dataset, tmp_path):
    steps = micro_train(steps=30, save_every=10, log_every=1, val_every=15)
    torch.manual_seed(0)
    train_laq([sim_dataset], tmp_path / "whole", MICRO, steps, {}, progress=False)

    def crash_at_17(step, record):
        if step == 17:
            raise Crash()

    torch.manual_seed(0)
    with pytest.raises(Crash):
        train_laq([sim_dataset], tmp_path / "cut", MICRO, steps, {}, progress=False, callbacks=[crash_at_17])
    assert [p.name for p in checkpoint_dirs(tmp_path / "cut")] == ["step-0000010"]
    # a different global seed in the resuming process must not matter
    torch.manual_seed(1234)
    train_laq([sim_dataset], tmp_path / "cut", MICRO, steps, {}, resume=True, progress=False)

    whole, cut = read_metrics(tmp_path / "whole/metrics.jsonl"), read_metrics(tmp_path / "cut/metrics.jsonl")
    strip = [{k: v for k, v in r.items() if k != "samples_per_s"} for r in whole]
    assert [{k: v for k, v in r.items() if k != "samples_per_s"} for r in cut] == strip
    a = LAQModel.from_pretrained(tmp_path / "whole/model").state_dict()
    b = LAQModel.from_pretrained(tmp_path / "cut/model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_saves_a_checkpoint_to_resume_from(sim_dataset, tmp_path):
    def interrupt(step, record):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_laq([sim_dataset], tmp_path / "run", MICRO, micro_train(steps=20), {}, progress=False,
                  callbacks=[interrupt])
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-0000006"]
    final = train_laq([sim_dataset], tmp_path / "run", MICRO, micro_train(steps=8), {}, resume=True, progress=False)
    assert json.loads((final / "checkpoint.json").read_text())["step"] == 8


# ---------------------------------------------------------------------------------------------
# labelling
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def dataset_copy(sim_dataset, tmp_path):
    shutil.copytree(sim_dataset, tmp_path / "data")
    return tmp_path / "data"


def test_labels_match_the_encoder_pair_by_pair(trained, dataset_copy, capsys):
    run, final = trained
    assert lapa(["label", "--laq", str(run), "--data", str(dataset_copy), "--batch-size", "50", "--quiet"]) == 0
    labels = read_labels(dataset_copy)
    ds = Dataset(dataset_copy)
    model = LAQModel.from_pretrained(final).eval()
    size = model.config.image_size
    expected = np.full((len(ds), 4), NO_LABEL)
    for e in ds.episodes:
        h = e["window_frames"]
        first = np.arange(e["start"], e["start"] + e["length"] - h)
        x_t = frames_to_input(np.asarray(ds.frames[first]), size=size)
        x_next = frames_to_input(np.asarray(ds.frames[first + h]), size=size)
        expected[first] = model.encode(x_t, x_next).numpy()
    assert np.array_equal(np.asarray(labels.tokens), expected)
    assert labels.meta["laq_checkpoint"] == str(final.resolve())
    assert labels.meta["pairs_labelled"] == int((expected[:, 0] != NO_LABEL).sum())
    # the trained encoder uses more than a couple of codes on this data
    assert len(np.unique(expected[expected != NO_LABEL])) >= 4


def test_two_processes_under_torchrun_give_one_process_labels(trained, dataset_copy, tmp_path):
    import socket
    import subprocess
    import sys

    run, final = trained
    assert lapa(["label", "--laq", str(run), "--data", str(dataset_copy), "--batch-size", "8", "--quiet"]) == 0
    alone = np.asarray(read_labels(dataset_copy).tokens).copy()
    with socket.socket() as sock:  # a free port for the processes' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "lapa_cli.main", "label", "--laq", str(run),
         "--data", str(dataset_copy), "--batch-size", "8", "--quiet", "--overwrite", "--name", "laq2"],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("labelled") == 1  # said once, by process 0
    labels = read_labels(dataset_copy, "laq2")
    assert labels.meta["processes"] == 2 and np.array_equal(np.asarray(labels.tokens), alone)
    assert not (dataset_copy / "labels" / ".laq2.parts").exists()


def test_a_killed_labelling_resumes_from_its_saved_chunks(trained, dataset_copy, monkeypatch):
    from lapa_training.laq import labelling

    run, final = trained
    model = LAQModel.from_pretrained(final)
    monkeypatch.setattr(labelling, "CHUNK_BATCHES", 2)  # several chunks on this small dataset
    reference = labelling.label_dataset(model, dataset_copy, name="ref", batch_size=8, progress=False)

    class Killed(Exception):
        pass

    def kill_after_two(chunk):
        if chunk == 1:
            raise Killed

    with pytest.raises(Killed):
        labelling.label_dataset(model, dataset_copy, name="laq", batch_size=8, progress=False, on_chunk=kill_after_two)
    parts = dataset_copy / "labels" / ".laq.parts"
    assert sorted(p.name for p in parts.glob("chunk-*.npy")) == ["chunk-000000.npy", "chunk-000001.npy"]
    assert not (dataset_copy / "labels" / "laq").exists()  # nothing half-made under the name
    again = []
    labelling.label_dataset(model, dataset_copy, name="laq", batch_size=8, progress=False, on_chunk=again.append)
    assert again and 0 not in again and 1 not in again  # only the chunks not yet done
    assert np.array_equal(np.asarray(read_labels(dataset_copy, "laq").tokens),
                          np.asarray(read_labels(dataset_copy, "ref").tokens))
    assert reference.name == "ref" and not parts.exists()


def test_labels_refuse_to_overwrite_and_go_stale_when_the_dataset_grows(trained, dataset_copy, sim_dataset, capsys):
    from lapa_training.data.ingest import IngestOptions, ingest

    run, final = trained
    model = LAQModel.from_pretrained(final)
    label_dataset(model, dataset_copy, progress=False)
    assert lapa(["label", "--laq", str(run), "--data", str(dataset_copy), "--quiet"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    bags = sim_dataset.parent / "bags"
    ingest([next(bags.iterdir())], dataset_copy, IngestOptions(image_size=64, mode="append", progress=False,
                                                               warn=lambda m: None))
    with pytest.raises(LabelError, match="label it again"):
        read_labels(dataset_copy)
    with pytest.raises(LabelError, match="no latent labels named 'other'.*it has: laq"):
        read_labels(dataset_copy, "other")


# ---------------------------------------------------------------------------------------------
# user mistakes: one line, exit 2
# ---------------------------------------------------------------------------------------------
def test_bad_training_settings_give_one_line_errors(sim_dataset, tmp_path, capsys):
    base = ["train", "laq", "--data", str(sim_dataset), "--out", str(tmp_path / "run"), "--quiet", "--steps", "2"]
    user_error(capsys, base + ["--set", "model.patch_size=5"], "patch_size 5 does not divide image_size 64x64")
    user_error(capsys, base + ["--set", "model.action_grid=[3,3]"], "action_grid 3x3")
    user_error(capsys, base + ["--set", "model.width=3"], "bad model setting", "dim")
    user_error(capsys, base + ["--set", "train.lr=-1"], "train.lr must be > 0")
    user_error(capsys, base + ["--set", "lr=1"], "expected section.key=value")
    user_error(capsys, base + ["--set", "optim.lr=1"], "unknown section 'optim'")
    user_error(capsys, ["train", "laq", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "r")],
           "is not a dataset")
    config = tmp_path / "bad.yaml"
    config.write_text("model: [1, 2]\n")
    user_error(capsys, base + ["--config", str(config)], "section 'model' must be a mapping")


def test_resuming_with_a_different_codebook_names_the_mismatch(sim_dataset, tmp_path, capsys):
    args = ["train", "laq", "--data", str(sim_dataset), "--out", str(tmp_path / "run"), "--quiet",
            "--set", "model.image_size=32", "--set", "model.patch_size=4", "--set", "model.dim=32",
            "--set", "train.save_every=2"]
    assert lapa(args + ["--steps", "3"]) == 0
    user_error(capsys, args + ["--steps", "3"], "already holds a training run", "--resume")
    user_error(capsys, args + ["--steps", "6", "--resume", "--set", "model.codebook_size=16"], "codebook_size")
    user_error(capsys, args + ["--steps", "6", "--resume", "--set", "model.action_grid=[4,4]"], "action_grid")
    user_error(capsys, args + ["--steps", "2", "--resume"], "nothing left to do")
    assert lapa(args + ["--steps", "5", "--resume"]) == 0


def test_labelling_with_a_bad_checkpoint_or_dataset_is_a_one_line_error(trained, tmp_path, capsys):
    run, _ = trained
    user_error(capsys, ["label", "--laq", str(tmp_path), "--data", str(tmp_path)], "neither a checkpoint nor a training run")
    user_error(capsys, ["label", "--laq", str(run), "--data", str(tmp_path / "nope")], "is not a dataset")
