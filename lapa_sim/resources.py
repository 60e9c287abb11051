"""Where the package's data files (urdf/, config/, launch/) are: the source tree when running
from a checkout or an editable install, else the ament share directory of a colcon install."""

from __future__ import annotations

from pathlib import Path

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def share_file(*parts: str) -> Path:
    path = _SOURCE_ROOT.joinpath(*parts)
    if path.exists():
        return path
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory("lapa_ros")).joinpath(*parts)
    except Exception:  # not installed with colcon either: report the source path, which is missing
        return path
