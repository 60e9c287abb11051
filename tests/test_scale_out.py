"""Multi-process training on the CPU: `torchrun --nproc-per-node 2 -m lapa_cli.main train ...`, the
same launch as a multi-GPU or multi-node job (gloo instead of NCCL). The trainer checks at the end
that both replicas hold identical weights, so a desync (e.g. of NSVQ's codebook) fails the run."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from conftest import ROOT
from lapa_training.laq import LAQModel
from lapa_training.trainer import read_metrics
from lapa_training.vla.modeling_vla import VLAModel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "lapa_cli.main", *argv, "--quiet"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_laq_trains_on_two_processes(sim_dataset, tmp_path):
    run = tmp_path / "laq"
    # dead-code replacement every 2 steps: the codebook changes often and must stay in sync
    done = torchrun("train", "laq", "--data", str(sim_dataset), "--out", str(run), "--steps", "16",
                    "--set", "model.image_size=32", "--set", "model.patch_size=4", "--set", "model.dim=64",
                    "--set", "model.replace_schedule=[[2,16]]", "--set", "train.val_every=8",
                    "--set", "train.save_every=8")
    assert done.returncode == 0, done.stdout + done.stderr
    info = json.loads((run / "run.json").read_text())
    assert info["processes"] == 2
    assert done.stdout.count("LAQ model written") == 1  # printed by rank 0 only
    val = [r["val_mse"] for r in read_metrics(run / "metrics.jsonl") if "val_mse" in r]
    assert len(val) == 3 and val[-1] < val[0]
    LAQModel.from_pretrained(run / "model")
    # resuming a multi-process run from its step checkpoint
    again = torchrun("train", "laq", "--data", str(sim_dataset), "--out", str(run), "--steps", "20", "--resume",
                     "--set", "model.image_size=32", "--set", "model.patch_size=4", "--set", "model.dim=64",
                     "--set", "model.replace_schedule=[[2,16]]", "--set", "train.val_every=8",
                     "--set", "train.save_every=8")
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads((run / "model/checkpoint.json").read_text())["step"] == 20


def test_vla_finetunes_on_two_processes(sim_dataset, tmp_path):
    run = tmp_path / "ft"
    done = torchrun("train", "finetune", "--data", str(sim_dataset), "--out", str(run), "--steps", "6",
                    "--batch-size", "8", "--set", "data.val_samples=16", "--set", "model.num_bins=8")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((run / "run.json").read_text())["processes"] == 2
    assert VLAModel.from_pretrained(run / "model").head == "action"
