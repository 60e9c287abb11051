"""The embedded simulator: a MuJoCo Panda arm on a tabletop, driven like MoveIt Servo.

Headless rendering uses EGL unless the user chose another MuJoCo GL backend; this must be set
before mujoco is first imported, which is why it lives here.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
