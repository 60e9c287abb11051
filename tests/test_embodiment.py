"""A second embodiment for the simulator: a free-floating two-finger hand (``floating_gripper``).

It stands in for "videos of another embodiment" in LAPA: the same tasks and camera, a visibly
different actor and scene tint, no actions recorded. These tests check that the scripted expert
still solves the tasks with it through the same twist interface, that its frames really look
different from the Panda's, that the default (Panda) simulator is untouched, and that the data
generator writes action-free episodes that say which embodiment made them.
"""

from __future__ import annotations

import json

import mujoco
import numpy as np
import pytest
import yaml

from lapa_sim import scene, tasks
from lapa_sim.env import TabletopEnv
from lapa_sim.expert import ScriptedExpert
from lapa_sim.rollout import run_episode

SIZE = 64


@pytest.fixture(scope="module")
def hand():
    e = TabletopEnv(image_size=(SIZE, SIZE), embodiment="floating_gripper")
    yield e
    e.close()


@pytest.fixture(scope="module")
def panda():
    e = TabletopEnv(image_size=(SIZE, SIZE))
    yield e
    e.close()


def _expert_run(env, task: str, seed: int, steps: int):
    """Reset to (task, seed) and let the expert act for steps control periods; returns obs and qpos trail."""
    obs = env.reset(task, seed)
    expert = ScriptedExpert(env.episode, noise=0.02, seed=seed)
    trail = []
    for _ in range(steps):
        twist, gripper = expert.act(obs)
        obs = env.step(twist, gripper, 0.1)
        trail.append(env.data.qpos.copy())
    return obs, np.array(trail)


# ---------------------------------------------------------------- the hand does the tasks
@pytest.mark.parametrize("task", tasks.TASKS)
def test_scripted_expert_solves_the_tasks_with_the_floating_gripper(hand, task):
    # measured: 20/20 of each task on seeds 500-519, and 50/50 reach on seeds 0-49; 4 of 5 leaves margin
    n, wins = 5, 0
    for seed in range(600, 600 + n):
        experts = []

        def factory(ep):
            experts.append(ScriptedExpert(ep, noise=0.02, seed=seed))
            return experts[-1].act

        wins += run_episode(hand, factory, task, seed, done=lambda: experts[-1].done).success
    assert wins >= 4, f"{task}: expert solved {wins}/{n} with the floating gripper"


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_floating_gripper_follows_twists_like_the_arm(hand, axis):
    obs0 = hand.reset("reach", 1)
    twist = np.zeros(6)
    twist[axis] = -0.05 if axis == 2 else 0.05
    for _ in range(10):
        obs = hand.step(twist, 1.0, 0.1)
    moved = obs.tcp_pos - obs0.tcp_pos
    assert moved[axis] == pytest.approx(twist[axis], abs=0.01)
    assert np.all(np.abs(np.delete(moved, axis)) < 0.005), moved
    assert obs.gripper_opening > 0.95 and obs.joint_names == scene.HAND_FINGER_JOINTS


def test_floating_gripper_turns_halts_when_stale_and_closes_its_fingers(hand):
    obs0 = hand.reset("reach", 2)
    for _ in range(10):
        obs = hand.step(np.array([0, 0, 0, 0, 0, 0.3]), 0.0, 0.1)
    assert obs.tcp_rpy[2] - obs0.tcp_rpy[2] == pytest.approx(0.3, abs=0.05)
    assert np.linalg.norm(obs.tcp_pos - obs0.tcp_pos) < 0.005
    assert obs.gripper_opening < 0.05  # closed on nothing
    hand.command(np.array([0.1, 0, 0, 0, 0, 0]))
    hand.advance(0.5)  # past the 0.25 s timeout
    assert hand.servo.halted_reason == "stale command"
    stopped = hand.observe().tcp_pos
    hand.advance(1.0)
    assert np.linalg.norm(hand.observe().tcp_pos - stopped) < 0.002
    with pytest.raises(ValueError, match="NaN"):
        hand.command(np.array([np.nan, 0, 0, 0, 0, 0]))


def test_floating_gripper_starts_where_the_panda_tcp_starts(hand, panda):
    a, b = panda.reset("push", 4), hand.reset("push", 4)
    assert np.linalg.norm(a.tcp_pos - b.tcp_pos) < 0.002
    assert abs(np.dot(a.tcp_quat, b.tcp_quat)) > 0.9999
    np.testing.assert_allclose(a.block_pos, b.block_pos, atol=1e-3)  # same layout


