"""What a flowray user must (not) read in a job's output: shared by the tests that run jobs."""

from __future__ import annotations

DROPPED = ("Token authentication is enabled", "Progress bars disabled", "will not allow it to scale up")
EXPLAINED = "has constructor arguments in the object store"


def assert_quiet(output: str) -> None:
    """flowray's progress lines are there; Ray's harmless notices are not, or come after flowray's explanation."""
    assert "flowray.pipeline.job: map: " in output, output[-3000:]
    for notice in DROPPED:
        assert notice not in output, f"Ray's notice {notice!r} reached the user:\n{output[-3000:]}"
    if EXPLAINED in output:  # printed by Ray's C++ core worker: flowray says beforehand why it is harmless
        assert output.index("ray#53727)") < output.index(EXPLAINED)
