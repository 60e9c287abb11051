"""The task family: seeded layouts, language instructions and success checks.

Three tasks, each about coloured blocks on the table in front of the arm:

- ``reach``:      "reach the red block"                 (TCP just above the block)
- ``push``:       "push the blue block to the left"     (block moved >= 8 cm that way)
- ``pick_place``: "put the green block on the yellow pad" (block resting on the pad)

Directions are the robot's: forward = away from the base (+x), left = +y.
Each task has two instruction sets: ``train`` phrasings, and ``paraphrase`` phrasings that
are held out for evaluating generalisation to unseen wording. Each task also has one held-out
target colour (``HELD_OUT_TARGETS``): demonstrations made with ``combinations="seen"`` never ask
for it, so evaluating with ``combinations="unseen"`` tests unseen object/colour combinations
(every colour still appears in the demonstrations, as a distractor or as another task's target).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lapa_sim.scene import BLOCK_HALF, COLORS, N_BLOCKS, PAD_RADIUS

DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (0.0, 1.0),
    "right": (0.0, -1.0),
    "forward": (1.0, 0.0),
    "backward": (-1.0, 0.0),
}

# Where objects may be placed (base frame, m); all comfortably inside the arm's reach.
WORKSPACE_X = (0.38, 0.62)
WORKSPACE_Y = (-0.22, 0.22)
MIN_SEPARATION = 0.10

PUSH_DISTANCE = 0.08  # m the block must travel along the asked direction

# Where the TCP starts, as an offset from the home pose (m, base frame), drawn per episode: from one
# fixed start a policy reads the way off the arm's progress, not the scene
# (docs/lab-notes/fixed-start-shortcut.md).
START_OFFSET_LOW = (-0.05, -0.12, -0.10)
START_OFFSET_HIGH = (0.07, 0.12, 0.0)

INSTRUCTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "reach": {
        "train": ("reach the {color} block", "move the gripper to the {color} block",
                  "go to the {color} block"),
        "paraphrase": ("touch the {color} cube", "bring your hand over the {color} cube"),
    },
    "push": {
        "train": ("push the {color} block {direction}", "slide the {color} block {direction}",
                  "move the {color} block {direction}"),
        "paraphrase": ("nudge the {color} cube {direction}", "shove the {color} cube {direction}"),
    },
    "pick_place": {
        "train": ("put the {color} block on the {target} pad", "place the {color} block on the {target} pad",
                  "pick up the {color} block and put it on the {target} pad"),
        "paraphrase": ("move the {color} cube onto the {target} mat",
                       "stack the {color} cube on the {target} circle"),
    },
}

DIRECTION_WORDS = {"left": "to the left", "right": "to the right", "forward": "forward",
                   "backward": "backward"}

TASKS = tuple(INSTRUCTIONS)

HELD_OUT_TARGETS = {"reach": "purple", "push": "green", "pick_place": "blue"}
COMBINATIONS = ("all", "seen", "unseen")


class UnknownTaskError(ValueError):
    pass


@dataclass
class Episode:
    """Everything that defines one episode; enough to reproduce it exactly."""

    task: str
    seed: int
    block_colors: list[str]
    block_xy: np.ndarray  # (N_BLOCKS, 2)
    block_yaw: np.ndarray  # (N_BLOCKS,)
    target_block: int
    pad_color: str
    pad_xy: np.ndarray  # (2,)
    direction: str = ""
    instruction: str = ""
    params: dict = field(default_factory=dict)
    start_offset: np.ndarray = field(default_factory=lambda: np.zeros(3))  # TCP start - home (m)

    @property
    def color(self) -> str:
        return self.block_colors[self.target_block]


def check_task(name: str) -> str:
    if name not in INSTRUCTIONS:
        raise UnknownTaskError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
    return name


def sample_episode(task: str, seed: int, instruction_set: str = "train",
                   colors: list[str] | None = None) -> Episode:
    """A random but reproducible layout for task, from seed alone."""
    check_task(task)
    if instruction_set not in ("train", "paraphrase"):
        raise ValueError(f"instruction_set must be 'train' or 'paraphrase', not '{instruction_set}'")
    rng = np.random.default_rng(seed)
    palette = list(COLORS)
    chosen = list(colors) if colors else [palette[i] for i in rng.permutation(len(palette))]
    unknown = [c for c in chosen if c not in COLORS]
    if unknown:
        raise ValueError(f"unknown colour(s) {unknown}; known: {', '.join(COLORS)}")
    block_colors = chosen[:N_BLOCKS]
    remaining = [c for c in palette if c not in block_colors]
    pad_color = remaining[int(rng.integers(len(remaining)))]
    target = int(rng.integers(N_BLOCKS))
    direction = str(rng.choice(list(DIRECTIONS))) if task == "push" else ""

    for _ in range(1000):
        pts = np.column_stack([rng.uniform(*WORKSPACE_X, N_BLOCKS + 1), rng.uniform(*WORKSPACE_Y, N_BLOCKS + 1)])
        if _layout_ok(task, pts, target, direction):
            break
    else:  # pragma: no cover - the sampler finds a layout in a handful of tries
        raise RuntimeError(f"could not sample a layout for {task} (seed {seed})")

    ep = Episode(task=task, seed=seed, block_colors=block_colors, block_xy=pts[:N_BLOCKS],
                 block_yaw=rng.uniform(-np.pi / 4, np.pi / 4, N_BLOCKS), target_block=target,
                 pad_color=pad_color, pad_xy=pts[N_BLOCKS], direction=direction)
    # its own random stream: the layout and the instruction of a seed stay what they were
    ep.start_offset = np.random.default_rng([seed, 1]).uniform(START_OFFSET_LOW, START_OFFSET_HIGH)
    templates = INSTRUCTIONS[task][instruction_set]
    ep.instruction = templates[int(rng.integers(len(templates)))].format(
        color=ep.color, target=pad_color, direction=DIRECTION_WORDS.get(direction, ""))
    return ep


def is_held_out(ep: Episode) -> bool:
    """Whether the episode asks for its task's held-out target colour."""
    return HELD_OUT_TARGETS.get(ep.task) == ep.color


