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

STAGES = ("data", "laq", "pretrain", "finetune", "eval", "sweep")
CATEGORIES = ("seen", "unseen_combination", "paraphrase")


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
        for category in ("seen",) if name == "lapa_other_embodiment" else CATEGORIES:
            cell = row[category]
            assert cell["episodes"] == results["episodes_per_cell"] > 0
            assert 0.0 <= cell["success_rate"] <= 1.0
            assert 0.0 <= cell["approach"] <= 1.0
            assert set(cell["by_task"]) == {"reach", "push", "pick_place"}
        assert 0.0 <= row["val_token_accuracy"] <= 1.0
        # offline: every method against the same expert demonstrations of held-out layouts
        assert -1.0 <= row["offline"]["cosine_xy"] <= 1.0 and row["offline"]["episodes"] == 2 * results["episodes_per_cell"]
        assert -1.0 <= row["offline"]["cosine_xy_first"] <= 1.0  # the first steps, scored on their own
    for name in methods:
        assert (out / "finetune" / name / "model/config.json").is_file()
        assert (out / "finetune" / name / "training_curves.png").is_file()
    # ACTIONVLA predicts (and keeps through finetuning) chunks over a latent action's span; the others one step
    import lapa_cli.demo.settings as demo_settings
    from lapa_cli.demo import Recipe

    recipe = Recipe.load()
    chunks = {name: json.loads((out / "finetune" / name / "model/config.json").read_text())["chunk_size"]
              for name in methods}
    assert chunks.pop("actionvla") == recipe.actionvla["model"]["chunk_size"] > 1 and set(chunks.values()) == {1}
    # ACTIONVLA's pretraining alone starts its head at zero and warms its learning rate up for longer
    runs = {name: json.loads((out / "pretrain" / name / "run.json").read_text())
            for name in ("lapa", "actionvla")}
    assert runs["actionvla"]["model"]["zero_init_head"] and not runs["lapa"]["model"]["zero_init_head"]
    steps = runs["actionvla"]["train"]["steps"]
    fraction = recipe.actionvla["train"]["warmup_steps"] / demo_settings.DemoSettings.pretrain_steps
    assert runs["actionvla"]["train"]["warmup_steps"] == max(1, round(steps * fraction)) \
        != runs["lapa"]["train"]["warmup_steps"]
    assert (out / "eval/success.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "laq_eval/report.json").is_file()
    # the labelled set went through the ROS recorder; the video set has its actions hidden
    labelled = json.loads((out / "data/labelled/meta.json").read_text())
    assert labelled["num_episodes_with_actions"] > 0
    video = [json.loads(line) for line in (out / "data/video/episodes.jsonl").read_text().splitlines()]
    assert video and not any(e["has_actions"] for e in video)
    assert (out / "data/video/labels/laq/tokens.npy").is_file()
    # the other embodiment's video: the floating hand, a new skin tone, sleeve and table in every episode
    other = next(p for p in (out / "bags/other").iterdir() if p.is_dir())
    meta = json.loads((other / "episode.json").read_text())
    assert (meta["embodiment"], meta["scene_colors"], meta["embodiment_colors"]) == ("floating_gripper", "varied",
                                                                                     "varied")
    commands = (out / "COMMANDS.md").read_text()
    for needle in ("lapa data collect", "lapa train laq", "lapa label", "lapa train pretrain --objective latent",
                   "lapa train finetune --init", "lapa eval policy", "lapa eval actions",
                   "--embodiment floating_gripper --action-free --scene-colors varied --embodiment-colors varied"):
        assert needle in commands, commands
    assert "target approach in the same episodes" in stdout
    assert "unseen combo" in stdout and "paraphrased" in stdout and "labelled-episode sweep" in stdout
    ros = results["ros"]["lapa"]  # the same policy through the action server and the sim arm over DDS
    assert set(ros["categories"]) == set(CATEGORIES) and ros["act_ms_p50"] > 0
    for cell in ros["categories"].values():  # one layout per task and category, and the in-process outcome
        assert cell["episodes"] == 3 and 0 <= cell["successes"] <= 3 and 0 <= cell["in_process_successes"] <= 3
        assert {task for task, _ in cell["layouts"]} == {"reach", "push", "pick_place"}
    assert ros["categories"]["seen"]["layouts"] == ros["categories"]["paraphrase"]["layouts"]
    assert not {tuple(x) for x in ros["categories"]["seen"]["layouts"]} & {
        tuple(x) for x in ros["categories"]["unseen_combination"]["layouts"]}
    assert json.loads((out / "eval/ros/lapa/report.json").read_text())["path"] == "ros"
    assert "through the ROS action server" in stdout and "lapa eval policy --ros" in commands
    assert (out / "RESULTS.md").read_text().count("|") > 10


def test_held_out_combinations_are_in_no_training_data_and_are_what_the_unseen_category_evaluates(quick_demo):
    from lapa_sim.tasks import is_held_out, sample_episode

    out, _ = quick_demo
    for corpus in ("video", "labelled", "other"):
        episodes = [json.loads(line) for line in (out / "data" / corpus / "episodes.jsonl").read_text().splitlines()]
        assert episodes
        for e in episodes:
            seed = e["provenance"]["seed"]
            assert not is_held_out(sample_episode(e["task"], seed)), (corpus, e["name"])
    for category, held_out in (("seen", False), ("unseen_combination", True), ("paraphrase", False)):
        report = json.loads((out / "eval/lapa" / category / "report.json").read_text())
        assert report["episodes"]
        assert all(is_held_out(sample_episode(e["task"], e["seed"])) == held_out for e in report["episodes"])


def test_the_labelled_episode_sweep_ends_at_the_full_set_and_uses_fewer_before(quick_demo):
    out, _ = quick_demo
    sweep = json.loads((out / "sweep/results.json").read_text())
    counts = [p["labelled_episodes"] for p in sweep["points"]]
    assert counts == sorted(set(counts)) and len(counts) >= 2
    main = json.loads((out / "eval/results.json").read_text())
    full = dict(sweep["points"][-1]["methods"]["lapa"])
    assert full.pop("offline") == main["methods"]["lapa"]["offline"] and full == main["methods"]["lapa"]["seen"]
    for point in sweep["points"][:-1]:
        for name in ("scratch", "lapa"):
            run = out / "sweep" / f"{name}_{point['labelled_episodes']}eps"
            assert (run / "model/config.json").is_file() and point["methods"][name]["episodes"] > 0
    assert (out / "sweep/sweep.png").read_bytes()[:4] == b"\x89PNG"


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
    # each stage's timed steps are kept under that stage (a rerun of a stage replaces its own only)
    assert set(stages["step_seconds"]) == set(STAGES) and any("ingest" in what for what in stages["step_seconds"]["data"])
    assert "Within the stages: " in (out / "RESULTS.md").read_text()


def test_every_demo_setting_belongs_to_exactly_one_stage():
    from dataclasses import fields

    from lapa_cli.demo import STAGE_SETTINGS, STAGES as DEMO_STAGES, DemoSettings

    assert tuple(STAGE_SETTINGS) == DEMO_STAGES == STAGES
    owned = [name for names in STAGE_SETTINGS.values() for name in names]
    assert sorted(owned) == sorted(f.name for f in fields(DemoSettings))


def test_a_stage_key_changes_with_what_that_stage_or_an_earlier_one_reads(monkeypatch):
    import copy
    from dataclasses import replace

    import lapa_cli.demo as demo

    recipe = demo.Recipe.load()
    base = demo.stage_keys(demo.DemoSettings(), recipe)
    assert base == demo.stage_keys(demo.DemoSettings()) and len(set(base.values())) == len(STAGES)

    def redone(keys: dict) -> list[str]:
        return [name for name in STAGES if keys[name] != base[name]]

    def edited(which: str, section: str, key: str, value):
        """The recipe with one setting of one of its files changed."""
        sections = copy.deepcopy(getattr(recipe, which))
        sections[section][key] = value
        return replace(recipe, **{which: sections})

    assert redone(demo.stage_keys(replace(demo.DemoSettings(), laq_steps=999), recipe)) == list(STAGES[1:])
    assert redone(demo.stage_keys(replace(demo.DemoSettings(), finetune_lr=0.5), recipe)) == list(STAGES[3:])
    assert redone(demo.stage_keys(replace(demo.DemoSettings(), sweep_labelled_episodes=(3,)), recipe)) == ["sweep"]
    # the VLA recipe is read from pretraining on: a change keeps the data and LAQ stages
    assert redone(demo.stage_keys(demo.DemoSettings(), edited("vla", "model", "action_spread_floor", [0.0, 0.0]))) \
        == list(STAGES[2:])
    assert redone(demo.stage_keys(demo.DemoSettings(), recipe)) == []
    assert redone(demo.stage_keys(demo.DemoSettings(), edited("actionvla", "model", "chunk_size", 1))) \
        == list(STAGES[2:])
    assert redone(demo.stage_keys(demo.DemoSettings(), edited("actionvla", "train", "warmup_steps", 4000))) \
        == list(STAGES[2:])
    # how the other embodiment's video looks is part of the data stage: everything is redone
    monkeypatch.setitem(demo.OTHER_EMBODIMENT_LOOK, "embodiment_colors", "fixed")
    assert redone(demo.stage_keys(demo.DemoSettings(), recipe)) == list(STAGES)


def test_a_changed_evaluation_setting_redoes_evaluation_and_what_follows_only(quick_demo):
    # among the last in this module: it changes the fixture's run
    out, _ = quick_demo
    before = json.loads((out / "eval/results.json").read_text())
    done = subprocess.run([sys.executable, "-m", "lapa_cli.main", "demo", "--quick", "--out", str(out),
                           "--eval-episodes", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reused = [line.split("]")[0].lstrip("[") for line in done.stdout.splitlines()
              if "done earlier with these settings" in line]
    assert reused == ["data", "laq", "pretrain", "finetune"]
    after = json.loads((out / "eval/results.json").read_text())
    assert after["episodes_per_cell"] == 2 * before["episodes_per_cell"]  # 1 per task before
    # the offline test demonstrations (twice the closed-loop layouts) were made again, not reused
    assert after["methods"]["lapa"]["offline"]["episodes"] == 2 * before["methods"]["lapa"]["offline"]["episodes"]


def test_a_redone_data_stage_starts_from_empty_folders(quick_demo):
    # after the test above: fewer tasks redo every stage, over the bags of the earlier run
    out, _ = quick_demo
    done = subprocess.run([sys.executable, "-m", "lapa_cli.main", "demo", "--quick", "--out", str(out), "--tasks",
                           "reach"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "done earlier with these settings" not in done.stdout
    for corpus in ("video", "labelled", "other", "test"):
        lines = (out / "data" / corpus / "episodes.jsonl").read_text().splitlines()
        tasks = {json.loads(line)["task"] for line in lines}
        assert tasks == {"reach"}, (corpus, tasks)
    assert {p.name.split("_")[0] for p in (out / "bags/video").iterdir() if p.is_dir()} == {"reach"}
    assert set(json.loads((out / "eval/results.json").read_text())["methods"]["lapa"]["seen"]["by_task"]) == {"reach"}


def _data_stage_with(monkeypatch, tmp_path, recording):
    """The quick demo's data stage, with the ROS recording replaced; returns (the run, the background
    processes it started: (argv, process, its CPU priority as it started))."""
    import os

    import lapa_cli.background as background
    import lapa_cli.demo as demo
    import lapa_policy_node.collect

    started = []
    spawn = background._spawn

    def spy(argv, log):
        process = spawn(argv, log)
        started.append((argv, process, os.getpriority(os.PRIO_PROCESS, process.pid)))
        return process

    monkeypatch.setattr(background, "_spawn", spy)
    monkeypatch.setattr(lapa_policy_node.collect, "collect", recording)
    return demo.Demo(tmp_path / "run", demo.DemoSettings.quick()), started


def test_a_failed_recording_stops_the_jobs_alongside_it(tmp_path, monkeypatch):
    import signal

    def broken(*args, **kwargs):
        deadline = time.monotonic() + 60  # once both jobs run their first command
        while len(started) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        raise RuntimeError("the recorder died")

    run, started = _data_stage_with(monkeypatch, tmp_path, broken)
    with pytest.raises(RuntimeError, match="the recorder died"):
        run.data()
    # the other embodiment's generation and the video's ingestion, each stopped, none started after
    assert sorted(argv[4] for argv, _, _ in started) == ["generate", "ingest"]
    for _, process, priority in started:
        assert priority == 19  # the lowest: the real-time recording beside them keeps its pace
        assert process.returncode == -signal.SIGTERM  # stopped, not left running (nor waited for)


def test_a_failed_generation_of_the_other_embodiments_video_fails_the_stage_with_its_log(tmp_path, monkeypatch):
    import lapa_cli.demo as demo

    monkeypatch.setitem(demo.OTHER_EMBODIMENT_LOOK, "embodiment_colors", "plaid")
    import argparse

    from lapa_cli import UserError

    _, started = _data_stage_with(monkeypatch, tmp_path, lambda *args, **kwargs: [])
    args = argparse.Namespace(out=tmp_path / "run", quick=True, tasks=None, eval_episodes=None, seed=0)
    # what `lapa demo` prints, as one line and exit status 2, not a traceback
    with pytest.raises(UserError, match="(?s)generating and ingesting the other embodiment's video failed: "
                                        "`lapa data generate .*exited with status 2.*invalid choice: 'plaid'.*"
                                        "finished stages are kept"):
        demo.run(args)
    generation = [process for argv, process, _ in started if argv[4] == "generate"]
    assert [process.returncode for process in generation] == [2]
    # its ingestion never started
    assert not any(argv[4] == "ingest" and argv[5].endswith("other") for argv, _, _ in started)
