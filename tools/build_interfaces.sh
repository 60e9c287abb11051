#!/usr/bin/env bash
# Build an interface package (default lapa_interfaces, ros2_ws/src/lapa_interfaces) and install
# it INTO a Python venv that holds the ROS 2 Kilted PyPI wheels (ros-kilted-*), so that
# `from lapa_interfaces.action import FollowInstruction` works in that venv.
#
# Usage:
#   tools/build_interfaces.sh [--force] [--clean] [-v] [--package DIR] [VENV]
#
#   VENV      venv to build against and install into; default: $VIRTUAL_ENV
#   --package DIR  the interface package to build (its package.xml names it), e.g.
#             tools/interfaces/tf2_msgs (the upstream definitions the PyPI wheels lack)
#   --force   rebuild even if the installed package is up to date
#   --clean   uninstall lapa_interfaces from the venv (files, stamp, build dir) and exit
#   -v        stream the cmake output instead of writing it to a log file
#
# The build is skipped (in well under a second) when the stamp file
# $VENV/var/lapa_interfaces/stamp matches a hash of the interface sources
# (*.action, *.msg, *.srv, CMakeLists.txt, package.xml), this script, the
# venv's pyvenv.cfg and the versions of the rosidl generator wheels, and all
# files it lists as installed still exist.
#
# Recipe (see ROS2_FROM_PYPI notes): AMENT_PREFIX_PATH=$VENV; rewrite the wheel
# builder's /opt/python/cpXY-cpXY include paths in the venv's cmake files to this
# venv's Python and numpy include dirs; cmake configure/build outside the source
# tree; install with CMAKE_INSTALL_PREFIX=$VENV. Installing into the venv lets the
# wheels' start-up hook (ros_wheels_bootstrapper, which puts $VENV/lib on
# LD_LIBRARY_PATH) find the typesupport libraries: no environment setup is needed
# at run time.
#
# On a real ROS 2 install use colcon instead: see ros2_ws/README.md.
set -euo pipefail

die() { printf 'build_interfaces: error: %s\n' "$*" >&2; exit 1; }
info() { printf 'build_interfaces: %s\n' "$*"; }

FORCE=0
CLEAN=0
VERBOSE=0
VENV_ARG=""
PKG_ARG=""
while [ $# -gt 0 ]; do
    case "$1" in
        --force) FORCE=1 ;;
        --package) shift; [ $# -gt 0 ] || die "--package needs a directory"; PKG_ARG=$1 ;;
        --clean) CLEAN=1 ;;
        -v|--verbose) VERBOSE=1 ;;
        -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option: $1 (see --help)" ;;
        *) [ -z "$VENV_ARG" ] || die "more than one venv given: '$VENV_ARG' and '$1'"
           VENV_ARG=$1 ;;
    esac
    shift
done

SCRIPT_PATH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
REPO_ROOT=$(cd "$(dirname "$SCRIPT_PATH")/.." && pwd)
if [ -n "$PKG_ARG" ]; then
    [ -f "$PKG_ARG/package.xml" ] || die "interface package not found: $PKG_ARG (no package.xml)"
    PKG_SRC=$(cd "$PKG_ARG" && pwd)
    PKG_NAME=$(sed -n 's:.*<name>\([^<]*\)</name>.*:\1:p' "$PKG_SRC/package.xml" | head -n1)
    [ -n "$PKG_NAME" ] || die "$PKG_SRC/package.xml has no <name>"
else
    PKG_NAME=lapa_interfaces
    PKG_SRC=$REPO_ROOT/ros2_ws/src/$PKG_NAME
fi

# --- the venv ----------------------------------------------------------------
VENV=${VENV_ARG:-${VIRTUAL_ENV:-}}
[ -n "$VENV" ] || die "no venv: activate one (. .venv/bin/activate) or pass its path: $0 /path/to/venv"
[ -d "$VENV" ] || die "venv not found: $VENV"
VENV=$(cd "$VENV" && pwd -P)
PY=$VENV/bin/python
[ -x "$PY" ] || die "$VENV is not a venv (no bin/python)"
[ -f "$PKG_SRC/package.xml" ] || die "interface package not found: $PKG_SRC"

STATE_DIR=$VENV/var/$PKG_NAME
STAMP=$STATE_DIR/stamp
BUILD_DIR=$STATE_DIR/build
LOG=$STATE_DIR/build.log

# Serialise concurrent runs against the same venv (e.g. parallel test workers).
mkdir -p "$STATE_DIR"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$STATE_DIR/lock"
    flock 9
fi

