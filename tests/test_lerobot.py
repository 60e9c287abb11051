"""LeRobot v3.0 datasets in and out: real bags exported and ingested back, and a dataset written here
by hand (pyarrow + PyAV, as lerobot's converter leaves them: plain lists, an unnamed task index, H.264,
several video files, 30 fps, two cameras) ingested with actions from end-effector poses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import user_error
from lapa_training.data.bag_reader import BagOptions
from lapa_training.data.dataset import Dataset
from lapa_training.data.errors import IngestError
from lapa_training.data.ingest import IngestOptions, ingest

PSNR_FLOOR_DB = 26.0  # AV1 at crf 30 (lerobot's setting) on 64x64 simulator frames: 27.7 dB measured at worst


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    mse = ((np.asarray(a, float) - np.asarray(b, float)) ** 2).reshape(len(a), -1).mean(axis=1)
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12))


@pytest.fixture(scope="module")
def bags(tmp_path_factory) -> Path:
    from lapa_training.data.generate import generate

    root = tmp_path_factory.mktemp("lerobot_bags")
    generate(root / "bags", ["reach", "push"], 2, image_size=64, progress=False)
    return root / "bags"


def test_bags_export_to_lerobot_v3_and_come_back_with_the_same_actions_and_instructions(tmp_path, bags):
    from lapa_cli.main import main

    assert main(["data", "export", str(bags), "--format", "lerobot", "--out", str(tmp_path / "lr")]) == 0
    root = tmp_path / "lr"
    info = json.loads((root / "meta/info.json").read_text())
    key = "observation.images.camera_image_raw"
    assert info["codebase_version"] == "v3.0" and info["fps"] == 10 and info["total_episodes"] == 4
    assert set(info["features"]) == {key, "action", "timestamp", "frame_index", "episode_index", "index", "task_index"}
    assert info["features"][key]["dtype"] == "video" and info["features"][key]["shape"] == [64, 64, 3]
    assert info["features"][key]["info"]["video.codec"] == "av1"
    assert info["features"]["action"]["names"] == ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]
    data = pq.read_table(root / "data/chunk-000/file-000.parquet")
    assert data.num_rows == info["total_frames"] and data.schema.field("action").type == pa.list_(pa.float32(), 7)
    assert np.array_equal(data.column("index").to_numpy(), np.arange(data.num_rows))
    episodes = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["dataset_to_index"] - e["dataset_from_index"] for e in episodes] == [e["length"] for e in episodes]
    assert episodes[1][f"videos/{key}/from_timestamp"] == pytest.approx(episodes[0]["length"] / 10)
    tasks = pq.read_table(root / "meta/tasks.parquet")
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["task"]  # pandas reads it as the index
    stats = json.loads((root / "meta/stats.json").read_text())
    assert np.asarray(stats[key]["mean"]).shape == (3, 1, 1) and len(stats["action"]["q99"]) == 7

    source = Dataset(_ingested(bags, tmp_path))  # what the export held
    ingest([root], tmp_path / "back", IngestOptions(image_size=0, action_key="action", progress=False,
                                                     warn=lambda m: None))
    back = Dataset(tmp_path / "back")
    assert [e["instruction"] for e in back.episodes] == [e["instruction"] for e in source.episodes]
    assert [e["length"] for e in back.episodes] == [e["length"] for e in source.episodes]
    for e in source.episodes:
        sl = source.episode_slice(e["index"])
        ours, theirs = np.asarray(source.actions[sl]), np.asarray(back.actions[sl])
        np.testing.assert_array_equal(theirs[:-1], ours[:-1])  # every step, bit for bit
        assert np.isnan(ours[-1]).all() and np.all(theirs[-1, :6] == 0)  # the last frame: a hold in LeRobot
    assert psnr(source.frames, back.frames).min() >= PSNR_FLOOR_DB


def _ingested(bags: Path, tmp_path: Path) -> Path:
    ingest([bags], tmp_path / "src", IngestOptions(image_size=0, progress=False, warn=lambda m: None))
    return tmp_path / "src"


# ---------------------------------------------------------------- a dataset written by hand
FPS = 30
LENGTHS = (30, 24, 27)
VELOCITY = np.array([0.03, -0.01, 0.02])  # m/s
YAW_RATE = 0.3  # rad/s


def _frame_value(j: int) -> int:
    return 20 + 6 * j  # each frame's gray level says which frame it is


def _pose_rows(n: int) -> np.ndarray:
    t = np.arange(n) / FPS
    position = np.array([0.4, 0.0, 0.3]) + t[:, None] * VELOCITY
    half = YAW_RATE * t / 2  # a rotation about z, as a quaternion (x, y, z, w)
    quat_xyzw = np.stack([np.zeros(n), np.zeros(n), np.sin(half), np.cos(half)], axis=1)
    gripper = np.linspace(0.08, 0.0, n)  # finger opening in metres: open 0.08 .. closed 0
    return np.concatenate([position, quat_xyzw, gripper[:, None]], axis=1)


def _encode(path: Path, frames: list[np.ndarray]) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_foreign_dataset(root: Path, version: str = "v3.0") -> Path:
    front = lambda j: np.full((32, 32, 3), _frame_value(j), np.uint8)  # noqa: E731
    wrist = np.zeros((32, 32, 3), np.uint8)
    files = {0: [0, 1], 1: [2]}  # video file -> its episodes
    video_rows = {}
    for file, eps in files.items():
        offset = 0
        for cam, image in (("front", front), ("wrist", lambda j: wrist)):
            _encode(root / f"videos/observation.images.{cam}/chunk-000/file-{file:03d}.mp4",
                    [image(j) for e in eps for j in range(LENGTHS[e])])
        for e in eps:
            video_rows[e] = (file, offset / FPS, (offset + LENGTHS[e]) / FPS)
            offset += LENGTHS[e]
    rows = {"observation.state": [], "timestamp": [], "frame_index": [], "episode_index": [], "index": [],
            "task_index": []}
    index = 0
    for e, n in enumerate(LENGTHS):
        rows["observation.state"] += _pose_rows(n).tolist()
        rows["timestamp"] += (np.arange(n) / FPS).tolist()
        rows["frame_index"] += list(range(n))
        rows["episode_index"] += [e] * n
        rows["index"] += list(range(index, index + n))
        rows["task_index"] += [e % 2] * n
        index += n
    (root / "data/chunk-000").mkdir(parents=True)
    pq.write_table(pa.table({**rows, "timestamp": pa.array(rows["timestamp"], pa.float32())}),
                   root / "data/chunk-000/file-000.parquet")  # the state as list<double>, as pandas writes it
    starts = np.cumsum((0,) + LENGTHS)
    episode_rows = [{"episode_index": e, "tasks": [("pick up the cube", "open the drawer")[e % 2]], "length": n,
                     "data/chunk_index": 0, "data/file_index": 0, "dataset_from_index": int(starts[e]),
                     "dataset_to_index": int(starts[e + 1]),
                     **{f"videos/observation.images.{cam}/{k}": v for cam in ("front", "wrist")
                        for k, v in zip(("chunk_index", "file_index", "from_timestamp", "to_timestamp"),
                                        (0, *video_rows[e]))}}
                    for e, n in enumerate(LENGTHS)]
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(episode_rows[:2]), root / "meta/episodes/chunk-000/file-000.parquet")
    pq.write_table(pa.Table.from_pylist(episode_rows[2:]), root / "meta/episodes/chunk-000/file-001.parquet")
    pq.write_table(pa.table({"task_index": [0, 1], "__index_level_0__": ["pick up the cube", "open the drawer"]}),
                   root / "meta/tasks.parquet")  # the task strings as an unnamed pandas index
    video = {"dtype": "video", "shape": [32, 32, 3], "names": ["height", "width", "channels"]}
    info = {"codebase_version": version, "robot_type": "so100", "fps": FPS, "total_episodes": 3,
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
            "features": {"observation.images.front": video, "observation.images.wrist": video,
                         "observation.state": {"dtype": "float32", "shape": [8], "names": None},
                         "timestamp": {"dtype": "float32", "shape": [1], "names": None}}}
    (root / "meta/info.json").write_text(json.dumps(info))
    return root


def test_a_foreign_lerobot_dataset_ingests_with_actions_from_its_end_effector_poses(tmp_path):
    root = write_foreign_dataset(tmp_path / "so100")
    options = IngestOptions(image_size=0, action_key="observation.state", action_convention="pose_quat_xyzw",
                            bag=BagOptions(image_topic="observation.images.front", gripper_open=0.08,
                                           gripper_closed=0.0), progress=False, warn=lambda m: None)
    ingest([tmp_path], tmp_path / "ds", options)  # found inside a folder, as bags are
    ds = Dataset(tmp_path / "ds")
    assert [e["instruction"] for e in ds.episodes] == ["pick up the cube", "open the drawer", "pick up the cube"]
    assert [e["length"] for e in ds.episodes] == [10, 8, 9]  # 30 fps at 10 Hz: every 3rd frame
    assert ds.episodes[0]["fps"] == 10 and ds.episodes[0]["window_frames"] == 6
    for e in ds.episodes:
        sl = ds.episode_slice(e["index"])
        levels = np.asarray(ds.frames[sl], float).mean(axis=(1, 2, 3))
        np.testing.assert_allclose(levels, [_frame_value(3 * k) for k in range(e["length"])], atol=3)
        actions = np.asarray(ds.actions[sl])
        np.testing.assert_allclose(actions[:-1, :3], np.tile(VELOCITY * 0.1, (e["length"] - 1, 1)), atol=1e-6)
        np.testing.assert_allclose(actions[:-1, 3:6], np.tile([0, 0, YAW_RATE * 0.1], (e["length"] - 1, 1)),
                                   atol=1e-6)
        closure = 1 - _pose_rows(LENGTHS[e["index"]])[:, 7] / 0.08
        np.testing.assert_allclose(actions[:-1, 6], closure[3:3 * e["length"]:3], atol=1e-6)  # reached at the next
        assert np.isnan(actions[-1]).all()


def test_a_foreign_lerobot_dataset_without_an_action_key_is_action_free_and_says_so(tmp_path):
    root = write_foreign_dataset(tmp_path / "so100")
    said = []
    ingest([root], tmp_path / "ds", IngestOptions(image_size=16, bag=BagOptions(image_topic="observation.images.wrist"),
                                                  progress=False, warn=said.append))
    ds = Dataset(tmp_path / "ds")
    assert not any(e["has_actions"] for e in ds.episodes) and np.isnan(np.asarray(ds.actions)).all()
    assert sum("action-free" in m for m in said) == 1 and np.asarray(ds.frames).max() <= 3  # the black wrist camera


def test_both_cameras_of_a_foreign_lerobot_dataset_in_one_ingest(tmp_path, capsys):
    from lapa_cli.main import main

    root = write_foreign_dataset(tmp_path / "so100")
    assert main(["data", "ingest", str(root), "--out", str(tmp_path / "ds"), "--image-size", "0",
                 "--image-topic", "observation.images.front", "--image-topic", "observation.images.wrist"]) == 0
    front, wrist = Dataset(tmp_path / "ds"), Dataset(tmp_path / "ds", camera="observation.images.wrist")
    assert front.cameras == ["observation.images.front", "observation.images.wrist"]
    assert len(front.frames) == len(wrist.frames) == 27
    np.testing.assert_allclose(np.asarray(front.frames[:10], float).mean(axis=(1, 2, 3)),
                               [_frame_value(3 * k) for k in range(10)], atol=3)
    assert np.asarray(wrist.frames).max() <= 3  # the black wrist camera, row for row beside the front one


def test_bad_lerobot_inputs_are_one_line_errors(tmp_path, capsys):
    root = write_foreign_dataset(tmp_path / "so100")
    user_error(capsys, ["data", "ingest", str(root), "--out", str(tmp_path / "a")], "2 cameras",
               "observation.images.front", "--image-topic")
    user_error(capsys, ["data", "ingest", str(root), "--out", str(tmp_path / "b"), "--image-topic",
                        "observation.images.front", "--action-key", "action"], "no feature 'action'",
               "observation.state")
    user_error(capsys, ["data", "ingest", str(root), "--out", str(tmp_path / "c"), "--image-topic", "cam"],
               "no camera feature 'cam'")
    old = write_foreign_dataset(tmp_path / "old", version="v2.1")
    user_error(capsys, ["data", "ingest", str(old), "--out", str(tmp_path / "d")], "codebase_version v2.1",
               "convert_dataset_v21_to_v30")
    user_error(capsys, ["data", "export", str(tmp_path / "missing"), "--out", str(tmp_path / "e")],
               "no such file or directory")
    assert not (tmp_path / "a").exists() and not (tmp_path / "e").exists()
    with pytest.raises(IngestError, match="a LeRobot dataset's 'action' is every frame's"):
        from lapa_training.data.lerobot_export import export_lerobot

        mixed = tmp_path / "mixed"
        ingest([root], mixed, IngestOptions(image_size=16, bag=BagOptions(image_topic="observation.images.front"),
                                            progress=False, warn=lambda m: None))
        ingest([root], mixed, IngestOptions(image_size=16, action_key="observation.state",
                                            action_convention="pose_quat_xyzw", mode="append",
                                            bag=BagOptions(image_topic="observation.images.front"),
                                            progress=False, warn=lambda m: None))
        export_lerobot(mixed, tmp_path / "f", progress=False)