# ---------------------------------------------------------------- it looks different
def _arm_white(img: np.ndarray) -> np.ndarray:
    """Pixels of the Panda's white links: brighter than the hand's pale counter, and unsaturated."""
    x = img.astype(int)
    return (x.min(-1) > 220) & (x.max(-1) - x.min(-1) < 30)


@pytest.mark.parametrize("task, seed", [("reach", 1), ("pick_place", 3)])
def test_frames_differ_clearly_from_the_pandas_but_show_the_same_layout(hand, panda, task, seed):
    start = {name: (env.reset(task, seed), env.render()) for name, env in (("panda", panda), ("hand", hand))}
    mid = {}
    for name, env in (("panda", panda), ("hand", hand)):
        obs, _ = _expert_run(env, task, seed, 25)  # the hand is down at the block by now
        mid[name] = (obs, env.render())
    # the two actors follow the same expert to the same place...
    # (the arm's servo lags the hand's by a few mm at most)
    assert np.linalg.norm(mid["panda"][0].tcp_pos - mid["hand"][0].tcp_pos) < 0.02
    for frames in (start, mid):
        a, b = frames["panda"][1].astype(int), frames["hand"][1].astype(int)
        # ...but the pictures differ a lot: actor, colours and the table tint
        assert np.abs(a - b).mean() > 15
        # no arm: the top band, where the Panda's links come into view, has none of them
        top = slice(0, SIZE // 4)
        assert _arm_white(frames["panda"][1])[top].mean() > 0.03
        assert _arm_white(frames["hand"][1])[top].mean() < 0.005
        assert np.abs(a[top] - b[top]).mean() > 15
    # the camera and layout are the same: the target block is drawn at the same place
    ep = panda.episode
    rgb = np.array(scene.COLORS[ep.color][:3]) * 255
    centroids = []
    for _, img in start.values():
        ys, xs = np.nonzero(np.linalg.norm(img.astype(float) - rgb, axis=-1) < 90)
        assert len(ys) >= 4
        centroids.append([ys.mean(), xs.mean()])
    assert np.linalg.norm(np.subtract(*centroids)) < 2.0


# ---------------------------------------------------------------- the default is untouched
def test_default_env_is_the_panda_and_unchanged_by_the_option(panda):
    def saved(model):
        buf = np.zeros(mujoco.mj_sizeModel(model), np.uint8)
        mujoco.mj_saveModel(model, None, buf)
        return buf

    np.testing.assert_array_equal(saved(scene.build_model()), saved(scene.build_model(embodiment="panda")))
    explicit = TabletopEnv(image_size=(SIZE, SIZE), embodiment="panda")
    try:
        assert panda.embodiment == explicit.embodiment == "panda"
        assert "hand" not in [panda.model.body(i).name for i in range(panda.model.nbody)]
        trails, frames = [], []
        for env in (panda, explicit):
            obs, trail = _expert_run(env, "pick_place", 5, 20)
            trails.append(trail)
            frames.append(env.render())
            assert obs.joint_names == scene.ARM_JOINTS + scene.FINGER_JOINTS
        np.testing.assert_array_equal(trails[0], trails[1])
        np.testing.assert_array_equal(frames[0], frames[1])
    finally:
        explicit.close()


def test_unknown_embodiment_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown embodiment 'octopus'.*panda, floating_gripper"):
        TabletopEnv(embodiment="octopus")


# ---------------------------------------------------------------- data generation
def test_generate_writes_action_free_floating_gripper_episodes(tmp_path):
    from lapa_training.data.dataset import Dataset
    from lapa_training.data.generate import generate
    from lapa_training.data.ingest import IngestOptions, ingest

    done = generate(tmp_path / "bags", ["reach"], 1, first_seed=7, image_size=32, record_actions=False,
                    progress=False, embodiment="floating_gripper")
    assert len(done) == 1 and done[0].success
    bag = done[0].path
    meta = json.loads((bag / "episode.json").read_text())
    assert meta["embodiment"] == "floating_gripper" and meta["robot"] == "floating_gripper"
    custom = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]["custom_data"]
    assert custom["lapa.embodiment"] == "floating_gripper"
    assert set(meta["topics"]) == {"/camera/image_raw", "/lapa/instruction"}

    ingest([tmp_path / "bags"], tmp_path / "ds", IngestOptions(image_size=32, progress=False))
    ds = Dataset(tmp_path / "ds")
    (record,) = ds.episodes
    assert not record["has_actions"] and np.all(np.isnan(ds.actions))
    assert record["provenance"]["robot"] == "floating_gripper" and record["task"] == "reach"
    assert record["instruction"] == done[0].instruction
    assert len(ds.pairs("train")) > 0  # usable for latent-action pretraining


