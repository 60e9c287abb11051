"""What a bag holds, for `lapa data info BAG`: topics, types, rates, and the sources ingest would use.

    info = describe_bag(Path("bags/arm_demo"), BagOptions(urdf="robot.urdf"))
    print(format_bag_info(info))
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from lapa_training.data import bag_format
from lapa_training.data.bag_reader import ACTION_SOURCES, BagOptions, bag_topics, find_sources, load_robot, \
    open_reader, ros2_type_name, storage_name
from lapa_training.data.errors import IngestError
from lapa_training.data.images import IMAGE_TYPES
from lapa_training.data.tf_tree import TransformError, TransformHistory


def describe_bag(path: str | Path, options: BagOptions | None = None) -> dict[str, Any]:
    """Topics with type, count and rate [Hz], image topics, and each action and gripper source: used or why not."""
    path, options = Path(path), options or BagOptions()
    reader = open_reader(path)
    try:
        topics = bag_topics(reader)
        times: dict[str, list[int]] = {name: [] for name in topics}
        tf = TransformHistory()
        ts = bag_format.typestore()
        for conn, receive_ns, raw in reader.messages():
            times[conn.topic].append(receive_ns)
            if ros2_type_name(conn.msgtype) == "tf2_msgs/msg/TFMessage" and conn.topic in (options.tf_topic, options.tf_static_topic):
                try:
                    for t in ts.deserialize_cdr(raw, "tf2_msgs/msg/TFMessage").transforms:
                        p, q = t.transform.translation, t.transform.rotation
                        tf.add(t.header.frame_id, t.child_frame_id, 0, (p.x, p.y, p.z), (q.w, q.x, q.y, q.z),
                               static=True)  # only the tree's shape matters here
                except Exception as e:
                    raise IngestError(f"{path}: cannot parse {conn.msgtype} on {conn.topic} ({e})") from e
        storage = storage_name(reader)
    except IngestError:
        raise
    except Exception as e:
        raise IngestError(f"{path}: corrupt or truncated bag ({type(e).__name__}: {e})") from e
    finally:
        reader.close()

    rows = []
    for name, (typename, count) in sorted(topics.items()):
        stamps = np.sort(np.array(times[name], dtype=np.int64))
        span = (stamps[-1] - stamps[0]) * 1e-9 if len(stamps) > 1 else 0.0
        rows.append({"topic": name, "type": typename, "messages": count,
                     "rate_hz": round((len(stamps) - 1) / span, 1) if span > 0 else None})
    info: dict[str, Any] = {"path": str(path), "storage": storage, "topics": rows,
                            "images": sorted(t for t, (typ, _) in topics.items() if typ in IMAGE_TYPES)}
    try:
        found = find_sources(path, topics, replace(options, actions="auto"))
    except IngestError as e:
        info.update(image=None, actions=[], gripper=None, problem=str(e))
        return info
    sources = []
    for source in found.actions:
        entry = {"source": source, "usable": True}
        if source == "tf":
            try:
                up, down = tf.chain(options.base_frame, options.tcp_frame)
                entry["detail"] = f"{options.base_frame} -> {options.tcp_frame}, {len(up) + len(down)} transforms"
            except TransformError as e:
                entry.update(usable=False, detail=str(e))
        elif source == "joints":
            try:
                joints = load_robot(options.urdf).chain_joints(options.base_frame, options.tcp_frame)
                entry["detail"] = f"{options.base_frame} -> {options.tcp_frame}, {len(joints)} joints of the URDF"
            except IngestError as e:
                entry.update(usable=False, detail=str(e))
        else:
            entry["detail"] = getattr(found, source)
        sources.append(entry)
    info.update(image=found.image, actions=sources, note=found.note,
                gripper={"topic": f"topic {found.gripper_topic}", "joint": f"joint {options.gripper_joint}",
                         "action": f"GripperCommand goals on {found.gripper_action}"}.get(found.gripper or ""))
    return info


def format_bag_info(info: dict[str, Any]) -> str:
    lines = [f"bag          {info['path']} ({info['storage']})", "topics"]
    width = max((len(r["topic"]) for r in info["topics"]), default=10)
    for r in info["topics"]:
        rate = f"{r['rate_hz']:.1f} Hz" if r["rate_hz"] else "-"
        lines.append(f"  {r['topic']:<{width}} {r['type']:<34} {r['messages']:>7} msgs  {rate}")
    if info.get("problem"):
        lines.append(f"problem: {info['problem']}")
        return "\n".join(lines)
    lines.append(f"images: {info['image']}" + (f" (image topics: {', '.join(info['images'])})"
                                                 if len(info["images"]) > 1 else ""))
    usable = [s for s in info["actions"] if s["usable"]]
    if usable:
        first = usable[0]
        lines.append(f"actions: {first['source']} ({first['detail']})")
    else:
        lines.append(f"actions: none, the episode would be action-free ({info.get('note') or 'no usable source'})")
    for s in info["actions"]:
        if s is not (usable[0] if usable else None):
            lines.append(f"  also {s['source']}: {s['detail']}" if s["usable"] else
                         f"  not {s['source']}: {s['detail']}")
    lines.append(f"gripper: {info['gripper'] or 'none (no gripper command topic; see --gripper-joint)'}")
    lines.append(f"(sources in the order ingest tries them: {', '.join(ACTION_SOURCES[1:-1])})")
    return "\n".join(lines)
