"""Collect demonstrations the way users do on a real arm, with the simulated arm in its place:
``lapa_sim_arm`` and ``lapa_recorder`` run as their own processes, a scripted teleop drives the arm
over DDS, and the recorder writes one bag per episode. ``lapa data collect`` calls this. The nodes run
in a private ROS domain on this machine (lapa_policy_node.private_domain), not the shell's, unless
this process already runs rclpy.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import tempfile
from pathlib import Path


class CollectError(RuntimeError):
    """A node failed to start or an episode could not be recorded; the message says which."""


def _spawn(module: str, params: dict, log_dir: Path) -> tuple[subprocess.Popen, Path]:
    log = log_dir / f"{module.rsplit('.', 1)[-1]}.log"
    cmd = [sys.executable, "-m", module, "--ros-args"]
    for key, value in params.items():
        cmd += ["-p", f"{key}:={value}"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    return proc, log


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def collect(out_dir: str | Path, task_list: list[str], episodes_per_task: int, *, first_seed: int = 0,
            storage: str = "mcap", image_size: int = 128, control_rate: float = 10.0, camera_rate: float = 10.0,
            noise: float = 0.03, instruction_set: str = "train", progress: bool = True,
            log_dir: str | Path | None = None, combinations: str = "all") -> list:
    """Record episodes_per_task episodes of each task through ROS (seeds from first_seed on, only
    those of `combinations`, see lapa_sim.tasks.episode_seeds); returns CollectedEpisode records."""
    import rclpy
    from tqdm import tqdm

    from lapa_policy_node.private_domain import DomainError, private_ros_domain, watch_hint
    from lapa_policy_node.runtime import spinning
    from lapa_policy_node.scripted_teleop import ScriptedTeleop, TeleopError
    from lapa_sim.tasks import episode_seeds

    jobs = [(task, seed) for task in task_list
            for seed in episode_seeds(task, first_seed, episodes_per_task, combinations)]
    out_dir = Path(out_dir).resolve()
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="lapa-collect-"))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CollectError(f"cannot create {e.filename}: {e.strerror}") from None
    with contextlib.ExitStack() as isolation:
        try:  # never the user's domain: the teleop commands /servo_node/delta_twist_cmds like a real arm's
            domain = isolation.enter_context(private_ros_domain())
        except DomainError as e:
            raise CollectError(str(e)) from None
        if progress and not rclpy.ok():
            print(watch_hint(domain), file=sys.stderr)
        sim, sim_log = _spawn("lapa_policy_node.sim_arm_node", {
            "task": task_list[0], "seed": first_seed, "image_width": image_size, "image_height": image_size,
            "camera_rate": camera_rate}, log_dir)
        rec, rec_log = _spawn("lapa_policy_node.recorder_node", {
            "output_dir": str(out_dir), "storage": storage}, log_dir)
        own_context = not rclpy.ok()
        if own_context:
            rclpy.init()
        results = []
        try:
            with spinning(ScriptedTeleop()) as teleop:
                try:
                    teleop.wait_ready(timeout=60.0)
                except TeleopError as e:
                    for proc, log in ((sim, sim_log), (rec, rec_log)):
                        if proc.poll() is not None:
                            raise CollectError(f"{log.stem} exited ({proc.returncode}):\n"
                                               f"{log.read_text()[-2000:]}") from None
                    raise CollectError(str(e)) from None
                bar = tqdm(jobs, desc="recording episodes through ROS", unit="ep", disable=not progress)
                for task, seed in bar:
                    try:
                        results.append(teleop.run_episode(task, seed, control_rate=control_rate, noise=noise,
                                                          instruction_set=instruction_set))
                    except TeleopError as e:
                        raise CollectError(f"episode {task}/{seed}: {e} (logs in {log_dir})") from None
                    bar.set_postfix(success=f"{sum(r.success for r in results) / len(results):.0%}", refresh=False)
                teleop.stop_arm()
        finally:
            if own_context:
                rclpy.try_shutdown()
            _stop(rec)
            _stop(sim)
        return results

