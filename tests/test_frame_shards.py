"""Dataset format v2: JPEG frames in shards behind a memory-mapped index (frame_shards.py), written
by ingest, appended to, cut back after a crash, read at random, and converted from v1 in one command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from lapa_training.data import bag_format
from lapa_training.data.bag_reader import BagOptions
from lapa_training.data.dataset import Dataset, DatasetWriter, gather_frames
from lapa_training.data.frame_shards import INDEX_NPY, ShardedFrameWriter, ShardedFrames
from lapa_training.data.ingest import IngestOptions, ingest


def smooth_frames(n: int, size: int, seed: int) -> np.ndarray:
    """Camera-like frames (smooth gradients, each its own), not noise, which JPEG is not made for."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    return np.stack([np.stack([rng.uniform(20, 230) * (1 - x) + rng.uniform(20, 230) * y * x for _ in range(3)], -1)
                     for _ in range(n)]).astype(np.uint8)


def psnr(a, b) -> np.ndarray:
    mse = ((np.asarray(a, float) - np.asarray(b, float)) ** 2).reshape(len(a), -1).mean(axis=1)
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12))


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    from lapa_training.data.generate import generate

    root = tmp_path_factory.mktemp("v2_bags")
    generate(root / "bags", ["reach", "push"], 2, image_size=128, progress=False)
    return root / "bags"


def _ingest(bags, out, codec, **kw):
    ingest([bags], out, IngestOptions(image_size=128, frame_codec=codec, progress=False, warn=lambda m: None, **kw))
    return Dataset(out)


def test_jpeg_shards_hold_what_raw_frames_hold_in_a_fraction_of_the_disk(tmp_path, bags):
    raw, v2 = _ingest(bags, tmp_path / "raw", "raw"), _ingest(bags, tmp_path / "v2", "jpeg")
    assert raw.meta["format_version"] == 1 and v2.meta["format_version"] == 2 and v2.meta["frame_codec"] == "jpeg"
    assert (tmp_path / "v2/frames" / INDEX_NPY).is_file() and not (tmp_path / "v2/frames.npy").exists()
    assert v2.frames.shape == raw.frames.shape and len(v2) == len(raw)
    for name in ("actions", "timestamps", "episode_index"):
        np.testing.assert_array_equal(getattr(v2, name), getattr(raw, name))
    assert [e["instruction"] for e in v2.episodes] == [e["instruction"] for e in raw.episodes]
    assert psnr(raw.frames, v2.frames).min() > 32.0  # JPEG quality 90
    assert raw.frames.nbytes / v2.frames.disk_bytes() > 8.0  # the floor; 15x measured at 128 px
    # random access, as the trainers read: ints, slices, unsorted index arrays with repeats, negatives
    np.testing.assert_array_equal(v2.frames[[7, 3, 7]][2], v2.frames[7])
    np.testing.assert_array_equal(v2.frames[-1], v2.frames[len(v2) - 1])
    np.testing.assert_array_equal(v2.frames[2:11:3], np.stack([v2.frames[i] for i in (2, 5, 8)]))
    which, index = np.array([0, 1, 0]), np.array([4, 2, 9])
    np.testing.assert_array_equal(gather_frames([v2, raw], which, index)[1], raw.frames[2])
    with pytest.raises(IndexError):
        v2.frames[len(v2)]


def test_v1_converts_to_v2_in_one_command_and_both_open(tmp_path, bags, capsys):
    from lapa_cli.main import main

    raw = _ingest(bags, tmp_path / "raw", "raw")
    assert main(["data", "ingest", str(tmp_path / "raw"), "--out", str(tmp_path / "v2"), "--frame-codec", "jpeg",
                 "--image-size", "128"]) == 0
    v2 = Dataset(tmp_path / "v2")
    assert [e["split"] for e in v2.episodes] == [e["split"] for e in raw.episodes]
    assert psnr(raw.frames, v2.frames).min() > 32.0
    assert main(["data", "info", str(tmp_path / "v2")]) == 0
    assert "lapa-dataset v2" in capsys.readouterr().out


