"""The wheel that `pip install .` builds (the README's install) holds the whole package and works from site-packages.

CI and the developers install in editable mode, which reads the source tree, so a file left out of setup.py's package
data (the committed demo backbone, the model-card templates that live in `model_cards/` at the repository root) would
only show in a user's install. This builds the wheel from a copy of the repository's packaging inputs (no build
isolation: the test environment's setuptools, nothing downloaded), compares its file list with the source tree, then
installs it into a folder of its own and imports it there in a Python that cannot see the source tree.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest
from conftest import import_path_without_weaktr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGING_INPUTS = ("setup.py", "README.md", "LICENSE", "src", "model_cards")
CONSOLE_SCRIPTS = ("weaktr-train", "weaktr-predict", "weaktr-convert", "weaktr-app")

CHILD = textwrap.dedent(
    """
    import json
    import sys

    target, paths = sys.argv[1], json.loads(sys.argv[2])
    sys.path[:] = [target] + paths
    import safetensors.torch

    import weaktr_hf
    from weaktr_hf import hub, recipes

    assert weaktr_hf.__file__.startswith(target), weaktr_hf.__file__
    weights = safetensors.torch.load_file(recipes.DEMO_BACKBONE)
    cards = {name: len(hub.model_card_template(name)) for name in ("trained_card", "converted_cam", "converted_seg")}
    print(json.dumps({"file": weaktr_hf.__file__, "backbone_tensors": len(weights), "cards": cards}))
    """
)


def source_files(folder):
    found = set()
    for directory, subdirectories, files in os.walk(folder):
        subdirectories[:] = [name for name in subdirectories if name != "__pycache__" and ".egg-info" not in name]
        for name in files:
            if not name.endswith(".pyc"):
                found.add(os.path.relpath(os.path.join(directory, name), folder))
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    work = tmp_path_factory.mktemp("packaging")
    source = work / "source"
    source.mkdir()
    for name in PACKAGING_INPUTS:
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(path, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
               "-w", str(work / "dist"), str(source)]  # fmt: skip
    built = subprocess.run(command, capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = (work / "dist").glob("weaktr_hf-*.whl")
    return path


def test_wheel_holds_every_package_file_and_the_model_card_templates(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    package = {name[len("weaktr_hf/"):] for name in names if name.startswith("weaktr_hf/")}
    expected = source_files(os.path.join(ROOT, "src", "weaktr_hf"))
    expected |= {os.path.join("model_cards", name) for name in source_files(os.path.join(ROOT, "model_cards"))}
    assert "demo_backbone/model.safetensors" in expected and "model_cards/trained_card.md" in expected
    assert sorted(expected - package) == [], "files of the source tree missing from the wheel"
    assert sorted(package - expected) == [], "files in the wheel that the source tree does not have"
    for script in CONSOLE_SCRIPTS:
        assert f"\n{script} = " in "\n" + scripts, f"console script {script} missing from {entry_points}"


def test_installed_wheel_finds_its_demo_backbone_and_card_templates_without_the_source_tree(wheel, tmp_path):
    target = tmp_path / "site"
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
               str(wheel)]  # fmt: skip
    installed = subprocess.run(command, capture_output=True, text=True)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    # The parent's import path (for torch, transformers, ...) without the source tree, the wheel's folder first;
    # -I -S: no PYTHONPATH, no current directory, no .pth files (an editable install works through one).
    paths = import_path_without_weaktr()
    child = subprocess.run([sys.executable, "-I", "-S", "-c", CHILD, str(target), json.dumps(paths)],
                           capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert child.returncode == 0, child.stdout + child.stderr
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["file"].startswith(str(target))
    assert report["backbone_tensors"] > 0
    assert all(length > 0 for length in report["cards"].values()), report
