"""Saved folders load with `trust_remote_code=True` in a Python where weaktr_hf cannot be imported: the models through
the Auto classes (`AutoModel` too, on a step-1 folder), the image processor, and the image-segmentation pipeline,
which gives the masks of the pipeline with the package installed, with no prompt and no warning.

The loading runs in a subprocess started with `-I -S`: no PYTHONPATH, no current directory, and no `.pth` files, so
neither `PYTHONPATH=src` nor an editable install (`pip install -e .`, which works through `.pth` files) reaches it.
It gets the parent's import path minus every entry that holds a `weaktr_hf` source tree, and a finder that refuses
the name outright in case the package was installed into site-packages itself.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import pipeline

from conftest import import_path_without_weaktr
from weaktr_hf import WeakTrForCAM, WeakTrForSemanticSegmentation
from weaktr_hf.image_processing_weaktr import evaluation_processor

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

    import builtins

    import numpy as np
    import PIL.Image
    import torch
    from transformers import (
        AutoImageProcessor,
        AutoModel,
        AutoModelForImageClassification,
        AutoModelForSemanticSegmentation,
        pipeline,
    )


    def refuse_prompt(*args):
        raise SystemExit(f"prompted for input: {args}")


    builtins.input = refuse_prompt
    inputs = torch.load(workdir + "/inputs.pt")
    cam = AutoModelForImageClassification.from_pretrained(workdir + "/cam", trust_remote_code=True)
    segmenter = AutoModelForSemanticSegmentation.from_pretrained(workdir + "/seg", trust_remote_code=True)
    with torch.no_grad():
        cam_outputs = cam(inputs["cam"])
        seg_outputs = segmenter(inputs["seg"])
    results = {name: value for name, value in cam_outputs.items()}
    results["segmentation_logits"] = seg_outputs.logits
    encoder = AutoModel.from_pretrained(workdir + "/cam", trust_remote_code=True)
    with torch.no_grad():
        results["cam_encoder"] = encoder(inputs["cam"]).last_hidden_state
    processor = AutoImageProcessor.from_pretrained(workdir + "/seg", trust_remote_code=True)
    segments = pipeline("image-segmentation", model=workdir + "/seg", trust_remote_code=True)(
        PIL.Image.open(workdir + "/image.png")
    )
    results["pipeline"] = {segment["label"]: torch.from_numpy(np.array(segment["mask"])) for segment in segments}
    torch.save(results, workdir + "/remote_outputs.pt")
    modules = [type(cam).__module__, type(segmenter).__module__, type(processor).__module__]
    print(json.dumps(modules + ["weaktr_hf" in sys.modules]))
    """
)


def test_saved_models_load_with_trust_remote_code_without_the_package(tester, tmp_path):
    cam = WeakTrForCAM(tester.get_config()).eval()
    segmenter = WeakTrForSemanticSegmentation(tester.get_segmentation_config()).eval()
    cam.save_pretrained(tmp_path / "cam")
    segmenter.save_pretrained(tmp_path / "seg")
    # Saved after the model, as training and conversion do: the processor names itself in config.json's auto_map.
    evaluation_processor(32, 24, base_size=40, patch_size=8).save_pretrained(tmp_path / "seg")
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (75, 100, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
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
    *modules, imported = json.loads(completed.stdout.strip().splitlines()[-1])
    assert all(module.startswith("transformers_modules.") for module in modules), modules
    assert imported is False
    assert "video" not in completed.stderr.lower() and "not supported" not in completed.stderr, completed.stderr

    remote = torch.load(tmp_path / "remote_outputs.pt")
    with torch.no_grad():
        local_cam, local_seg = cam(inputs["cam"]), segmenter(inputs["seg"])
    for name, value in local_cam.items():
        torch.testing.assert_close(remote[name], value, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(remote["segmentation_logits"], local_seg.logits, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(remote["cam_encoder"], cam.weaktr(inputs["cam"]).last_hidden_state, rtol=0, atol=0)
    local_segments = pipeline("image-segmentation", model=str(tmp_path / "seg"))(image)
    assert set(remote["pipeline"]) == {segment["label"] for segment in local_segments}
    for segment in local_segments:
        assert torch.equal(remote["pipeline"][segment["label"]], torch.from_numpy(np.array(segment["mask"])))
