"""Write one episode as one rosbag2 bag, crash-safely (see bag_format.py for the conventions).

Used by the recorder node (which hands over CDR bytes straight from rclpy) and by the in-process
generator (which builds messages with the rosbags typestore). Both produce the same bags.

    writer = EpisodeBagWriter(out_dir, "ep_0001", metadata={"instruction": "...", "robot": "panda"})
    writer.add_topic("/camera/image_raw", "sensor_msgs/msg/Image", qos="sensor")
    writer.write("/camera/image_raw", t_ns, cdr_bytes)      # or writer.write_msg(topic, t_ns, msg)
    path = writer.close(success=True)                        # or writer.discard()
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from rosbags.rosbag2 import StoragePlugin, Writer

from lapa_training.data import bag_format
from lapa_training.data.bag_format import typestore

STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}


def _qos(kind: str) -> Qos:
    """The QoS a recorder subscribes with, stored as the topic's offered profile (what ros2 bag play reuses)."""
    zero = QosTime(0, 0)
    reliability = QosReliability.BEST_EFFORT if kind == "sensor" else QosReliability.RELIABLE
    durability = QosDurability.TRANSIENT_LOCAL if kind == "latched" else QosDurability.VOLATILE
    return Qos(QosHistory.KEEP_LAST, 5 if kind == "sensor" else 10, reliability, durability,
               zero, zero, QosLiveliness.AUTOMATIC, zero, False)


class EpisodeWriterError(RuntimeError):
    """The episode could not be started or finished (name taken, disk problem)."""


class EpisodeBagWriter:
    def __init__(self, out_dir: str | Path, name: str, *, storage: str = "mcap",
                 metadata: dict[str, Any] | None = None):
        if storage not in STORAGES:
            raise EpisodeWriterError(f"unknown storage '{storage}'; use one of {', '.join(STORAGES)}")
        if not name or "/" in name or name.startswith("."):
            raise EpisodeWriterError(f"bad episode name '{name}': use letters, digits, '_' or '-'")
        self.out_dir = Path(out_dir)
        self.name = name
        self.final_path = self.out_dir / name
        self.staging_path = self.out_dir / bag_format.STAGING_DIR / name
        if self.final_path.exists():
            raise EpisodeWriterError(f"episode '{name}' already exists in {self.out_dir}")
        if self.staging_path.exists():
            raise EpisodeWriterError(f"an interrupted recording named '{name}' is in {self.staging_path.parent}; "
                                     "pick another name or remove it")
        self.staging_path.parent.mkdir(parents=True, exist_ok=True)
        self.metadata: dict[str, Any] = {"status": bag_format.STATUS_RECORDING,
                                         "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                         **(metadata or {})}
        self._writer = Writer(self.staging_path, version=9, storage_plugin=STORAGES[storage])
        self._writer.open()
        self.storage = storage
        self._connections: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.first_ns: int | None = None
        self.last_ns: int | None = None
        self._write_episode_json()

    # ---------------------------------------------------------------- writing
    def add_topic(self, topic: str, msgtype: str, qos: str = "reliable") -> None:
        """Declare a topic before its first message; qos is 'sensor', 'reliable' or 'latched'."""
        if topic in self._connections:
            return
        self._connections[topic] = self._writer.add_connection(
            topic, msgtype, typestore=typestore(), offered_qos_profiles=[_qos(qos)])
        self.counts[topic] = 0

    def write(self, topic: str, t_ns: int, cdr: bytes | memoryview) -> None:
        """Append one CDR-serialized message received at t_ns (nanoseconds since the epoch)."""
        self._writer.write(self._connections[topic], int(t_ns), cdr)
        self.counts[topic] += 1
        self.first_ns = t_ns if self.first_ns is None else min(self.first_ns, t_ns)
        self.last_ns = t_ns if self.last_ns is None else max(self.last_ns, t_ns)

    def write_msg(self, topic: str, t_ns: int, msg) -> None:
        """Serialize a rosbags typestore message and append it."""
        conn = self._connections[topic]
        self.write(topic, t_ns, typestore().serialize_cdr(msg, conn.msgtype))

    @property
    def message_count(self) -> int:
        return sum(self.counts.values())

    @property
    def duration_s(self) -> float:
        return 0.0 if self.first_ns is None else (self.last_ns - self.first_ns) * 1e-9

    # ---------------------------------------------------------------- finishing
    def close(self, success: bool | None, **extra: Any) -> Path:
        """Close the bag, store the outcome in its metadata and move it to its final place."""
        self.metadata.update(extra)
        self.metadata.update(status=bag_format.STATUS_COMPLETE, success=success,
                             duration_s=round(self.duration_s, 3),
                             topics={t: n for t, n in self.counts.items()})
        for key, value in self.metadata.items():
            text = value if isinstance(value, str) else json.dumps(value)
            self._writer.set_custom_data(bag_format.CUSTOM_DATA_PREFIX + key, text)
        self._writer.close()
        self._write_episode_json()
        try:
            os.replace(self.staging_path, self.final_path)
        except OSError as e:
            raise EpisodeWriterError(f"could not move {self.staging_path} to {self.final_path}: {e}") from e
        _remove_if_empty(self.staging_path.parent)
        return self.final_path

    def discard(self) -> None:
        """Drop the episode: nothing of it stays on disk."""
        try:
            self._writer.close()
        except Exception:  # a half-written bag is about to be deleted anyway
            pass
        shutil.rmtree(self.staging_path, ignore_errors=True)
        _remove_if_empty(self.staging_path.parent)

    def _write_episode_json(self) -> None:
        path = self.staging_path / bag_format.EPISODE_JSON
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.metadata, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