# Remove the files listed in the stamp (installed by the previous build).
uninstall_previous() {
    [ -f "$STAMP" ] || return 0
    local f n=0
    while IFS= read -r f; do
        case "$f" in
            "$VENV"/*) if [ -f "$f" ] || [ -L "$f" ]; then rm -f -- "$f"; n=$((n + 1)); fi ;;
        esac
    done < <(tail -n +2 "$STAMP")
    # drop directories left empty (only those that belonged to this package)
    local d
    for d in "$VENV/share/$PKG_NAME" "$VENV/include/$PKG_NAME" \
             "$VENV"/lib/python3*/site-packages/"$PKG_NAME" \
             "$VENV"/lib/python3*/site-packages/"$PKG_NAME"-*.egg-info; do
        [ -d "$d" ] || continue
        find "$d" -depth -type d -name __pycache__ -exec rm -rf {} +
        find "$d" -depth -type d -empty -delete
    done
    rm -f -- "$STAMP"
    info "removed $n previously installed files"
}

if [ "$CLEAN" = 1 ]; then
    uninstall_previous
    rm -rf -- "$BUILD_DIR" "$LOG"
    info "uninstalled $PKG_NAME from $VENV"
    exit 0
fi

# --- up to date? (no python, no cmake: must stay fast) -----------------------
compute_hash() {
    {
        (cd "$PKG_SRC" && find . -type f \( -name '*.action' -o -name '*.msg' -o -name '*.srv' \
            -o -name CMakeLists.txt -o -name package.xml \) -not -path './build/*' | LC_ALL=C sort \
            | xargs -d '\n' sha256sum)
        sha256sum < "$SCRIPT_PATH"
        cat "$VENV/pyvenv.cfg" 2>/dev/null || true
        local p
        for p in rosidl_generator_py rosidl_generator_c rosidl_runtime_c rosidl_typesupport_c \
                 rosidl_typesupport_fastrtps_c rosidl_typesupport_introspection_c; do
            grep -m1 -o '<version>[^<]*</version>' "$VENV/share/$p/package.xml" 2>/dev/null \
                || echo "$p missing"
        done
    } | sha256sum | cut -d' ' -f1
}

HASH=$(compute_hash)

if [ "$FORCE" = 0 ] && [ -f "$STAMP" ] && [ "$(head -n1 "$STAMP")" = "hash $HASH" ]; then
    missing=""
    while IFS= read -r f; do
        if [ ! -e "$f" ]; then missing=$f; break; fi
    done < <(tail -n +2 "$STAMP")
    if [ -z "$missing" ]; then
        info "$PKG_NAME is up to date in $VENV"
        exit 0
    fi
    info "installed file missing ($missing): rebuilding"
fi

# --- prerequisites (clear messages instead of cryptic cmake failures) -------
command -v cmake >/dev/null 2>&1 || die "cmake not found: apt-get install cmake g++ make"
GENERATOR=()
if ! command -v make >/dev/null 2>&1; then
    command -v ninja >/dev/null 2>&1 || die "neither make nor ninja found: apt-get install make"
    GENERATOR=(-G Ninja)
fi
command -v g++ >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1 \
    || die "C++ compiler not found: apt-get install g++"
command -v gcc >/dev/null 2>&1 || command -v cc >/dev/null 2>&1 \
    || die "C compiler not found: apt-get install gcc"
CMAKE_VERSION=$(cmake --version | sed -n '1s/[^0-9]*\([0-9][0-9.]*\).*/\1/p')
case "$CMAKE_VERSION" in
    [0-2].*|3.[0-9]|3.[0-9].*|3.1[0-9]|3.1[0-9].*) die "cmake >= 3.20 needed, found $CMAKE_VERSION" ;;
esac

WHEELS_HINT="pip install ros-kilted-rclpy ros-kilted-rmw-fastrtps-cpp ros-kilted-std-msgs ros-kilted-action-msgs \
ros-kilted-ament-cmake ros-kilted-rosidl-default-generators ros-kilted-ament-package \
ros-kilted-ament-cmake-include-directories ros-kilted-rosidl-core-generators ros-kilted-ament-cmake-ros-core"
for p in ament_cmake ament_cmake_core rosidl_default_generators rosidl_default_runtime \
         rosidl_generator_py std_msgs action_msgs; do
    [ -d "$VENV/share/$p/cmake" ] || [ -f "$VENV/share/$p/package.xml" ] \
        || die "ROS 2 wheel for '$p' is missing in $VENV: $WHEELS_HINT"
done

