"""A ROS 2 discovery domain of a job's own, on this machine only.

Batch jobs that run the simulated arm as ROS nodes (``lapa data collect``, ``lapa eval policy
--ros``, and ``lapa demo``, which runs both) use the topic names a real arm uses: the scripted teleop
and the policy server publish twists on ``/servo_node/delta_twist_cmds``, the simulated arm
publishes ``/joint_states``. Run in the user's domain, on a workstation next to a robot, those
twists would reach the real MoveIt Servo. So these jobs run their nodes in a domain no other lapa
job on the machine holds (a lock file per domain), with discovery limited to localhost, whatever
ROS_DOMAIN_ID the shell sets:

    with private_ros_domain() as domain:
        ...spawn nodes (they inherit the environment), rclpy.init(), talk to them...

A process that already has rclpy running chose its domain itself (a test, a user's program that
calls ``collect`` or ``evaluate_over_ros``): its nodes and the job's must meet there, so the
environment is left as it is. ``lapa sim`` and ``lapa run`` are for people to watch and drive the
nodes; they run in the user's domain, as ``ros2 launch`` would.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import tempfile
from pathlib import Path
from typing import Iterator

# Fast DDS ports are 7400 + 250 * domain + small offsets: domains 215-232 sit above Linux's ephemeral
# port range (32768-60999), where 102-214 would not, and away from the small ids people give robots
PRIVATE_DOMAINS = range(215, 233)
# what makes a participant look beyond this machine: cleared inside the private domain. Besides ROS's
# own settings, a DDS configuration file (Fast DDS XML profiles or environment file, Cyclone's URI) can
# name peers, transports or a discovery server of its own: the private domain's nodes use DDS defaults
_ISOLATION = {"ROS_DOMAIN_ID": None, "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "ROS_STATIC_PEERS": None,
              "ROS_DISCOVERY_SERVER": None, "ROS_LOCALHOST_ONLY": None,
              "FASTRTPS_DEFAULT_PROFILES_FILE": None, "FASTDDS_DEFAULT_PROFILES_FILE": None,
              "RMW_FASTRTPS_USE_QOS_FROM_XML": None, "FASTDDS_ENVIRONMENT_FILE": None, "CYCLONEDDS_URI": None}
LOCK_DIR = Path(tempfile.gettempdir()) / "lapa-ros-domains"


class DomainError(RuntimeError):
    """No private domain is free: as many lapa jobs as PRIVATE_DOMAINS hold one on this machine."""


def _try_lock(domain: int) -> int | None:
    """A file descriptor holding domain's lock, or None if another process holds it."""
    try:
        if not LOCK_DIR.is_dir():  # shared by every user's jobs (sticky, like /tmp): the umask would narrow it
            LOCK_DIR.mkdir(exist_ok=True)
            with contextlib.suppress(OSError):
                LOCK_DIR.chmod(0o1777)
        fd = os.open(LOCK_DIR / f"domain-{domain}.lock", os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError:  # another user's lock file we may not open: treat the domain as taken
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def claim_domain(domains: range) -> tuple[int, int]:
    """A domain of `domains` that no other process on this machine holds, and the file descriptor
    holding its lock (until it is closed or the process ends). Raises DomainError when all are held."""
    candidates = list(domains)
    random.shuffle(candidates)  # jobs starting together rarely try the same one first
    for domain in candidates:
        fd = _try_lock(domain)
        if fd is not None:
            return domain, fd
    raise DomainError(f"no free private ROS domain on this machine: {len(domains)} lapa jobs already "
                      f"hold domains {domains.start}-{domains.stop - 1} (locks in {LOCK_DIR})")


def watch_hint(domain: int) -> str:
    """The line a job prints so that people can watch its nodes (ros2 topic echo, rviz2)."""
    return (f"nodes in a private ROS domain, this machine only (to watch: ROS_DOMAIN_ID={domain} "
            f"ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST)")


@contextlib.contextmanager
def private_ros_domain() -> Iterator[int]:
    """Set this process's environment to a free private domain, localhost discovery, for the block
    (child processes started inside inherit it); restore it after. Yields the domain id."""
    import rclpy

    if rclpy.ok():  # this process's nodes already live in a domain: the job's must join them there
        yield rclpy.get_default_context().get_domain_id()
        return
    domain, fd = claim_domain(PRIVATE_DOMAINS)
    saved = {key: os.environ.get(key) for key in _ISOLATION}
    try:
        for key, value in {**_ISOLATION, "ROS_DOMAIN_ID": str(domain)}.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield domain
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        os.close(fd)  # releases the lock
