"""The job path's device operations and host waits, counted on the CPU (bench/launch_count.py): no layer
waits for the device, and a layer issues a few dozen operations, not one per row or per tau."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
launch_count = pytest.importorskip("launch_count")
pytest.importorskip("triton", reason="counting the Triton backend needs triton (in the dev extra)")


def _per_layer(backend: str = "triton") -> dict:
    return launch_count.per_layer(launch_count.count(1, 3, backend), launch_count.count(3, 3, backend), 2)


@pytest.fixture(scope="module")
def counted() -> dict:
    return _per_layer()


def test_no_layer_waits_for_the_device_and_each_issues_few_operations(counted):
    layer = counted
    waits = {w: v for w, v in layer["waits"].items() if v}
    assert waits == {}, f"host waits inside a layer: {waits}"
    flowray_ops = launch_count._total(layer["ops"], False)
    launches = launch_count._total(layer["launches"], None)
    forward = launch_count._total(layer["ops"], True)
    assert forward > 10, "the forward pass's own operations are counted apart"
    assert 5 <= launches <= 8, layer["launches"]  # sign GEMM, head outputs, tiles, two lists, finish, block node
    # the torch operations around them (the attention rows, the sort of |y|, the routes' three per layer)
    assert flowray_ops + launches <= 32, sorted(layer["ops"].items(), key=lambda kv: -kv[1])[:12]


def test_the_counter_sees_a_wait_and_extra_work_inside_a_layer(monkeypatch, counted):
    """A layer that reads a device value and runs two more operations shows both, per layer, at its line."""
    import flowray.stats as stats

    before = counted
    real = stats.add_layer

    def add_layer(kernel, state, *args, **kwargs):
        real(kernel, state, *args, **kwargs)
        return int(state.hit_count.max() + 1)  # two operations (max, add), one wait

    monkeypatch.setattr(stats, "add_layer", add_layer)
    after = _per_layer()
    waits = {w: v for w, v in after["waits"].items() if v}
    assert list(waits.values()) == [1.0], waits
    (line,) = waits  # attributed to flowray's line that called it
    assert line.startswith("flowray/stats.py:") and line.endswith(" consume")
    assert after["ops"][line] == before["ops"].get(line, 0) + 2


def test_the_script_prints_its_counts(tmp_path, capsys, monkeypatch):
    out = tmp_path / "counts.json"
    assert launch_count.main(["--layers", "1,2", "--heads", "2", "--top", "3", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# job path, backend triton, 2 heads, counted at 1 and 2 layers\nper layer: forward pass ")
    assert text.splitlines()[1].endswith("; host waits 0")
    import json

    result = json.loads(out.read_text())
    assert result["per_layer"]["waits"] == 0 and result["per_layer"]["triton_launches"] > 0
    with pytest.raises(SystemExit) as exc:
        launch_count.main(["--layers", "3,2"])
    assert exc.value.code == 2
    assert "--layers takes two depths, smaller first, e.g. 2,6; got '3,2'" in capsys.readouterr().err
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SystemExit) as exc:
        launch_count.main(["--backend", "triton"])
    assert exc.value.code == 2
    assert "through Triton's interpreter: leave TRITON_INTERPRET unset or set it to 1" in capsys.readouterr().err