def test_appending_keeps_the_old_frames_and_repeated_frames_share_their_bytes(tmp_path):
    frames = smooth_frames(6, 32, seed=0)
    w = DatasetWriter(tmp_path / "ds", image_size=32, frame_codec="jpeg")
    w.add_frame(frames[0])
    w.repeat_frame()  # a camera slower than the control rate
    w.add_frame(frames[1])
    w.end_episode(np.zeros((3, 7)), np.arange(3) * 0.1, {"instruction": "a", "has_actions": True, "fps": 10.0,
                                                          "window_frames": 1})
    w.close()
    index = np.load(tmp_path / "ds/frames" / INDEX_NPY)
    assert np.array_equal(index[0], index[1]) and index[2, 1] == index[0, 1] + index[0, 2]
    first = np.asarray(Dataset(tmp_path / "ds").frames)
    w = DatasetWriter(tmp_path / "ds", image_size=32, mode="append")  # keeps the dataset's codec
    for f in frames[2:5]:
        w.add_frame(f)
    w.end_episode(np.zeros((3, 7)), np.arange(3) * 0.1, {"instruction": "b", "has_actions": True, "fps": 10.0,
                                                          "window_frames": 1})
    w.close()
    ds = Dataset(tmp_path / "ds")
    assert len(ds) == 6 and ds.meta["format_version"] == 2
    np.testing.assert_array_equal(np.asarray(ds.frames[:3]), first)
    assert psnr(frames[2:5], ds.frames[3:6]).min() > 30.0


def test_a_writer_that_died_leaves_the_dataset_as_its_last_close(tmp_path):
    frames = smooth_frames(8, 16, seed=1)
    w = ShardedFrameWriter(tmp_path / "frames", (16, 16, 3))
    for f in frames[:3]:
        w.append(f)
    w.close()
    shard = tmp_path / "frames/shard-00000.jpg"
    size = shard.stat().st_size
    np.save(tmp_path / "more.npy", frames[3:])
    died = subprocess.run([sys.executable, "-c", (
        "import os, sys, numpy as np\n"
        "from lapa_training.data.frame_shards import ShardedFrameWriter\n"
        f"w = ShardedFrameWriter('{tmp_path / 'frames'}', (16, 16, 3))\n"
        f"for f in np.load('{tmp_path / 'more.npy'}'): w.append(f)\n"
        "w._drain()\n"  # bytes and index rows on disk, the header not rewritten: then the process dies
        "os._exit(9)\n")], cwd=Path(__file__).resolve().parents[1])
    assert died.returncode == 9 and shard.stat().st_size > size
    w = ShardedFrameWriter(tmp_path / "frames", (16, 16, 3))  # reopened: cut back to the 3 frames
    assert w.rows == 3 and shard.stat().st_size == size
    w.append(frames[7])
    w.truncate(3)  # a failed episode: its bytes go too
    assert shard.stat().st_size == size
    w.close()
    assert len(ShardedFrames(tmp_path / "frames", (16, 16, 3))) == 3


def test_frames_encoded_in_batches_come_back_in_order_across_shards_repeats_and_a_cut(tmp_path, monkeypatch):
    from lapa_training.data import frame_shards

    monkeypatch.setattr(frame_shards, "SHARD_BYTES", 3000)  # a new shard every few frames
    monkeypatch.setattr(frame_shards, "IN_FLIGHT", 3)  # frames written while a batch is still open
    frames = smooth_frames(30, 24, seed=3)
    w = ShardedFrameWriter(tmp_path / "frames", (24, 24, 3))
    expected = []
    for k in range(21):  # two full batches and part of a third, a repeat inside the second
        frame = frames[k]
        w.append(frame)
        expected.append(k)
        if k == 9:
            w.append(frame)  # the same array again: a repeat
            expected.append(k)
        assert w.rows == len(expected)
    w.truncate(14)  # frames still waiting in the open batch go with the cut
    del expected[14:]
    for k in range(21, 30):
        w.append(frames[k])
        expected.append(k)
    w.close()
    stored = ShardedFrames(tmp_path / "frames", (24, 24, 3))
    index = np.load(tmp_path / "frames" / INDEX_NPY)
    assert len(stored) == len(expected) == 23 and index[:, 0].max() >= 3
    assert np.array_equal(index[9], index[10])
    assert psnr(frames[expected], np.asarray(stored)).min() > 30.0
    # each frame is closest to its own original: none swapped within or between batches
    distance = ((np.asarray(stored, float)[:, None] - frames[None].astype(float)) ** 2).mean(axis=(2, 3, 4))
    assert distance.argmin(axis=1).tolist() == expected