def test_floating_gripper_episodes_can_still_record_actions(tmp_path, hand, panda):
    from lapa_training.data.dataset import Dataset
    from lapa_training.data.generate import generate_episode
    from lapa_training.data.ingest import IngestOptions, ingest

    ep = generate_episode(hand, tmp_path / "bags", "reach", 8, keep_arrays=True)
    ingest([tmp_path / "bags"], tmp_path / "ds", IngestOptions(image_size=SIZE, progress=False))
    ds = Dataset(tmp_path / "ds")
    assert ds.episodes[0]["has_actions"]
    np.testing.assert_allclose(np.asarray(ds.actions)[:-1, :3], ep.twists[:, :3] * 0.1, atol=1e-9)
    # the Panda's episodes say so too
    ep = generate_episode(panda, tmp_path / "panda", "reach", 8, record_actions=False)
    meta = json.loads((ep.path / "episode.json").read_text())
    assert meta["embodiment"] == "panda" and meta["robot"] == "panda"


def test_cli_generate_takes_the_embodiment(tmp_path, capsys):
    from lapa_cli.main import main

    rc = main(["data", "generate", "--out", str(tmp_path / "bags"), "--tasks", "reach", "--episodes", "1",
               "--image-size", "32", "--embodiment", "floating_gripper", "--action-free"])
    assert rc == 0, capsys.readouterr().err
    (bag,) = [p for p in (tmp_path / "bags").iterdir() if p.is_dir()]
    assert json.loads((bag / "episode.json").read_text())["embodiment"] == "floating_gripper"


# ---------------------------------------------------------------- varied scene colours
def test_varied_scene_colours_recolour_the_table_and_floor_per_seed_and_keep_the_blocks(hand):
    import colorsys

    varied = TabletopEnv(image_size=(SIZE, SIZE), embodiment="floating_gripper", scene_colors="varied")
    try:
        table, floor = varied.model.geom("table").id, varied.model.geom("floor").id
        seen = []
        for seed in (3, 4, 5, 3):
            varied.reset("reach", seed)
            frame = varied.render()
            seen.append(varied.model.geom_rgba[[table, floor]].copy())
            hand.reset("reach", seed)
            fixed_frame = hand.render()
            # the blocks and the pad keep their episode colours; only the backdrop changes
            blocks = [varied.model.geom(f"block{i}").id for i in range(scene.N_BLOCKS)] + [varied.model.geom("pad").id]
            np.testing.assert_array_equal(varied.model.geom_rgba[blocks], hand.model.geom_rgba[blocks])
            assert np.abs(frame.astype(int) - fixed_frame.astype(int)).mean() > 5
            np.testing.assert_allclose(hand.model.geom_rgba[table], scene.HAND_TABLE_RGBA, atol=1e-6)
            for rgba in seen[-1]:  # muted: less saturated than any block colour, so blocks stand out
                assert colorsys.rgb_to_hsv(*rgba[:3])[1] <= 0.4
            assert colorsys.rgb_to_hsv(*seen[-1][0][:3])[2] > colorsys.rgb_to_hsv(*seen[-1][1][:3])[2]
        assert min(colorsys.rgb_to_hsv(*c[:3])[1] for c in scene.COLORS.values()) > 0.4
        np.testing.assert_array_equal(seen[0], seen[3])  # from the seed alone
        assert not np.allclose(seen[0], seen[1]) and not np.allclose(seen[1], seen[2])
    finally:
        varied.close()


def test_unknown_scene_colours_are_a_clear_error():
    with pytest.raises(ValueError, match="unknown scene colours 'plaid'.*fixed, varied"):
        TabletopEnv(scene_colors="plaid")


