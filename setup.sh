#!/usr/bin/env bash
# One-command install: creates .venv (Python 3.11) with ROS 2 Kilted from PyPI wheels, torch (CPU),
# the rest of requirements.txt and this project (editable), then builds lapa_interfaces into it.
# Idempotent: a second run only checks that nothing changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT=$PWD
VENV=$ROOT/.venv
PYTHON=${PYTHON:-python3.11}

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null || die "$PYTHON not found; install Python 3.11 (or set PYTHON=/path/to/python3.11)"
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null \
  || die "$PYTHON is not Python 3.11; the ROS 2 Kilted wheels are built for CPython 3.11"

# System tools: cmake and a C++ compiler build lapa_interfaces; EGL renders the simulator headless.
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v g++ >/dev/null || missing+=(g++)
ldconfig -p 2>/dev/null | grep -q 'libEGL.so.1' || missing+=(libegl1 libgl1 libegl-mesa0)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing system packages: ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    die "missing system packages: ${missing[*]} (e.g. sudo apt-get install ${missing[*]})"
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

stamp=$VENV/.lapa-install.sha256
want=$(cat requirements.txt setup.py setup.cfg package.xml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing requirements (a few minutes the first time)"
  # (the sed drops pip's noise about find-links folders of this machine's pip config that do not exist)
  "$VENV/bin/python" -m pip install --quiet -r requirements.txt 2>&1 | sed '/is ignored: it is neither a file nor a directory/d'
  "$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 | sed '/is ignored: it is neither/d'
  echo "$want" >"$stamp"
else
  say "requirements up to date"
fi

VIRTUAL_ENV=$VENV PATH=$VENV/bin:$PATH bash tools/build_interfaces.sh "$VENV"
# message packages the PyPI wheels lack (tf2_msgs, moveit_msgs, control_msgs), with only the definitions we use,
# field for field as upstream, so the nodes talk to real /tf, MoveIt Servo and gripper controllers (a ROS
# install has them in full and never builds these)
for pkg in tools/interfaces/*/; do
  VIRTUAL_ENV=$VENV PATH=$VENV/bin:$PATH bash tools/build_interfaces.sh --package "$pkg" "$VENV"
done
say "done: activate with 'source .venv/bin/activate', then try 'lapa --help'"