def test_a_frame_that_does_not_encode_fails_alone_and_its_episode_is_cut(tmp_path, monkeypatch):
    from lapa_training.data.errors import IngestError

    frames = smooth_frames(5, 16, seed=4)
    real, bad = cv2.imencode, cv2.cvtColor(frames[2], cv2.COLOR_RGB2BGR)
    monkeypatch.setattr(cv2, "imencode", lambda ext, img, params: (False, None) if np.array_equal(img, bad)
                        else real(ext, img, params))
    w = ShardedFrameWriter(tmp_path / "frames", (16, 16, 3))
    for k in (0, 1, 2, 3):  # one batch: the frames before the bad one are written
        w.append(frames[k])
    with pytest.raises(IngestError, match="cannot encode"):
        w.flush()
    w.truncate(2)  # the failed episode goes, and nothing of it raises again
    w.append(frames[4])
    w.close()
    stored = np.asarray(ShardedFrames(tmp_path / "frames", (16, 16, 3)), float)
    distance = ((stored[:, None] - frames[None].astype(float)) ** 2).mean(axis=(2, 3, 4))
    assert distance.argmin(axis=1).tolist() == [0, 1, 4]


def test_several_cameras_in_jpeg_shards(tmp_path):
    w = DatasetWriter(tmp_path / "ds", image_size=16, frame_codec="jpeg", cameras=["/front", "/wrist"])
    for level in (10, 200):
        w.add_frame(np.full((16, 16, 3), level, np.uint8))
        w.add_frame(np.full((24, 24, 3), 255 - level, np.uint8), camera="/wrist")
    w.end_episode(np.zeros((2, 7)), np.arange(2) * 0.1, {"instruction": "x", "has_actions": True, "fps": 10.0,
                                                          "window_frames": 1})
    w.close()
    meta = json.loads((tmp_path / "ds/meta.json").read_text())
    assert [c["file"] for c in meta["cameras"]] == ["frames", "frames.wrist"]
    wrist = Dataset(tmp_path / "ds", camera="/wrist").frames
    assert abs(float(np.asarray(wrist).mean(axis=(1, 2, 3))[0]) - 245) < 3
    assert abs(float(np.asarray(Dataset(tmp_path / "ds").frames[1]).mean()) - 200) < 3


@pytest.mark.parametrize("codec", ["raw", "jpeg"])
def test_ingest_in_two_processes_makes_the_dataset_one_process_makes(tmp_path, bags, codec):
    bad = tmp_path / "inputs" / "zz_broken.mcap"
    bad.parent.mkdir()
    bad.write_bytes(b"not a bag")
    inputs = [bags, bad.parent]
    opts = dict(image_size=128, frame_codec=codec, progress=False, warn=lambda m: None, skip_bad=True)
    one = ingest(inputs, tmp_path / "one", IngestOptions(**opts))
    two = ingest(inputs, tmp_path / "two", IngestOptions(workers=2, **opts))
    assert [p for p, _ in two.skipped] == [p for p, _ in one.skipped] == [str(bad)]
    a, b = Dataset(tmp_path / "one"), Dataset(tmp_path / "two")
    assert two.episodes_added == one.episodes_added == len(b.episodes) == 4
    for name in ("frames", "timestamps", "episode_index"):
        np.testing.assert_array_equal(np.asarray(getattr(b, name)), np.asarray(getattr(a, name)))
    np.testing.assert_array_equal(np.isnan(b.actions), np.isnan(a.actions))
    np.testing.assert_array_equal(np.nan_to_num(b.actions), np.nan_to_num(a.actions))
    assert b.episodes == a.episodes  # records, splits and provenance alike
    assert not list(tmp_path.glob(".two.part-*"))  # the parts are gone
    if codec == "jpeg":  # shards moved, not decoded: one per part, no empty one left open
        assert all(p.stat().st_size > 0 for p in (tmp_path / "two/frames").glob("shard-*.jpg"))
    with pytest.raises(Exception, match="zz_broken"):  # without --skip-bad: nothing written, nothing left
        ingest(inputs, tmp_path / "three", IngestOptions(workers=2, **{**opts, "skip_bad": False}))
    assert not (tmp_path / "three").exists() and not list(tmp_path.glob(".three*"))


def _jpeg(rgb: np.ndarray, **params) -> bytes:
    flags = [v for k, v in params.items() for v in (getattr(cv2, k), v)]
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), flags)
    assert ok
    return data.tobytes()


