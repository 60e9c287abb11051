"""The demo's settings: the layout seeds of every data set and evaluation come from one function and
never overlap where they must not; the VLA recipe files reach the trainers as the demo's commands
give them; and those commands are argv lists the `lapa` parser accepts."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from lapa_cli.demo.settings import TASKS, DemoSettings, Recipe, seed_ranges, train_config_file

DEMO_SEEDS = range(10)


def _span(layouts, tasks) -> tuple[int, int]:
    """The smallest and largest seed a range uses over the tasks."""
    seeds = [seed for task in tasks for seed in layouts.seeds(task)]
    return min(seeds), max(seeds)


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


@pytest.fixture(scope="module")
def spans() -> dict[int, dict[str, tuple[int, int]]]:
    """demo seed -> range name -> (first, last) seed, for the default demo."""
    out = {}
    for seed in DEMO_SEEDS:
        settings = replace(DemoSettings(), seed=seed)
        out[seed] = {name: _span(layouts, settings.tasks) for name, layouts in seed_ranges(settings).items()}
    return out


def test_seed_zero_keeps_the_layouts_its_published_results_were_made_with():
    ranges = seed_ranges(DemoSettings())
    firsts = {name: r.first for name, r in ranges.items()}
    assert firsts["video"] == 0 and firsts["labelled"] == 50_000 and firsts["other_embodiment"] == 80_000
    assert {firsts[name] for name in ranges if name.startswith(("eval/", "ros/", "test_"))} == {900_000}
    assert {r.combinations for r in ranges.values() if r.training} == {"seen"}  # the held-out colours stay out


def test_within_a_demo_seed_no_training_layout_is_used_again(spans):
    for seed, ranges in spans.items():
        training = [n for n, r in seed_ranges(replace(DemoSettings(), seed=seed)).items() if r.training]
        for name in training:
            for other, span in ranges.items():
                if other != name:
                    assert not _overlap(ranges[name], span), (seed, name, other)


def test_the_demo_seeds_train_on_layouts_of_their_own(spans):
    for a in DEMO_SEEDS:
        for b in DEMO_SEEDS:
            if a < b:
                for name in ("video", "labelled", "other_embodiment"):
                    for other in ("video", "labelled", "other_embodiment"):
                        assert not _overlap(spans[a][name], spans[b][other]), (a, name, b, other)


def test_the_eval_commands_default_layouts_are_in_no_range_of_demo_seeds_0_to_9(spans):
    """`lapa eval policy` without --seed evaluates on layouts no demo seed 0-9 trained on (nor
    evaluated on). `lapa eval actions` reads a dataset: its layouts are the demo's test
    demonstrations (test_demonstrations), which are in the ranges above."""
    import argparse

    from lapa_cli import evaluate
    from lapa_sim.tasks import episode_seeds
    from lapa_training.eval_policy import EVAL_SEED

    parser = argparse.ArgumentParser()
    evaluate.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "policy", "--policy", "p", "--out", "o"])
    first = EVAL_SEED if args.seed is None else args.seed
    episodes = max(args.episodes, DemoSettings().eval_episodes)  # the default, and as many as the demo's cells
    default = (first, max(episode_seeds(task, first, episodes, combinations)[-1] for task in TASKS
                          for combinations in ("all", "seen", "unseen")))
    for seed, ranges in spans.items():
        for name, span in ranges.items():
            assert not _overlap(default, span), f"lapa eval policy's default layouts overlap demo seed {seed}'s {name}"
    args = parser.parse_args(["eval", "actions", "--policy", "p", "--data", "d", "--out", "o"])
    assert not hasattr(args, "seed")  # no layouts of its own


def test_the_recipe_files_are_found_and_actionvla_adds_to_the_vla_recipe():
    recipe = Recipe.load()
    assert recipe.vla_file == train_config_file("vla_tiny.yaml") and recipe.vla_file.is_file()
    vla, actionvla = recipe.vla["model"], recipe.actionvla["model"]
    assert {k: actionvla[k] for k in vla} == vla  # the same model ...
    assert set(actionvla) - set(vla) == {"chunk_size", "zero_init_head"}  # ... with chunks and a zero head
    assert "spatial_readout" not in vla
    assert recipe.warmup_steps(DemoSettings().pretrain_steps) == recipe.actionvla["train"]["warmup_steps"]
    assert recipe.warmup_steps(DemoSettings.quick().pretrain_steps) == 1
    for path in (recipe.vla_file, recipe.actionvla_file):  # one line of reason per setting
        for line in path.read_text().splitlines():
            assert "%" not in line, line
            if line.startswith("  ") and ":" in line and not line.startswith("    "):
                assert "#" in line, f"{path.name}: no reason given for '{line.strip()}'"


# The model and training settings the demo's trainings got before the recipe became files (the
# RECIPE, ACTIONVLA_RECIPE and ACTIONVLA_WARMUP of lapa_cli/demo.py; spatial_readout 0 was the
# default and is no longer an option).
RECIPE = {"action_head_type": "regression", "text_first": True, "vision_film": True, "keypoints": 16,
          "vision_overrides": {"image_size": 64, "grid": 4}, "action_spread_floor": [0.001, 0.005]}


def _train_commands(tmp_path, monkeypatch, settings: DemoSettings) -> dict[str, list[str]]:
    """The argv of every training the pretrain and finetune stages run, without running them."""
    from lapa_cli.demo import stages

    argvs = {}
    monkeypatch.setattr(stages, "train_side_by_side",
                        lambda what, jobs: argvs.update({f"{what}/{n}": argv for n, (argv, _, _) in jobs.items()}))
    demo = stages.Demo(tmp_path, settings)
    (tmp_path / "data" / "other").mkdir(parents=True)
    demo.pretrain()
    demo.finetune()
    return argvs


@pytest.mark.parametrize("settings", [DemoSettings(), DemoSettings.quick()], ids=["default", "quick"])
def test_the_demos_training_commands_give_the_trainers_the_settings_they_got_before(tmp_path, monkeypatch, settings):
    from lapa_cli.main import parse
    from lapa_cli.train import _sections

    s = settings
    pretrain_train = {"steps": s.pretrain_steps, "lr": s.pretrain_lr, "seed": s.seed,
                      "val_every": max(1, s.pretrain_steps // 5), "save_every": max(1, s.pretrain_steps // 3)}
    finetune_train = {"steps": s.finetune_steps, "lr": s.finetune_lr, "val_every": max(1, s.finetune_steps // 8),
                      "save_every": max(1, s.finetune_steps // 2), "keep_best": s.keep_best, "seed": s.seed}
    head = {"action_head_type": "regression", "num_bins": s.num_bins, "action_spread_floor": [0.001, 0.005]}
    latent = {**RECIPE, "num_bins": s.num_bins}
    expected = {
        "pretraining/lapa": (latent, pretrain_train),
        "pretraining/actionvla": ({**latent, "chunk_size": 6, "zero_init_head": True},
                                  {**pretrain_train, "warmup_steps": max(1, round(s.pretrain_steps / 8))}),
        "pretraining/lapa_other_embodiment": (latent, pretrain_train),
        "finetuning on the labelled set/scratch": (latent, finetune_train),
        "finetuning on the labelled set/lapa": (head, finetune_train),
        "finetuning on the labelled set/actionvla": (head, finetune_train),
        "finetuning on the labelled set/lapa_other_embodiment": (head, finetune_train),
    }
    argvs = _train_commands(tmp_path, monkeypatch, settings)
    assert set(argvs) == set(expected)
    for name, argv in argvs.items():
        args = parse(argv)
        config = _sections(args)
        model = {k: v for k, v in config["model"].items() if k != "preset"}
        assert config["model"].get("preset", "tiny") == "tiny"
        assert (model, config["train"], config["data"]) == (*expected[name], {}), name
        assert args.overwrite and args.quiet
        if name.startswith("finetuning"):
            assert args.keep_head == name.endswith("/actionvla") and (args.init is None) == name.endswith("/scratch")


def test_every_recorded_command_is_what_the_demo_runs(tmp_path, monkeypatch):
    """The stage's COMMANDS.md lines are its argv lists: `lapa ` + shlex.join(argv)."""
    import shlex

    from lapa_cli.demo import stages

    ran = []
    monkeypatch.setattr(stages, "train_side_by_side", lambda what, jobs: ran.extend(a for a, _, _ in jobs.values()))
    demo = stages.Demo(tmp_path, DemoSettings.quick())
    demo.pretrain()
    demo.finetune()
    assert len(ran) == 5 and [shlex.split(line)[1:] for line in demo.commands] == ran
    assert all(line.startswith("lapa train ") for line in demo.commands)


def test_setting_values_survive_the_yaml_parser():
    from lapa_cli.demo.stages import setting
    from lapa_training.run_config import load_run_config

    values = {"a": "regression", "b": [0.001, 0.005], "c": 32, "d": True, "e": 1e-3, "f": {"grid": 4}}
    overrides = [setting("model", k, v)[1] for k, v in values.items()]
    assert load_run_config(None, overrides)["model"] == values
    assert json.dumps(values)  # (plain data)


def test_numbers_written_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 reads 3e-4 as a string; README's own `--set train.lr=3e-4` means the number."""
    from lapa_training.run_config import load_run_config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  lr: 1e-3\n  warmup_steps: 10\nmodel:\n  action_spread_floor: [1e-3, 5e-3]\n"
                      "  prompt_template: 'go 1e5 times: {instruction}'\n")
    config = load_run_config(recipe, ["train.min_lr_ratio=5E-2", "model.name=1e-3x"])
    assert config["train"] == {"lr": 1e-3, "warmup_steps": 10, "min_lr_ratio": 5e-2}
    assert config["model"]["action_spread_floor"] == [1e-3, 5e-3]
    assert config["model"]["prompt_template"] == "go 1e5 times: {instruction}" and config["model"]["name"] == "1e-3x"