def episode_seeds(task: str, first_seed: int, count: int, combinations: str = "all") -> list[int]:
    """The first `count` seeds from first_seed on whose episode is in `combinations`: "all" (every
    seed), "seen" (not the task's held-out target colour) or "unseen" (only that colour)."""
    check_task(task)
    if combinations not in COMBINATIONS:
        raise ValueError(f"combinations must be one of {', '.join(COMBINATIONS)}, not '{combinations}'")
    if combinations == "all":
        return list(range(first_seed, first_seed + count))
    want_held_out = combinations == "unseen"
    seeds, seed = [], first_seed
    while len(seeds) < count:
        if is_held_out(sample_episode(task, seed)) == want_held_out:
            seeds.append(seed)
        seed += 1
    return seeds


def _layout_ok(task: str, pts: np.ndarray, target: int, direction: str) -> bool:
    blocks = pts[:N_BLOCKS]
    d = np.linalg.norm(blocks[:, None] - blocks[None], axis=-1) + np.eye(N_BLOCKS)
    if d.min() < MIN_SEPARATION:
        return False
    if task == "pick_place":
        if np.linalg.norm(blocks - pts[N_BLOCKS], axis=1).min() < PAD_RADIUS + 0.06:
            return False
    if task == "push":
        u = np.array(DIRECTIONS[direction])
        start = blocks[target]
        end = start + u * (PUSH_DISTANCE + 0.04)
        behind = start - u * 0.08  # where the gripper comes down
        for p in (end, behind):
            if not (WORKSPACE_X[0] - 0.1 <= p[0] <= WORKSPACE_X[1] + 0.08 and abs(p[1]) <= 0.3):
                return False
        for i, b in enumerate(blocks):
            if i == target:
                continue
            # keep other blocks out of the corridor the pushed block and the hand sweep
            rel = b - start
            along = rel @ u
            across = abs(rel @ np.array([-u[1], u[0]]))
            if -0.14 < along < PUSH_DISTANCE + 0.12 and across < 0.09:
                return False
    return True


def is_success(ep: Episode, block_pos: np.ndarray, tcp_pos: np.ndarray, gripper_opening: float) -> bool:
    """Whether the episode's goal holds now. block_pos: (N_BLOCKS, 3) centres; tcp_pos: (3,)."""
    b = block_pos[ep.target_block]
    if ep.task == "reach":
        horizontal = np.linalg.norm(tcp_pos[:2] - b[:2])
        above = tcp_pos[2] - (b[2] + BLOCK_HALF)
        return bool(horizontal < 0.03 and -0.005 < above < 0.05)
    if ep.task == "push":
        u = np.array(DIRECTIONS[ep.direction])
        moved = b[:2] - ep.block_xy[ep.target_block]
        along = moved @ u
        across = abs(moved @ np.array([-u[1], u[0]]))
        return bool(along >= PUSH_DISTANCE and across < 0.06 and b[2] < BLOCK_HALF + 0.01)
    if ep.task == "pick_place":
        on_pad = np.linalg.norm(b[:2] - ep.pad_xy) < PAD_RADIUS
        resting = b[2] < BLOCK_HALF + 0.015
        released = gripper_opening > 0.5 and tcp_pos[2] > b[2] + 0.03
        return bool(on_pad and resting and released)
    raise UnknownTaskError(ep.task)


MAX_SECONDS = {"reach": 8.0, "push": 12.0, "pick_place": 16.0}
