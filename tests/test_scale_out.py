"""Multi-process training on the CPU: `torchrun --nproc-per-node 2 -m lapa_cli.main train ...`, the
same launch as a multi-GPU or multi-node job (gloo instead of NCCL). The trainer checks at the end
that both replicas hold identical weights, so a desync (e.g. of NSVQ's codebook) fails the run.
With Accelerate's FSDP2 variables the same launch shards the model over the two processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import ROOT
from lapa_training.laq import LAQModel
from lapa_training.trainer import read_metrics
from lapa_training.vla.modeling_vla import VLAModel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# what `accelerate launch --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy NO_WRAP` sets
FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
         "FSDP_AUTO_WRAP_POLICY": "NO_WRAP"}


def torchrun(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "lapa_cli.main", *argv, "--quiet"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def max_difference(a, b, prefix: str = "") -> float:
    """The largest difference between two safetensors files' tensors whose names start with prefix."""
    a, b = load_file(str(a)), load_file(str(b))
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel() and k.startswith(prefix))


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


def test_vla_finetunes_sharded_as_it_does_data_parallel_and_resumes(sim_dataset, tmp_path):
    args = ["train", "finetune", "--data", str(sim_dataset), "--steps", "6", "--batch-size", "8",
            "--set", "data.val_samples=16", "--set", "model.num_bins=8", "--set", "train.save_every=2",
            "--set", "train.val_every=3", "--set", "train.keep_best=val_loss", "--set", "train.warmup_steps=1"]
    replicated, sharded = tmp_path / "ddp", tmp_path / "fsdp"
    for run, env in ((replicated, None), (sharded, FSDP2)):
        done = torchrun(*args, "--out", str(run), env=env)
        assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((sharded / "run.json").read_text())["sharded"] is True
    assert json.loads((replicated / "run.json").read_text())["sharded"] is False
    # gathered whole: the same checkpoints, weights and Adam moments, as the replicated run writes
    step = "checkpoints/step-0000004"
    assert max_difference(sharded / step / "model.safetensors", replicated / step / "model.safetensors") < 1e-5
    assert max_difference(sharded / step / "trainer_state.safetensors",
                          replicated / step / "trainer_state.safetensors", "optimizer/") < 1e-5
    assert max_difference(sharded / "model/model.safetensors", replicated / "model/model.safetensors") < 1e-5
    assert VLAModel.from_pretrained(sharded / "model").head == "action"  # loads unsharded
    assert json.loads((sharded / step / "checkpoint.json").read_text())["model_class"] == "VLAModel"
    # killed after step 2: resumed sharded from step 2's checkpoint (moments put back into the shards)
    shutil.rmtree(sharded / "model")
    shutil.rmtree(sharded / step)
    again = torchrun(*args, "--out", str(sharded), "--resume", env=FSDP2)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming from" in again.stdout and "step-0000002" in again.stdout
    assert max_difference(sharded / step / "model.safetensors", replicated / step / "model.safetensors") < 1e-5
    assert max_difference(sharded / step / "trainer_state.safetensors",
                          replicated / step / "trainer_state.safetensors", "optimizer/") < 1e-5
    # a data-parallel run's checkpoint resumed sharded
    crossed = tmp_path / "crossed"
    shutil.copytree(replicated, crossed)
    shutil.rmtree(crossed / "model")
    shutil.rmtree(crossed / step)
    again = torchrun(*args, "--out", str(crossed), "--resume", env=FSDP2)
    assert again.returncode == 0, again.stdout + again.stderr
    assert max_difference(crossed / step / "trainer_state.safetensors",
                          replicated / step / "trainer_state.safetensors", "optimizer/") < 1e-5


def test_a_model_that_needs_whole_replicas_is_refused_under_fsdp_in_one_line(sim_dataset, tmp_path):
    done = torchrun("train", "laq", "--data", str(sim_dataset), "--out", str(tmp_path / "laq"), "--steps", "2",
                    "--set", "model.image_size=32", "--set", "model.patch_size=4", "--set", "model.dim=64",
                    env=FSDP2)
    assert done.returncode != 0  # torchrun's own summary follows; each process printed one line
    assert "lapa train: error: LAQModel trains data-parallel only" in done.stderr
    assert not [line for line in done.stderr.splitlines() if line.strip().startswith("File ") and "lapa_" in line]
    assert not (tmp_path / "laq" / "model").exists()


def test_a_vlm_with_lora_shards_layer_by_layer(sim_dataset, tmp_path):
    """The 3 B presets' setting at toy size: a pretrained-VLM backbone (tiny Idefics3) with LoRA on its
    language model, each decoder and vision layer its own FSDP unit, the vision tower frozen."""
    import tiny_vlms

    backbone = tiny_vlms.build("idefics3", tmp_path / "idefics3")
    args = ["train", "finetune", "--data", str(sim_dataset), "--steps", "3", "--batch-size", "4",
            "--set", "data.val_samples=8", "--set", "model.num_bins=8", "--set", "train.val_every=3",
            "--set", "train.save_every=2",
            "--set", "model.preset=vlm", "--set", f"model.backbone={backbone}", "--set", "model.lora_rank=4"]
    layers = {**FSDP2, "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
              "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer,Idefics3EncoderLayer"}
    for run, env in ((tmp_path / "ddp", None), (tmp_path / "fsdp", layers)):
        done = torchrun(*args, "--out", str(run), env=env)
        assert done.returncode == 0, done.stdout + done.stderr
    assert max_difference(tmp_path / "fsdp/model/model.safetensors", tmp_path / "ddp/model/model.safetensors") < 1e-5
    step = "checkpoints/step-0000002"  # the adapters' AdamW moments, gathered from their shards
    assert max_difference(tmp_path / "fsdp" / step / "trainer_state.safetensors",
                          tmp_path / "ddp" / step / "trainer_state.safetensors", "optimizer/") < 1e-5
    from transformers import AutoModelForImageTextToText

    saved = VLAModel.from_pretrained(tmp_path / "fsdp/model")
    source = AutoModelForImageTextToText.from_pretrained(backbone).state_dict()
    vision = {k.split("vision_model.", 1)[1]: v for k, v in saved.state_dict().items() if ".vision_model." in k}
    original = {k.split("vision_model.", 1)[1]: v for k, v in source.items() if "vision_model." in k}
    assert vision and vision.keys() == original.keys()
    assert all(torch.equal(vision[k], original[k]) for k in vision), "the frozen vision tower changed"
    assert any("lora_" in k for k in saved.state_dict()) and saved.config.lora_rank == 4
