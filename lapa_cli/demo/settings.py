"""What `lapa demo` runs with: its settings (DemoSettings), the VLA recipe it reads from
config/train/, the layout seeds of every data set and evaluation (seed_ranges), and each stage's
cache key (stage_keys)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

TASKS = ("reach", "push", "pick_place")
STAGES = ("data", "laq", "pretrain", "finetune", "eval", "sweep")
# evaluation category -> (instruction set, task/target-colour combinations); training data is "seen"
CATEGORIES = {"seen": ("train", "seen"), "unseen_combination": ("train", "unseen"), "paraphrase": ("paraphrase", "seen")}
CATEGORY_TITLES = {"seen": "seen", "unseen_combination": "unseen combo", "paraphrase": "paraphrased"}
SWEEP_METHODS = ("scratch", "lapa")
ONLY_SEEN = ("lapa_other_embodiment",)  # its claim (beats SCRATCH) needs the seen category only
WORKERS = max(1, min(4, os.cpu_count() or 1))  # simulator processes for bulk generation (bags do not depend on it)
# The other embodiment's video: a floating hand whose skin tone and sleeve, and the table and floor,
# change from episode to episode, as videos of people show many people in many rooms.
OTHER_EMBODIMENT_LOOK: dict = {"scene_colors": "varied", "embodiment_colors": "varied"}


@dataclass
class DemoSettings:
    # one task: 45 minutes on 2 CPU cores fit the recipe for one task, not three (--tasks runs more)
    tasks: tuple[str, ...] = ("reach",)
    image_size: int = 64
    video_episodes: int = 950  # per task, actions hidden
    # train/val/test of the video corpora: the eval stage makes its own held-out demonstrations
    video_split: tuple[float, float, float] = (0.95, 0.05, 0.0)
    labelled_episodes: int = 60  # per task, recorded through ROS; split 0.8/0.2 into train and val
    other_embodiment_episodes: int = 2000  # per task, action-free: many hands need many videos
    laq_steps: int = 1000
    pretrain_steps: int = 8000  # LAPA learns to find the named block in a late jump of its token accuracy
    pretrain_lr: float = 1e-3
    finetune_steps: int = 800
    finetune_lr: float = 1e-3
    # the lowest held-out xyz error picks the finetuned weights (rotations are noise in these demos)
    keep_best: str = "val_xyz_error_mm"
    num_bins: int = 32  # the labelled set is small: 256 bins would leave one or two samples per bin
    eval_episodes: int = 100  # per task and category: fewer do not separate the methods' success rates
    sweep_labelled_episodes: tuple[int, ...] = (10,)  # train-split labelled episodes (the full set is the last point)
    # also evaluated through the ROS action server, in real time
    ros_methods: tuple[str, ...] = ("scratch", "lapa", "actionvla")
    ros_eval_episodes: int = 3  # per task and category, in real time (the table's cells run in-process)
    seed: int = 0

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(tasks=TASKS, video_episodes=2, video_split=(0.8, 0.1, 0.1), labelled_episodes=1,
                   other_embodiment_episodes=1, laq_steps=20, pretrain_steps=10, finetune_steps=10,
                   eval_episodes=1, sweep_labelled_episodes=(1,), ros_methods=("lapa",), ros_eval_episodes=1)


# the settings each stage reads (a stage also depends on every earlier stage's)
STAGE_SETTINGS = {
    "data": ("tasks", "image_size", "video_episodes", "video_split", "labelled_episodes",
             "other_embodiment_episodes", "seed"),
    "laq": ("laq_steps",),
    "pretrain": ("pretrain_steps", "pretrain_lr", "num_bins"),
    "finetune": ("finetune_steps", "finetune_lr", "keep_best"),
    "eval": ("eval_episodes", "ros_methods", "ros_eval_episodes"),
    "sweep": ("sweep_labelled_episodes",),
}


# ---------------------------------------------------------------------------------------------
# layout seeds
# ---------------------------------------------------------------------------------------------
DEMO_SEED_BLOCK = 100_000  # each demo seed's training layouts lie in a block of its own
EVAL_BLOCK = 900_000  # evaluation layouts: far above the training data of the seeds people run


@dataclass(frozen=True)
class SeedRange:
    """Layouts from ``first`` on: ``episodes`` per task of those in ``combinations`` (see
    lapa_sim.tasks.episode_seeds). ``training``: a model learns from them."""

    first: int
    episodes: int
    combinations: str
    training: bool

    def seeds(self, task: str) -> list[int]:
        from lapa_sim.tasks import episode_seeds

        return episode_seeds(task, self.first, self.episodes, self.combinations)


def seed_ranges(settings: DemoSettings) -> dict[str, SeedRange]:
    """Every layout range the demo's data and evaluations use: the training corpora (video,
    labelled, other_embodiment), each evaluation category's closed-loop cells (eval/<category>),
    the offline test demonstrations (the seen cells' layouts, twice as many) and the ROS check's
    layouts (ros/<category>, each category's first ones)."""
    s = settings
    base, evaluation = s.seed * DEMO_SEED_BLOCK, EVAL_BLOCK + s.seed * 1000
    ranges = {"video": SeedRange(base, s.video_episodes, "seen", True),
              "labelled": SeedRange(base + 50_000, s.labelled_episodes, "seen", True),
              "other_embodiment": SeedRange(base + 80_000, s.other_embodiment_episodes, "seen", True)}
    for category, (_, combinations) in CATEGORIES.items():
        ranges[f"eval/{category}"] = SeedRange(evaluation, s.eval_episodes, combinations, False)
    ranges["test_demonstrations"] = SeedRange(evaluation, 2 * s.eval_episodes, "seen", False)
    for category, (_, combinations) in CATEGORIES.items():
        ranges[f"ros/{category}"] = SeedRange(evaluation, s.ros_eval_episodes, combinations, False)
    return ranges


# ---------------------------------------------------------------------------------------------
# the VLA recipe: config/train/vla_tiny.yaml and actionvla_tiny.yaml
# ---------------------------------------------------------------------------------------------
VLA_RECIPE = "vla_tiny.yaml"  # LAPA, SCRATCH and the other embodiment's run
ACTIONVLA_RECIPE = "actionvla_tiny.yaml"  # ACTIONVLA: the same model with chunks, a zero head and a warm-up
# the model settings a finetuning of a pretrained run may set: the rest is the pretrained model's
HEAD_ONLY = ("action_head_type", "num_bins", "action_spread_floor")


def train_config_file(name: str) -> Path:
    """A file of config/train/: in the source tree, else in the colcon install's share directory."""
    from lapa_sim.resources import share_file

    return share_file("config", "train", name)


@dataclass(frozen=True)
class Recipe:
    """The two recipe files as the demo reads them ({section: {key: value}} each)."""

    vla_file: Path
    actionvla_file: Path
    vla: dict
    actionvla: dict

    @classmethod
    def load(cls) -> "Recipe":
        from lapa_training.run_config import load_run_config

        vla, actionvla = train_config_file(VLA_RECIPE), train_config_file(ACTIONVLA_RECIPE)
        return cls(vla, actionvla, load_run_config(vla), load_run_config(actionvla))

    def file(self, objective: str) -> Path:
        """The recipe file of a pretraining objective (vla_file for SCRATCH), relative to the working
        directory when it lies under it: the command reads as run from the repository root."""
        path = self.actionvla_file if objective == "action" else self.vla_file
        with contextlib.suppress(ValueError):
            return path.resolve().relative_to(Path.cwd().resolve())
        return path

    def warmup_steps(self, steps: int) -> int:
        """ACTIONVLA's warm-up for a pretraining of `steps`: the file's share of the default steps."""
        fraction = self.actionvla["train"].get("warmup_steps", 0) / DemoSettings.pretrain_steps
        return max(1, round(steps * fraction))

    def head_only(self, num_bins: int) -> dict:
        """The recipe's head settings, for the finetuning of a pretrained run."""
        model = {**self.vla["model"], "num_bins": num_bins}
        return {k: model[k] for k in HEAD_ONLY if k in model}

    def key(self) -> dict:
        return {"vla": self.vla, "actionvla": self.actionvla}


RECIPE_STAGE = "pretrain"  # the first stage that reads the recipe


def stage_keys(settings: DemoSettings, recipe: Recipe | None = None) -> dict[str, str]:
    """Each stage's cache key: a hash of the settings it and the stages before it read."""
    recipe = recipe or Recipe.load()
    values, depends, keys = asdict(settings), {}, {}
    for name in STAGES:
        depends.update({k: values[k] for k in STAGE_SETTINGS[name]})
        if name == "data":
            depends["other_embodiment_look"] = OTHER_EMBODIMENT_LOOK
        if name == RECIPE_STAGE:
            depends["recipe"] = recipe.key()
        keys[name] = hashlib.sha256(json.dumps({"stage": name, **depends}, sort_keys=True).encode()).hexdigest()[:16]
    return keys
