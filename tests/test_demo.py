"""`lapa demo --quick`: the main job's whole path at toy size (ROS-recorded labelled demos, LAQ,
labels, three pretrainings, four finetunings, closed-loop evaluation), and its stage cache. The
science numbers are not asserted here (they need the full-size run); the report's form is."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from conftest import ROOT

STAGES = ("data", "laq", "pretrain", "finetune", "eval")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    done = subprocess.run([sys.executable, "-m", "lapa_cli.main", "demo", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


def test_quick_demo_runs_every_stage_and_writes_a_well_formed_report(quick_demo):
    out, stdout = quick_demo
    results = json.loads((out / "eval/results.json").read_text())
    methods = results["methods"]
    assert {"scratch", "lapa", "actionvla"} <= set(methods)
    for name, row in methods.items():
        for instructions in ("train", "paraphrase"):
            cell = row[instructions]
            assert cell["episodes"] == 3 * results["episodes_per_cell"]
            assert 0.0 <= cell["success_rate"] <= 1.0
            assert set(cell["by_task"]) == {"reach", "push", "pick_place"}
        assert 0.0 <= row["val_token_accuracy"] <= 1.0
    for name in methods:
        assert (out / "finetune" / name / "model/config.json").is_file()
        assert (out / "finetune" / name / "training_curves.png").is_file()
    assert (out / "eval/success.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "laq_eval/report.json").is_file()
    # the labelled set went through the ROS recorder; the video set has its actions hidden
    labelled = json.loads((out / "data/labelled/meta.json").read_text())
    assert labelled["num_episodes_with_actions"] > 0
    video = [json.loads(line) for line in (out / "data/video/episodes.jsonl").read_text().splitlines()]
    assert video and not any(e["has_actions"] for e in video)
    assert (out / "data/video/labels/laq/tokens.npy").is_file()
    commands = (out / "COMMANDS.md").read_text()
    for needle in ("lapa data collect", "lapa train laq", "lapa label", "lapa train pretrain --objective latent",
                   "lapa train finetune --init", "lapa eval policy"):
        assert needle in commands, commands
    assert "seen instr." in stdout and "paraphrased" in stdout


def test_a_second_demo_reuses_every_finished_stage(quick_demo):
    out, _ = quick_demo
    before = (out / "COMMANDS.md").read_text()
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lapa_cli.main", "demo", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("done earlier with these settings") == len(STAGES)
    assert time.perf_counter() - t0 < 60
    assert (out / "COMMANDS.md").read_text() == before
    stages = json.loads((out / "stages.json").read_text())
    assert set(STAGES) <= set(stages)
