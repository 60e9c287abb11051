"""Offline action evaluation (`lapa eval actions`, lapa_training.eval_actions) on real generated
demonstrations: a policy that knows the demonstrator's actions scores 1, its mirror image -1, a
policy that ignores its input scores what its constant direction happens to explain."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lapa_cli.main import main as lapa
from lapa_core.policy import ConstantPolicy, PolicyStep
from lapa_training.data.dataset import Dataset
from lapa_training.data.ingest import IngestOptions, ingest
from lapa_training.eval_actions import ActionEvalError, evaluate_actions, format_action_report, write_action_report


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    from lapa_sim.env import TabletopEnv
    from lapa_training.data.generate import generate_episode

    root = tmp_path_factory.mktemp("demos")
    env = TabletopEnv(image_size=(32, 32))
    try:
        for task, seed in (("reach", 3), ("push", 4), ("reach", 5)):
            generate_episode(env, root / "bags", task, seed)
        generate_episode(env, root / "free", "reach", 6, record_actions=False)
    finally:
        env.close()
    ingest([root / "bags"], root / "ds", IngestOptions(image_size=32, progress=False))
    ingest([root / "free"], root / "free_ds", IngestOptions(image_size=32, progress=False))
    return root


class LookupPolicy:
    """Answers each frame with the action recorded for it (found by the frame's bytes), times sign."""

    control_rate = 10.0

    def __init__(self, ds: Dataset, sign: float = 1.0):
        self.table = {np.asarray(ds.frames[i]).tobytes(): np.asarray(ds.actions[i], dtype=float)
                      for i in range(len(ds)) if np.isfinite(ds.actions[i]).all()}
        self.sign = sign
        self.instructions = []

    def reset(self, instruction):
        self.instructions.append(instruction)

    def act(self, image, instruction):
        a = self.table[np.asarray(image).tobytes()].copy()
        a[:6] *= self.sign
        return PolicyStep(delta=a)


def test_a_policy_that_moves_as_the_demonstrator_did_scores_one_and_its_mirror_minus_one(demos):
    ds = Dataset(demos / "ds")
    oracle = LookupPolicy(ds)
    report = evaluate_actions(oracle, ds, progress=False)
    assert report["frames"] == sum(e["length"] - 1 for e in ds.episodes)  # every labelled frame, once
    assert set(oracle.instructions) == {e["instruction"] for e in ds.episodes}
    assert report["cosine_xy"] == pytest.approx(1.0) and report["cosine_xyz"] == pytest.approx(1.0)
    assert all(v == 1.0 for v in report["sign_agreement"].values()) and report["gripper_agreement"] == 1.0
    assert set(report["by_task"]) == {"reach", "push"} and report["by_task"]["reach"]["episodes"] == 2
    assert report["moving_frames_xy"] < report["frames"]  # still frames are left out of the cosine

    mirror = evaluate_actions(LookupPolicy(ds, sign=-1.0), ds, progress=False)
    assert mirror["cosine_xy"] == pytest.approx(-1.0) and mirror["sign_agreement"]["dz"] == 0.0


def test_first_steps_are_scored_on_their_own(demos):
    """A policy that is right once the arm is on its way but wrong at the start (as one that reads
    the way off the arm's position would be) looks good overall and is caught by cosine_xy_first."""
    from lapa_training.eval_actions import FIRST_STEPS

    ds = Dataset(demos / "ds")
    lookup = LookupPolicy(ds)
    step_of = {np.asarray(ds.frames[i]).tobytes(): i - e["start"] for e in ds.episodes
               for i in range(e["start"], e["start"] + e["length"])}

    class LateStarter(LookupPolicy):
        def act(self, image, instruction):
            step = lookup.act(image, instruction)
            if step_of[np.asarray(image).tobytes()] < FIRST_STEPS:
                step.delta[:6] *= -1.0
            return step

    report = evaluate_actions(LateStarter(ds), ds, progress=False)
    assert report["cosine_xy_first"] == pytest.approx(-1.0)
    assert report["cosine_xy"] > 0.5 and report["moving_frames_xy_first"] >= 3
    assert report["by_task"]["reach"]["cosine_xy_first"] == pytest.approx(-1.0)
    assert "first steps" in format_action_report(report)
    assert evaluate_actions(lookup, ds, progress=False)["cosine_xy_first"] == pytest.approx(1.0)


def test_a_constant_policy_scores_what_its_one_direction_explains(demos):
    ds = Dataset(demos / "ds")
    down = evaluate_actions(ConstantPolicy([0, 0, -0.01, 0, 0, 0, 0]), ds, progress=False)
    assert down["cosine_xy"] == 0.0  # no horizontal motion at all: no agreement either way
    assert down["sign_agreement"]["dz"] == pytest.approx(np.mean(ds.actions[:, 2][np.abs(ds.actions[:, 2]) >= 0.003] < 0))
    assert 0.0 < down["cosine_xyz"] < 1.0
    assert down["correlation"]["dx"] == 0.0  # a constant prediction has no correlation, not NaN


def test_report_files_and_the_cli(demos, tmp_path, capsys):
    ds = Dataset(demos / "ds")
    report = evaluate_actions(ConstantPolicy([0.01, 0, 0, 0, 0, 0, 1]), ds, progress=False)
    assert "reach" in format_action_report(report)
    written = write_action_report(report, tmp_path / "r")
    assert json.loads(written.read_text())["frames"] == report["frames"]
    assert (tmp_path / "r" / "agreement.png").read_bytes()[:4] == b"\x89PNG"

    policy = ConstantPolicy.save(tmp_path / "const", [0.01, 0, 0, 0, 0, 0, 0])
    assert lapa(["eval", "actions", "--policy", str(policy), "--data", str(demos / "ds"), "--out",
                 str(tmp_path / "cli")]) == 0
    assert "offline action agreement" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "report.json").read_text())["frames"] == report["frames"]


def test_bad_input_is_one_line_not_a_traceback(demos, tmp_path, capsys):
    with pytest.raises(ActionEvalError, match="no episodes with actions"):
        evaluate_actions(ConstantPolicy([0] * 7), Dataset(demos / "free_ds"), progress=False)
    policy = ConstantPolicy.save(tmp_path / "const", [0] * 7)
    for data in (demos / "free_ds", tmp_path / "nothing"):
        assert lapa(["eval", "actions", "--policy", str(policy), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
