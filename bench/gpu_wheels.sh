#!/usr/bin/env bash
# The wheels of the Python packages bench/gpu_session.sh needs and the GPU machines' image lacks (nltk, for
# the actor step, and what nltk needs that the image lacks), fetched here into .whl/ at the checkout's root
# (git ignores it), for the image's Python 3.12 on x86-64. Carry .whl with the call that runs the session;
# gpu_session.sh installs them into a folder of its own.
#
#     bash bench/gpu_wheels.sh [DIR]      # default: .whl/ beside bench/
#
# Versions: constraints.txt's pins (what the tests passed with), else the newest. PIP names another pip.
set -u
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:-$here/../.whl}
pip=${PIP:-python3 -m pip}
packages="nltk defusedxml"  # the image has nltk's other needs (click, joblib, regex, tqdm)
mkdir -p "$dir" || exit 2
for name in $packages; do
    pin=$(grep -i -m1 "^$name==" "$here/../constraints.txt" 2>/dev/null)
    $pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$dir" "${pin:-$name}" || {
        echo "gpu_wheels.sh: could not download ${pin:-$name} (is a package registry reachable?)" >&2
        exit 1
    }
done
ls "$dir"