# Python/numpy include dirs of this venv (also checks that numpy is importable).
PY_INFO=$("$PY" -c '
import sys, sysconfig
print("%d.%d" % sys.version_info[:2])
print(sysconfig.get_paths()["include"])
try:
    import numpy
    print(numpy.get_include())
except ImportError:
    print("noNumPy")
') || die "could not run $PY"
mapfile -t _info <<<"$PY_INFO"
PY_VER=${_info[0]}; PY_INC=${_info[1]}; NP_INC=${_info[2]}
[ "$NP_INC" != noNumPy ] || die "numpy is not installed in $VENV: pip install numpy"
[ -f "$PY_INC/Python.h" ] || die "Python headers not found ($PY_INC/Python.h): install the python$PY_VER development headers (e.g. apt-get install python$PY_VER-dev)"
[ -d "$NP_INC/numpy" ] || die "numpy headers not found in $NP_INC"

# --- patch the wheel builder's hard-coded include paths ----------------------
# e.g. share/std_msgs/cmake/export_std_msgs__rosidl_generator_pyExport.cmake has
#   INTERFACE_INCLUDE_DIRECTORIES "/opt/python/cp311-cp311/include/python3.11;
#       /opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include"
CMAKE_DIRS=()
for d in "$VENV/share" "$VENV/lib/cmake" "$VENV/lib64/cmake"; do [ -d "$d" ] && CMAKE_DIRS+=("$d"); done
mapfile -t TO_PATCH < <(grep -rlF --include='*.cmake' '/opt/python/' "${CMAKE_DIRS[@]}" 2>/dev/null || true)
if [ "${#TO_PATCH[@]}" -gt 0 ]; then
    info "rewriting /opt/python/... include paths in ${#TO_PATCH[@]} cmake files"
    "$PY" - "$PY_INC" "$NP_INC" "${TO_PATCH[@]}" <<'EOF'
import re, sys
py_inc, np_inc, files = sys.argv[1], sys.argv[2], sys.argv[3:]
np_re = re.compile(r"/opt/python/cp3\d+-cp3\d+t?/lib/python3\.\d+t?/site-packages/numpy/(?:_core|core)/include")
py_re = re.compile(r"/opt/python/cp3\d+-cp3\d+t?/include/python3\.\d+t?")
for f in files:
    with open(f) as fh:
        text = fh.read()
    new = py_re.sub(lambda m: py_inc, np_re.sub(lambda m: np_inc, text))
    if new != text:
        with open(f, "w") as fh:
            fh.write(new)
    if "/opt/python/" in new:
        print("build_interfaces: warning: unhandled /opt/python path left in " + f, file=sys.stderr)
EOF
fi

# --- build and install -------------------------------------------------------
export VIRTUAL_ENV=$VENV
export PATH=$VENV/bin:$PATH
export AMENT_PREFIX_PATH=$VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}
export CMAKE_PREFIX_PATH=$VENV${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}
unset PYTHONHOME
JOBS=$(nproc 2>/dev/null || echo 4)

run() {
    if [ "$VERBOSE" = 1 ]; then
        "$@"
    elif ! "$@" >>"$LOG" 2>&1; then
        echo "----- last lines of $LOG -----" >&2
        tail -n 40 "$LOG" >&2
        die "'$*' failed; full log: $LOG"
    fi
}

rm -rf -- "$BUILD_DIR"
: > "$LOG"
info "building $PKG_NAME into $VENV (log: $LOG)"
start=$SECONDS
run cmake "${GENERATOR[@]}" -S "$PKG_SRC" -B "$BUILD_DIR" \
    -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_INSTALL_PREFIX="$VENV" \
    -DCMAKE_PREFIX_PATH="$VENV" \
    -DPython3_EXECUTABLE="$PY" \
    -DBUILD_TESTING=OFF
run cmake --build "$BUILD_DIR" --parallel "$JOBS"
uninstall_previous
run cmake --install "$BUILD_DIR"

# --- check that it imports and its C typesupport loads, then stamp ---------
(cd / && "$PY" - "$PKG_NAME" "$PKG_SRC" <<'EOF') || die "$PKG_NAME was installed but does not import; see $LOG"
import importlib, pathlib, sys
name, src = sys.argv[1], pathlib.Path(sys.argv[2])
for kind in ("msg", "srv", "action"):  # every interface imports, with its C typesupport
    for f in sorted((src / kind).glob(f"*.{kind}")):
        t = getattr(importlib.import_module(f"{name}.{kind}"), f.stem)
        t.__class__.__import_type_support__()
EOF

{ echo "hash $HASH"; sed '/^$/d' "$BUILD_DIR/install_manifest.txt" | LC_ALL=C sort -u; } > "$STAMP.tmp"
mv -f "$STAMP.tmp" "$STAMP"
info "installed $PKG_NAME into $VENV ($(($(wc -l < "$STAMP") - 1)) files, $((SECONDS - start)) s)"
