"""Saved folders load with `trust_remote_code=True` in a Python where weaktr_hf cannot be imported.

The loading runs in a subprocess started with `-I -S`: no PYTHONPATH, no current directory, and no `.pth` files, so
neither `PYTHONPATH=src` nor an editable install (`pip install -e .`, which works through `.pth` files) reaches it.
It gets the parent's import path minus every entry that holds a `weaktr_hf` source tree, and a finder that refuses
the name outright in case the package was installed into site-packages itself.
"""

import json
import os
import site
import subprocess
import sys
import textwrap

import pytest
import torch

from weaktr_hf import WeakTrForCAM, WeakTrForSemanticSegmentation

pytestmark = pytest.mark.usefixtures("single_thread")

CHILD = textwrap.dedent(
    """
    import importlib.abc
    import importlib.util
    import json
    import sys

    workdir = sys.argv[1]
    with open(workdir + "/paths.json") as file:
        sys.path.extend(json.load(file))


    class HideWeakTr(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "weaktr_hf" or name.startswith("weaktr_hf."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
            return None


    # Neither the sources (src/, editable install) nor an editable-install finder may be reachable; only a regular
    # install inside site-packages could be found, and the finder below refuses that one.
    assert not any("__editable__" in str(getattr(finder, "__module__", "")) for finder in sys.meta_path), sys.meta_path
    spec = importlib.util.find_spec("weaktr_hf")
    assert spec is None or "-packages" in spec.origin, spec.origin
    sys.meta_path.insert(0, HideWeakTr())
    try:
        import weaktr_hf  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        sys.exit("weaktr_hf is importable in the remote-code subprocess")

    import torch
    from transformers import AutoModelForImageClassification, AutoModelForSemanticSegmentation

    inputs = torch.load(workdir + "/inputs.pt")
    cam = AutoModelForImageClassification.from_pretrained(workdir + "/cam", trust_remote_code=True)
    segmenter = AutoModelForSemanticSegmentation.from_pretrained(workdir + "/seg", trust_remote_code=True)
    with torch.no_grad():
        cam_outputs = cam(inputs["cam"])
        seg_outputs = segmenter(inputs["seg"])
    results = {name: value for name, value in cam_outputs.items()}
    results["segmentation_logits"] = seg_outputs.logits
    torch.save(results, workdir + "/remote_outputs.pt")
    print(json.dumps([type(cam).__module__, type(segmenter).__module__, "weaktr_hf" in sys.modules]))
    """
)


def import_path_without_weaktr():
    """The parent's import path minus the current directory, `src` checkouts, editable-install hooks, and Hugging
    Face module caches (another cache's `transformers_modules` would shadow the subprocess's own)."""
    kept = []
    for entry in sys.path:
        if not entry or not os.path.isdir(entry) or "__editable__" in entry:
            continue
        if os.path.isdir(os.path.join(entry, "transformers_modules")):
            continue
        if os.path.isdir(os.path.join(entry, "weaktr_hf")) and entry not in site.getsitepackages():
            continue
        kept.append(os.path.abspath(entry))
    return kept


def test_saved_models_load_with_trust_remote_code_without_the_package(tester, tmp_path):
    cam = WeakTrForCAM(tester.get_config()).eval()
    segmenter = WeakTrForSemanticSegmentation(tester.get_segmentation_config()).eval()
    cam.save_pretrained(tmp_path / "cam")
    segmenter.save_pretrained(tmp_path / "seg")
    inputs = {"cam": tester.prepare_pixel_values(2, 24, 40), "seg": tester.prepare_pixel_values(1, 27, 35)}
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "paths.json").write_text(json.dumps(import_path_without_weaktr()))
    (tmp_path / "child.py").write_text(CHILD)

    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    completed = subprocess.run(
        [sys.executable, "-I", "-S", str(tmp_path / "child.py"), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    cam_module, seg_module, imported = json.loads(completed.stdout.strip().splitlines()[-1])
    assert cam_module.startswith("transformers_modules.") and seg_module.startswith("transformers_modules.")
    assert imported is False

    remote = torch.load(tmp_path / "remote_outputs.pt")
    with torch.no_grad():
        local_cam, local_seg = cam(inputs["cam"]), segmenter(inputs["seg"])
    for name, value in local_cam.items():
        torch.testing.assert_close(remote[name], value, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(remote["segmentation_logits"], local_seg.logits, rtol=0, atol=0)