def test_cli_generate_takes_the_scene_colours_and_records_them(tmp_path, capsys):
    from lapa_cli.main import main

    rc = main(["data", "generate", "--out", str(tmp_path / "bags"), "--tasks", "reach", "--episodes", "1",
               "--image-size", "32", "--embodiment", "floating_gripper", "--action-free", "--scene-colors", "varied"])
    assert rc == 0, capsys.readouterr().err
    (bag,) = [p for p in (tmp_path / "bags").iterdir() if p.is_dir()]
    meta = json.loads((bag / "episode.json").read_text())
    assert meta["embodiment"] == "floating_gripper" and meta["scene_colors"] == "varied"


# ---------------------------------------------------------------- varied hands
def test_varied_embodiment_colours_give_each_seed_its_own_hand_and_leave_the_scene(hand):
    import colorsys

    varied = TabletopEnv(image_size=(SIZE, SIZE), embodiment="floating_gripper", embodiment_colors="varied")
    try:
        geom = lambda names: [varied.model.geom(n).id for n in names]  # noqa: E731
        skin, fingers, sleeve = geom(scene.HAND_SKIN_GEOMS), geom(scene.HAND_FINGER_GEOMS), geom(scene.HAND_SLEEVE_GEOMS)
        rest = geom(("table", "floor", "pad", *(f"block{i}" for i in range(scene.N_BLOCKS))))
        looks = []
        for seed in (3, 4, 5, 3):
            varied.reset("reach", seed)
            frame = varied.render()
            hand.reset("reach", seed)
            # the scene keeps the floating gripper's own table and the episode's blocks: only the hand changes
            np.testing.assert_array_equal(varied.model.geom_rgba[rest], hand.model.geom_rgba[rest])
            assert np.abs(frame.astype(int) - hand.render().astype(int)).max() > 40
            rgba = varied.model.geom_rgba
            assert np.ptp(rgba[skin], axis=0).max() == 0 and np.ptp(rgba[sleeve], axis=0).max() == 0
            for finger in fingers:  # a shade darker than the skin
                np.testing.assert_allclose(rgba[finger, :3], rgba[skin[0], :3] * scene.FINGER_SHADE, atol=1e-6)
            h, s, v = colorsys.rgb_to_hsv(*rgba[skin[0], :3])
            assert 0.02 <= h <= 0.11 and 0.25 <= s <= 0.65 and 0.3 <= v <= 0.95  # a skin tone
            assert colorsys.rgb_to_hsv(*rgba[sleeve[0], :3])[1] <= 0.5  # a muted sleeve
            looks.append(np.concatenate([rgba[skin[0]], rgba[sleeve[0]]]))
        np.testing.assert_array_equal(looks[0], looks[3])  # from the seed alone
        assert not np.allclose(looks[0], looks[1]) and not np.allclose(looks[1], looks[2])
    finally:
        varied.close()


def test_varied_embodiment_colours_are_for_the_floating_gripper_only(tmp_path, capsys):
    from lapa_cli.main import main

    with pytest.raises(ValueError, match="for the floating gripper.*the panda keeps its own"):
        TabletopEnv(embodiment_colors="varied")
    with pytest.raises(ValueError, match="unknown embodiment colours 'plaid'.*fixed, varied"):
        TabletopEnv(embodiment="floating_gripper", embodiment_colors="plaid")
    rc = main(["data", "generate", "--out", str(tmp_path / "panda"), "--tasks", "reach", "--episodes", "1",
               "--image-size", "32", "--embodiment-colors", "varied"])
    assert rc == 2 and "--embodiment-colors varied is for --embodiment floating_gripper" in capsys.readouterr().err
    assert not (tmp_path / "panda").exists()
    rc = main(["data", "generate", "--out", str(tmp_path / "bags"), "--tasks", "reach", "--episodes", "1",
               "--image-size", "32", "--embodiment", "floating_gripper", "--action-free", "--embodiment-colors", "varied"])
    assert rc == 0, capsys.readouterr().err
    (bag,) = [p for p in (tmp_path / "bags").iterdir() if p.is_dir()]
    meta = json.loads((bag / "episode.json").read_text())
    assert meta["embodiment_colors"] == "varied" and meta["scene_colors"] == "fixed"
