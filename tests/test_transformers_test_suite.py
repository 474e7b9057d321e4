"""The step that brings in transformers' common tests: when the sdist cannot be had, the common test modules are
skipped and pytest's summary says why, so they never go missing silently."""

import os
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
COMMON_MODULES = ("tests/test_modeling_weaktr_common.py", "tests/test_image_processing_weaktr_common.py")


def test_without_a_package_index_the_common_tests_skip_with_the_reason_printed(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "WEAKTR_TRANSFORMERS_TESTS_CACHE": str(cache), "PIP_NO_INDEX": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", *COMMON_MODULES, "-q", "-p", "no:cacheprovider"],
        cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    output = completed.stdout + completed.stderr
    # 5 is pytest's "no tests collected": both modules skip at collection; in the whole suite the run passes.
    assert completed.returncode == 5, output[-3000:]
    assert "2 skipped" in output
    assert "transformers' common test suite: SKIPPED" in output
    for kind in ("model", "image-processor"):
        assert f"transformers' common {kind} tests not run: `pip download --no-binary :all: --no-deps" in output
    assert not list(cache.glob("*/transformers_tests"))  # nothing half-built is left to be taken for a suite
