"""The flowray command shortens GNU OpenMP's busy-wait before torch loads, and keeps a value the user set."""

from __future__ import annotations

import os
import subprocess
import sys

from flowray.threads import SHORT_SPIN, SPIN_VARIABLE, prefer_short_spin

# a fresh process: whether flowray.cli.main set the variable while torch was still unloaded, and its value
PROBE = (
    "import sys, flowray.cli as c\n"
    "assert 'torch' not in sys.modules, 'importing the CLI loaded torch before main() could set the spin'\n"
    "c.prefer_short_spin = (lambda real: (lambda: print('effective', real())))(c.prefer_short_spin)\n"
    "try:\n"
    "    c.main(['--help'])\n"
    "except SystemExit:\n"
    "    pass\n"
    "import os\n"
    "print('value', os.environ.get('GOMP_SPINCOUNT'))\n"
)


def _probe(env: dict) -> str:
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout


def test_the_setting_is_a_default_that_a_users_value_overrides():
    env = {}
    prefer_short_spin(env)
    assert env == {SPIN_VARIABLE: SHORT_SPIN}
    env = {SPIN_VARIABLE: "300000"}
    prefer_short_spin(env)
    assert env == {SPIN_VARIABLE: "300000"}


def test_the_command_sets_it_before_torch_loads():
    env = {k: v for k, v in os.environ.items() if k != SPIN_VARIABLE}
    out = _probe(env)
    assert "effective True" in out and f"value {SHORT_SPIN}" in out, out
    out = _probe({**env, SPIN_VARIABLE: "5"})
    assert "effective True" in out and "value 5" in out, out
