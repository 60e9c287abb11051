"""Action chunks predicted ahead of the arm (lapa_core.action_chunks), without ROS: the plan's step
alignment and blending, the refill threshold, and the controller driven tick by tick with a policy
whose predictions the test releases by hand."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from lapa_core.action_chunks import ChunkedController, ChunkPlan, chunk_time_budget, is_chunked
from lapa_core.controller import Controller
from lapa_core.policy import ConstantPolicy, PolicyLoadError, load_policy
from lapa_core.safety import MotionLimits, UnsafeCommand

IMAGE = np.zeros((8, 8, 3), np.uint8)


def rows(*values) -> np.ndarray:
    """A chunk whose row j is values[j] in every dimension."""
    return np.repeat(np.asarray(values, float)[:, None], 7, axis=1)


def test_a_late_prediction_drops_the_steps_that_have_passed_and_blends_the_rest():
    plan = ChunkPlan()
    assert plan.next() is None and plan.executed == 0  # nothing planned: the step is not used up
    plan.add(rows(0, 1, 2, 3, 4), observed_at=0)
    assert plan.left() == 5
    assert plan.next()[0] == 0 and plan.next()[0] == 1 and plan.executed == 2
    # predicted from the frame taken after step 1 was executed; steps 1 has passed since
    assert plan.add(rows(10, 11, 12, 13, 14), observed_at=1) == 1
    assert plan.left() == 4  # steps 2..5
    assert [plan.next()[0] for _ in range(4)] == [(2 + 11) / 2, (3 + 12) / 2, (4 + 13) / 2, 14]
    assert plan.next() is None and plan.left() == 0
    assert plan.add(rows(7, 8), observed_at=0) == 2  # wholly in the past: nothing planned
    assert plan.left() == 0


@pytest.mark.parametrize("decay, expected", [(0.0, 5.0), (np.log(3.0), 2.5), (-np.log(3.0), 7.5)])
def test_blend_decay_weighs_older_or_newer_predictions(decay, expected):
    plan = ChunkPlan(blend_decay=decay)
    plan.add(rows(0, 0), observed_at=0)
    plan.add(rows(10, 10), observed_at=0)
    assert plan.next()[0] == pytest.approx(expected)  # weights 1 (oldest) and exp(-decay)


class GatedPolicy:
    """A chunked policy whose every prediction waits until the test releases it."""

    control_rate = 10.0

    def __init__(self, chunk_size: int, fail: BaseException | None = None):
        self.chunk_size = chunk_size
        self.release = threading.Semaphore(0)
        self.calls = 0
        self.fail = fail
        self.resets = []

    def reset(self, instruction):
        self.resets.append(instruction)

    def act(self, image, instruction):  # pragma: no cover - the chunked path never calls it
        raise AssertionError("act() called on the chunked path")

    def act_chunk(self, image, instruction):
        assert image.shape == IMAGE.shape and instruction == "go"
        self.release.acquire()
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return rows(*[self.calls * 100 + j for j in range(self.chunk_size)]) * 1e-5


def controller(policy, **kwargs) -> ChunkedController:
    chunked = ChunkedController(Controller(policy, MotionLimits(), 10.0), **kwargs)
    chunked.reset("go")
    return chunked


def test_predictions_run_ahead_while_the_plan_executes():
    policy = GatedPolicy(chunk_size=6)
    chunked = controller(policy, refill_steps=3)
    assert is_chunked(policy) and not is_chunked(ConstantPolicy([0] * 7))
    assert chunked.tick(lambda: IMAGE) is None and chunked.predicting  # first prediction running
    assert chunked.tick(lambda: IMAGE) is None  # still thinking: nothing to send
    policy.release.release()
    chunked.wait(5)
    sent = []
    for _ in range(3):  # steps 0..2 of the first chunk (the arm waited for it: none has passed)
        sent.append(chunked.tick(lambda: IMAGE).step.delta[0])
    assert sent == pytest.approx([100e-5, 101e-5, 102e-5])
    assert chunked.predicting and policy.calls == 1  # 3 left after the 3rd tick: the refill started
    sent.append(chunked.tick(lambda: IMAGE).step.delta[0])  # step 3, the second prediction not back
    policy.release.release()
    chunked.wait(5)
    # the second prediction saw the frame after step 2: its row 0 is for step 2 (passed), row 1 for step 3
    # (passed too), rows 2..5 for steps 4..7, blended with the first chunk's rows 4 and 5
    for _ in range(4):
        sent.append(chunked.tick(None).step.delta[0])
    assert sent[4:] == pytest.approx([(104 + 202) / 2 * 1e-5, (105 + 203) / 2 * 1e-5, 204e-5, 205e-5])
    assert chunked.tick(None) is None  # dry: the caller decelerates; no step is used up
    assert chunked.plan.executed == 8


def test_the_refill_threshold_follows_the_measured_prediction_time():
    chunked = controller(GatedPolicy(chunk_size=30))
    assert chunked.refill_threshold() == 1  # nothing measured yet
    chunked.latencies = [0.05]
    assert chunked.refill_threshold() == 2  # within one period at 10 Hz, plus one
    chunked.latencies = [0.05, 0.31, 0.12]
    assert chunked.refill_threshold() == 5  # the slowest recent one: 4 periods, plus one
    chunked.latencies = [5.0]
    assert chunked.refill_threshold() == 29  # never more than the chunk minus one
    assert controller(GatedPolicy(chunk_size=30), refill_steps=7).refill_threshold() == 7
    assert chunk_time_budget(21) == 10  # a chunk of 21 keeps up with predictions of 10 periods


@pytest.mark.parametrize("fail, raised", [(RuntimeError("model crashed"), RuntimeError),
                                          (None, UnsafeCommand)])
def test_a_failed_or_unsafe_prediction_is_raised_to_the_control_loop(fail, raised):
    policy = GatedPolicy(chunk_size=4, fail=fail)
    if fail is None:
        policy.act_chunk = lambda image, instruction: np.full((4, 7), np.nan)
    chunked = controller(policy)
    chunked.tick(lambda: IMAGE)
    policy.release.release()
    chunked.wait(5)
    with pytest.raises(raised):
        chunked.tick(lambda: IMAGE)


def test_a_new_goal_waits_for_the_prediction_the_last_one_left_running():
    policy = GatedPolicy(chunk_size=4)
    lock = threading.Lock()
    old = controller(policy, policy_lock=lock)
    old.tick(lambda: IMAGE)  # the goal ends with this prediction still running
    new = ChunkedController(Controller(policy, MotionLimits(), 10.0), policy_lock=lock)
    started = threading.Thread(target=new.reset, args=("next goal",))
    started.start()
    started.join(0.2)
    assert started.is_alive() and policy.resets == ["go"]  # reset waits: never beside a running act_chunk
    policy.release.release()
    started.join(5)
    assert policy.resets == ["go", "next goal"]


def test_the_constant_policy_stands_in_for_a_chunked_model(tmp_path):
    policy = load_policy(ConstantPolicy.save(tmp_path / "c", [0.001, 0, 0, 0, 0, 0, 1.0], chunk_size=5,
                                             nan_at_step=2))
    assert is_chunked(policy)
    assert policy.act_chunk(IMAGE, "x").shape == (5, 7)
    assert np.isnan(policy.act_chunk(IMAGE, "x")[0, 0])  # faults count predictions
    policy.reset("x")
    for _ in range(5):  # act hands out one prediction's steps, one per call
        policy.act(IMAGE, "x")
    assert policy.steps == 1
    policy.act(IMAGE, "x")
    assert policy.steps == 2
    with pytest.raises(PolicyLoadError, match="'chunk_size' must be an integer >= 1"):
        load_policy(ConstantPolicy.save(tmp_path / "bad", [0] * 7, chunk_size=0))