def test_jpeg_info_reads_the_frame_header_and_refuses_what_is_not_one_whole_jpeg():
    from lapa_training.data.images import jpeg_info

    rgb = smooth_frames(1, 24, seed=3)[0][:20]  # 20 high, 24 wide
    data = _jpeg(rgb)
    assert jpeg_info(data) == (20, 24, 3, False)
    assert jpeg_info(data + b"\0\0\0") == (20, 24, 3, False)  # a driver's padded buffer
    assert jpeg_info(_jpeg(rgb, IMWRITE_JPEG_PROGRESSIVE=1)) == (20, 24, 3, False)
    assert jpeg_info(_jpeg(rgb[..., :1].repeat(3, -1))).components == 3
    grey = cv2.imencode(".jpg", rgb[..., 0])[1].tobytes()
    assert jpeg_info(grey).components == 1
    assert jpeg_info(data[:-40]) is None  # cut short: no end marker
    assert jpeg_info(b"\x89PNG\r\n\x1a\n" + data[8:]) is None
    assert jpeg_info(b"") is None and jpeg_info(data[:2] + data[-2:]) is None
    exif = data[:2] + b"\xff\xe1\x00\x10Exif\0\0" + bytes(8) + data[2:]
    assert jpeg_info(exif) == (20, 24, 3, True)


def test_camera_jpegs_are_stored_as_recorded_when_no_resize_is_needed(tmp_path):
    from tests.test_ingest import M, STEP, T0, header, string, write_bag

    front, wrist = smooth_frames(6, 32, seed=4), smooth_frames(6, 24, seed=5)
    front_jpegs = [_jpeg(f) for f in front]
    wrist_jpegs = [_jpeg(f) for f in wrist]
    grey = cv2.imencode(".jpg", front[5][..., 1])[1].tobytes()  # one grey frame: decoded, colour kept apart

    def compressed(t, data):
        return M["sensor_msgs/msg/CompressedImage"](header=header(t, "camera"), format="rgb8; jpeg compressed bgr8",
                                                    data=np.frombuffer(data, np.uint8))

    msgs = [(bag_format.INSTRUCTION_TOPIC, T0, string("look"))]
    for k in (0, 1, 3, 4, 5):  # frame 2 missing: the ingest holds frame 1 over the gap
        t = T0 + k * STEP
        msgs.append(("/front/compressed", t, compressed(t, grey if k == 5 else front_jpegs[k])))
        msgs.append(("/wrist/compressed", t, compressed(t, wrist_jpegs[k])))
    bag = write_bag(tmp_path / "bag", msgs)

    def run(out, codec, size):
        ingest([bag], out, IngestOptions(image_size=size, frame_codec=codec, progress=False, warn=lambda m: None,
                                         bag=BagOptions(image_topic="/front/compressed",
                                                         extra_image_topics=("/wrist/compressed",))))
        return Dataset(out), Dataset(out, camera="/wrist/compressed")

    kept, kept_wrist = run(tmp_path / "kept", "jpeg", 0)
    index = np.load(tmp_path / "kept/frames" / INDEX_NPY)
    shard = (tmp_path / "kept/frames/shard-00000.jpg").read_bytes()
    stored = [shard[o:o + n] for _, o, n in index]
    assert stored[:5] == [front_jpegs[k] for k in (0, 1, 1, 3, 4)]  # byte for byte, the held frame once on disk
    assert index[2].tolist() == index[1].tolist()
    wrist_index = np.load(tmp_path / "kept/frames.wrist_compressed" / INDEX_NPY)
    wrist_shard = (tmp_path / "kept/frames.wrist_compressed/shard-00000.jpg").read_bytes()
    assert [wrist_shard[o:o + n] for _, o, n in wrist_index] == [wrist_jpegs[k] for k in (0, 1, 1, 3, 4, 5)]
    assert kept.frames.shape == (6, 32, 32, 3) and kept_wrist.frames.shape == (6, 24, 24, 3)
    decoded = [cv2.cvtColor(cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
               for j in front_jpegs]
    np.testing.assert_array_equal(np.asarray(kept.frames[:5]), np.stack([decoded[k] for k in (0, 1, 1, 3, 4)]))
    assert np.ptp(np.asarray(kept.frames[5]).astype(int), axis=2).max() == 0  # the grey frame, decoded to RGB
    assert kept.episodes[0]["provenance"]["encoding"].endswith("stored as recorded")

    raw, _ = run(tmp_path / "raw", "raw", 0)  # format v1: decoded, the same pixels
    np.testing.assert_array_equal(np.asarray(raw.frames[:5]), np.asarray(kept.frames[:5]))  # 5: re-encoded
    assert "stored as recorded" not in raw.episodes[0]["provenance"]["encoding"]
    small, _ = run(tmp_path / "small", "jpeg", 16)  # a resize: decoded, resized, encoded again
    assert small.frames.shape == (6, 16, 16, 3)
    assert "stored as recorded" not in small.episodes[0]["provenance"]["encoding"]
    assert psnr(np.asarray(small.frames[:2]), [cv2.resize(d, (16, 16), interpolation=cv2.INTER_AREA)
                                               for d in decoded[:2]]).min() > 30.0
