"""transformers' own common test suite (`ModelTesterMixin`, `ImageProcessingTestMixin`), from the sdist of the
installed transformers version.

`load()` downloads the sdist once with pip (`pip download --no-binary :all: --no-deps transformers==VERSION`), keeps
its `tests/` folder in the user cache (`$WEAKTR_TRANSFORMERS_TESTS_CACHE`, else `$XDG_CACHE_HOME/weaktr-hf` or
`~/.cache/weaktr-hf`, one folder per version) and makes it importable as the package `transformers_tests`. When the
sdist cannot be had (no index, a development build of transformers...) it raises `SuiteUnavailable` with the reason;
the test modules turn that into a skip, and `conftest.py` prints the reason in pytest's summary.

The sdist ships `tests/*.py` only. Three modules the common files import are not in it and are written here:
- `exporters/test_export.py`: `ExportTesterMixin`, the base of `ModelTesterMixin` holding the torch.export / ONNX /
  ExecuTorch export tests. An empty class stands in, so those tests are not run.
- `generation/test_utils.py`: `GenerationTesterMixin`, only used in an `issubclass` check (our models do not generate).
- `utils/fetch_hub_objects_for_ci.py`: `url_to_local_path`, the lookup of pre-fetched Hub fixtures; none of the tests
  run here loads one (those that would, the backend-equivalence tests, skip for a single-backend processor).
"""

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

PACKAGE = "transformers_tests"
LAYOUT = 2  # bump when the stand-ins below change, so that cached copies are rebuilt
PIP_TIMEOUT_S = 600

STAND_INS = {
    "exporters/__init__.py": "",
    "exporters/test_export.py": '''"""Stand-in: the sdist has no tests/exporters, so no export test runs."""


class ExportTesterMixin:
    pass
''',
    "generation/__init__.py": "",
    "generation/test_utils.py": '''"""Stand-in: the sdist has no tests/generation; only the class is used."""


class GenerationTesterMixin:
    pass
''',
}

FIXTURES_MODULE = '''"""Stand-in for transformers' utils/fetch_hub_objects_for_ci.py, which the sdist lacks: a Hub fixture's
pre-fetched copy in the working directory, else its URL. The tests run here load no Hub fixture."""

import os


def url_to_local_path(url, return_url_if_not_found=True):
    name = url.rsplit("/", 1)[-1]
    return url if return_url_if_not_found and not os.path.exists(name) else name
'''


class SuiteUnavailable(RuntimeError):
    """transformers' common tests cannot be had; the message says why."""


def cache_root() -> Path:
    if os.environ.get("WEAKTR_TRANSFORMERS_TESTS_CACHE"):
        return Path(os.environ["WEAKTR_TRANSFORMERS_TESTS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "weaktr-hf"


def suite_dir(version: str = transformers.__version__) -> Path:
    return cache_root() / f"transformers-{version}-tests-v{LAYOUT}"


def download_sdist(version: str, destination: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--disable-pip-version-check",
        "--retries", "1", "--timeout", "30", f"transformers=={version}", "-d", str(destination),
    ]  # fmt: skip
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise SuiteUnavailable(f"`{' '.join(command[2:])}` ran over {PIP_TIMEOUT_S} s") from None
    archives = sorted(destination.glob("transformers-*.tar.gz"))
    if completed.returncode != 0 or not archives:
        detail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
        raise SuiteUnavailable(
            f"`pip download --no-binary :all: --no-deps transformers=={version}` failed (exit "
            f"{completed.returncode}): {' | '.join(detail) or 'no output'}"
        )
    return archives[0]


def build_suite(version: str, target: Path):
    """Download the sdist and lay out `target/transformers_tests` (+ stand-ins), atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as work:
        work = Path(work)
        archive = download_sdist(version, work / "sdist")
        layout = work / "suite"
        prefix = f"transformers-{version}/tests/"
        with tarfile.open(archive) as sdist:
            members = [m for m in sdist.getmembers() if m.name.startswith(prefix) and m.isfile()]
            if not any(m.name == prefix + "test_modeling_common.py" for m in members):
                raise SuiteUnavailable(f"the transformers {version} sdist has no tests/test_modeling_common.py")
            for member in members:
                relative = member.name[len(prefix) :]
                path = layout / PACKAGE / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(sdist.extractfile(member).read())
        (layout / PACKAGE / "__init__.py").touch()
        for relative, text in STAND_INS.items():
            path = layout / PACKAGE / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        (layout / "utils").mkdir()
        (layout / "utils" / "fetch_hub_objects_for_ci.py").write_text(FIXTURES_MODULE)
        try:
            layout.rename(target)
        except OSError:
            if not (target / PACKAGE / "test_modeling_common.py").exists():  # not another run's finished copy
                raise


_failure = None  # the first SuiteUnavailable of this process, so the other test modules do not download again


def ensure_suite() -> Path:
    """The cached suite's folder (on `sys.path`), building it first if needed."""
    global _failure
    if _failure is not None:
        raise _failure
    try:
        version = transformers.__version__
        if "dev" in version or "+" in version:
            raise SuiteUnavailable(f"transformers {version} is a development build; PyPI has no sdist of it")
        try:
            importlib.import_module("parameterized")
        except ImportError:
            raise SuiteUnavailable("the `parameterized` package is missing: pip install -e '.[dev]'") from None
        target = suite_dir(version)
        if not (target / PACKAGE / "test_modeling_common.py").exists():
            if target.exists():
                shutil.rmtree(target)  # an incomplete copy from an older layout
            build_suite(version, target)
    except SuiteUnavailable as error:
        _failure = error
        raise
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    return target


def load(module: str):
    """Import `transformers_tests.<module>` from the cached suite."""
    ensure_suite()
    return importlib.import_module(f"{PACKAGE}.{module}")
