"""weaktr-app on a tiny run made here (random-weight models, a few synthetic 32-px images): what it shows is what
weaktr-predict and the run wrote; the page served by the CLI, driven through gradio_client and in headless chromium.

The browser test saves its screenshots in $WEAKTR_APP_SCREENSHOTS (default: the test's temporary folder)."""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from weaktr_hf import WeakTrForCAM, WeakTrForSemanticSegmentation, WeakTrImageProcessor
from weaktr_hf.app import (
    App,
    UploadError,
    cam_pseudo_label,
    cam_result,
    load_predictor,
    parse_args,
    per_class_rows,
    read_upload,
    run_dataset,
    sort_table,
    space_card_section,
)
from weaktr_hf.data import get_class_names
from weaktr_hf.labels import foreground_id2label, segmentation_id2label
from weaktr_hf.metrics import confusion_matrix, metrics_from_confusion_matrix
from weaktr_hf.pseudo_labels import write_pseudo_labels
from weaktr_hf.visualization import load_label_png, save_label_png
from conftest import WeakTrModelTester

ROOT = Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_VAL = 4, 3
# The run's dataset as the recipe records it: the app rebuilds it from this command line.
COMMAND = ("accelerate launch examples/train.py --synthetic_num_train 4 --synthetic_num_val 3 "
           "--synthetic_image_size 32 --backbone none")
THRESHOLD = 0.5


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder as the recipe writes it: cam/ and seg/ (random weights, every class scored present by a large
    classifier bias), pseudo-labels with and without CRF, predictions, all_results.json and cam_selection.json."""
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    results = {"command": COMMAND, "dataset": "synthetic", "pseudo_label_cam": "coarse_cam",
               "pseudo_label_threshold": THRESHOLD, "pseudo_label_choice_rule": "train_subset_cam_miou",
               "cam_best_epoch": 1, "cam_selection_rule": "train_subset_cam_miou", "cam_selection_miou": 0.25,
               "coarse_cam_miou": 0.25, "coarse_cam_threshold": 0.5, "seg_val_miou": 0.125}  # fmt: skip
    (run / "all_results.json").write_text(json.dumps(results))
    (run / "cam_selection.json").write_text(json.dumps({"cam": "coarse_cam", "epoch": 1, "miou": 0.25,
                                                       "per_threshold": {"0.3": 0.2, "0.5": 0.25},
                                                       "threshold": 0.5}))  # fmt: skip
    dataset, train, val = run_dataset(run)
    names = get_class_names(dataset[train])
    tester = WeakTrModelTester()
    cam_model = WeakTrForCAM(tester.get_config(id2label=foreground_id2label(names))).eval()
    segmenter = WeakTrForSemanticSegmentation(tester.get_segmentation_config(id2label=segmentation_id2label(names)))
    processor = WeakTrImageProcessor(size={"height": 32, "width": 32}, size_divisor=tester.patch_size)
    for model, name in ((segmenter.eval(), "seg"), (cam_model, "cam")):
        model.save_pretrained(run / name)
        processor.save_pretrained(run / name)
    write_pseudo_labels(cam_model, dataset[train], run / "pseudo_labels", scales=(1.0,), flip=False,
                        threshold=THRESHOLD, cam="coarse_cam", show_progress=False)  # fmt: skip
    write_pseudo_labels(cam_model, dataset[train], run / "pseudo_labels_nocrf", scales=(1.0,), flip=False,
                        threshold=THRESHOLD, cam="coarse_cam", show_progress=False)  # fmt: skip
    predictor = load_predictor(run / "seg")
    for row in dataset[val]:
        save_label_png(run / "predictions" / f"{row['id']}.png", predictor(row["image"])[0].astype(np.uint8))
    return run


def test_uploads_are_read_as_predict_reads_them_or_refused_with_a_reason(tmp_path):
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 65535, (20, 30), dtype=np.uint16)).save(tmp_path / "deep.png")
    PIL.Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).convert("CMYK").save(tmp_path / "print.jpg")
    PIL.Image.fromarray(rng.integers(0, 255, (400, 500, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    (tmp_path / "notes.png").write_text("not an image")

    image, notes = read_upload(tmp_path / "deep.png")
    assert image.mode in ("I;16", "I") and "16-bit" in notes[0]
    image, notes = read_upload(tmp_path / "print.jpg")
    assert image.mode == "CMYK" and "CMYK" in notes[0] and image.size == (30, 20)
    with pytest.raises(UploadError, match=r"notes\.png is not an image"):
        read_upload(tmp_path / "notes.png")
    with pytest.raises(UploadError, match=r"big\.png is 500 x 400 = 0\.2 megapixels, over .* limit of 0\.1"):
        read_upload(tmp_path / "big.png", max_pixels=100_000)


def test_try_a_model_gives_weaktr_predicts_masks(tiny_run):
    """The segmenter's mask and the step-1 pseudo-label at the run's threshold are weaktr-predict's, pixel for pixel,
    and the threshold the slider sets changes the pseudo-label."""
    app = App(run=tiny_run, class_threshold=0.0)
    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 52, 3), dtype=np.uint8))
    label_map, names = app.segment_image(image)
    expected = load_predictor(tiny_run / "seg")(image)[0]
    np.testing.assert_array_equal(label_map, expected)
    assert label_map.shape == (40, 52) and names[0] == "background"

    predictor = load_predictor(tiny_run / "cam", cam="coarse_cam", cam_threshold=THRESHOLD, class_threshold=0.0)
    expected, expected_cams = predictor(image)
    result = cam_result(app.cam_model, image)
    assert result.present == sorted(expected_cams) == [0, 1, 2, 3]
    np.testing.assert_array_equal(cam_pseudo_label(result, "coarse_cam", THRESHOLD), expected)
    for class_id, cam in expected_cams.items():
        np.testing.assert_allclose(result.cams["coarse_cam"][class_id], cam, atol=1e-6)
    low, high = (cam_pseudo_label(result, "coarse_cam", level) for level in (0.1, 0.9))
    assert (low > 0).mean() > (high > 0).mean()


def test_inspect_run_shows_what_the_run_wrote_and_sorts_worst_iou_first(tiny_run):
    app = App(run=tiny_run)
    names = app.run.class_names()
    table = app.run.image_table("train", len(names))
    assert [row[1] for row in table] == [f"synthetic_train_{i:06d}" for i in range(NUM_TRAIN)]
    train = app.run.split("train")
    for index, sample_id, _, iou in table:  # IoU of the PNG the run wrote against the ground truth
        written = load_label_png(tiny_run / "pseudo_labels" / f"{sample_id}.png")
        matrix = confusion_matrix(written, np.asarray(train[index]["semantic_mask"]), len(names))
        assert iou == pytest.approx(metrics_from_confusion_matrix(matrix)["mean_iou"])
    worst = sort_table(table, worst_first=True)
    assert [row[3] for row in worst] == sorted(row[3] for row in table)

    panels, summary = app.inspect_image("train", 0)
    captions = [caption for _, caption in panels]
    labelled = [names[label + 1] for label in train[0]["labels"]]
    assert captions[0] == "synthetic_train_000000"
    assert captions[1:-3] == [f"{name}: {cam}" for name in labelled
                              for cam in ("coarse CAM", "fine CAM", "cross-attention CAM")]  # fmt: skip
    assert captions[-3:] == ["pseudo-label (CRF)", "pseudo-label (no CRF)", "ground truth"]
    assert all(image.size == (256, 256) for image, _ in panels)  # 32-px images enlarged to stay readable
    assert "mIoU on this image" in summary
    panels, _ = app.inspect_image("val", 0)
    assert [caption for _, caption in panels][-2:] == ["prediction", "ground truth"]


def test_per_class_rows_put_the_fit_to_the_pseudo_labels_beside_the_val_iou():
    results = {"seg_val_per_class_iou": {"background": 0.9, "disc": 0.25}}
    assert per_class_rows(results) == [["background", "90.0"], ["disc", "25.0"]]
    results["seg_train_fit_per_class_iou"] = {"background": 0.85, "disc": 0.0}
    assert per_class_rows(results) == [["background", "90.0", "85.0"], ["disc", "25.0", "0.0"]]


def test_cli_needs_a_run_or_a_model_and_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args([])
    assert "give --run DIR (a training run) or --model FOLDER_OR_HUB_ID" in capsys.readouterr().err
    assert parse_args(["--run", "x"]).host == "127.0.0.1"  # localhost unless told otherwise
    with pytest.raises(FileNotFoundError, match="--run .*missing is not a folder"):
        App(run=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="holds neither seg/ nor cam/"):
        App(run=tmp_path)


def test_space_app_serves_a_model_given_by_id(tiny_run, monkeypatch):
    gradio = pytest.importorskip("gradio", reason="the Space needs the app extra: pip install 'weaktr-hf[app]'")
    monkeypatch.setenv("WEAKTR_MODEL", f"{tiny_run / 'seg'} {tiny_run / 'cam'}")
    spec = importlib.util.spec_from_file_location("weaktr_space", ROOT / "spaces" / "app.py")
    space = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(space)
    assert isinstance(space.demo, gradio.Blocks)
    api = {dependency["api_name"] for dependency in space.demo.config["dependencies"]}
    assert {"analyze", "segment", "cams"} <= api
    assert "requirements.txt" in os.listdir(ROOT / "spaces")


def test_space_card_section_links_the_space():
    section = space_card_section("someone/weaktr-demo")
    assert "(https://huggingface.co/spaces/someone/weaktr-demo)" in section and section.startswith("## Demo")
    with pytest.raises(ValueError, match="space_id must be 'owner/name'"):
        space_card_section("weaktr-demo")


# ---------------------------------------------------------------------------------------------------------------------
# The page, served by the CLI
# ---------------------------------------------------------------------------------------------------------------------


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_seconds(pid):
    """User + system CPU seconds a running process has used (Linux /proc), or None where /proc is absent."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """`weaktr-app --run RUN --port P` in a subprocess; yields its URL, the wall-clock and CPU seconds it took to
    answer, and its log."""
    pytest.importorskip("gradio", reason="weaktr-app needs the app extra: pip install 'weaktr-hf[app]'")
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    script = Path(sys.executable).with_name("weaktr-app")  # the console script, where this install has it
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "weaktr_hf.app"]
    with open(log, "w") as output:
        process = subprocess.Popen([*command, "--run", str(tiny_run), "--port", str(port), "--class_threshold", "0.0"],
                                   stdout=output, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    started = time.monotonic()
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() - started > 120:
                process.kill()
                pytest.fail(f"weaktr-app did not serve {url}:\n{log.read_text()}")
            time.sleep(0.5)
    yield url, {"wall": time.monotonic() - started, "cpu": cpu_seconds(process.pid)}, log
    process.terminate()
    process.wait(timeout=30)


def test_cli_serves_on_localhost_and_the_api_gives_overlay_shares_and_cams(server, tmp_path):
    gradio_client = pytest.importorskip("gradio_client", reason="needs gradio_client (the app extra)")
    url, seconds, log = server
    # Serving within 30 s: measured in CPU time where the OS tells it, since on a machine shared by several test runs
    # the wall clock mostly measures the others.
    assert (seconds["wall"] if seconds["cpu"] is None else seconds["cpu"]) < 30, seconds
    assert f"Running on local URL:  {url.rstrip('/')}" in log.read_text()  # bound to localhost only
    image_path = tmp_path / "photo.png"
    PIL.Image.fromarray(np.random.default_rng(2).integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(image_path)
    client = gradio_client.Client(url, verbose=False)

    overlay, shares = client.predict(gradio_client.handle_file(str(image_path)), api_name="/segment")
    with PIL.Image.open(overlay) as shown:
        assert shown.size == (44, 36)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3) and set(shares) <= {"background", "disc", "square",
                                                                                      "triangle", "cross"}

    scores, cams, pseudo, pseudo_shares = client.predict(gradio_client.handle_file(str(image_path)), "fine_cam", 0.5,
                                                         False, api_name="/cams")  # fmt: skip
    assert set(scores) == {"disc", "square", "triangle", "cross"}
    assert len(cams) == 3 * 4  # every class present (--class_threshold 0): coarse, fine and cross-attention CAMs
    assert [item["caption"] for item in cams[:3]] == ["disc: coarse CAM", "disc: fine CAM", "disc: cross-attention CAM"]
    with PIL.Image.open(pseudo) as shown:
        assert shown.size == (352, 288)  # 44 x 36 enlarged by 8 (nearest neighbour) to a side of at least 256
    assert sum(pseudo_shares.values()) == pytest.approx(1.0, abs=1e-3)

    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(Exception, match=r"notes\.png is not an image"):
        client.predict(gradio_client.handle_file(str(text)), api_name="/segment")


def chromium_path():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def background_share(legend_text):
    """The background's pixel share (%) in the text of a legend table ("background<TAB>98.4%")."""
    row = next(line for line in legend_text.splitlines() if "background" in line)
    return float(row.split()[-1].rstrip("%"))


def test_browser_upload_threshold_slider_and_run_browser(server, tiny_run, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
    browser_path = chromium_path()
    if browser_path is None:
        pytest.skip("needs a chromium browser on PATH (Debian: apt-get install chromium)")
    url, _, _ = server
    app = App(run=tiny_run)
    worst = sort_table(app.run.image_table("val", len(app.run.class_names())), worst_first=True)[0][1]
    shots = Path(os.environ.get("WEAKTR_APP_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    image_path = tmp_path / "photo.png"
    PIL.Image.fromarray(np.random.default_rng(3).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image_path)
    text_path = tmp_path / "notes.png"
    text_path.write_text("not an image")

    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=browser_path, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        page.goto(url)
        page.locator("#upload input[type=file]").set_input_files(str(text_path))  # a bad upload: a message, no crash
        page.locator("#notes", has_text="notes.png is not an image this app can read").wait_for(timeout=120_000)
        page.screenshot(path=str(shots / "bad_upload.png"), full_page=True)
        page.locator("#upload input[type=file]").set_input_files(str(image_path))
        page.locator("#seg-overlay img").wait_for(timeout=120_000)
        page.locator("#pseudo img").first.wait_for(timeout=120_000)
        legend = page.locator("#seg-legend")
        assert "background" in legend.inner_text() or "%" in legend.inner_text()

        def shown(selector):
            """The src of the picture in `selector` once it has loaded and nothing on the page is pending."""
            page.wait_for_function("(s) => { const i = document.querySelector(s + ' img'); return i && i.complete "
                                   "&& i.naturalWidth > 0 && !document.querySelector('.pending'); }", arg=selector,
                                   timeout=120_000)  # fmt: skip
            return page.locator(f"{selector} img").first.get_attribute("src")

        def pseudo_at(level):
            before = shown("#pseudo")
            number = page.locator("#threshold input[type=number]")
            number.fill(f"{level}")
            number.press("Enter")
            page.wait_for_function("([s, v]) => Math.abs(parseFloat(document.querySelector(s).value) - v) < 1e-6",
                                   arg=["#threshold input[type=range]", level], timeout=120_000)  # fmt: skip
            page.locator("#threshold input[type=range]").dispatch_event("pointerup")  # the slider's release event
            page.wait_for_function("([s, src]) => document.querySelector(s + ' img').getAttribute('src') !== src",
                                   arg=["#pseudo", before], timeout=120_000)  # fmt: skip
            picture = shown("#pseudo")
            page.screenshot(path=str(shots / f"try_threshold_{level}.png"), full_page=True)
            return page.locator("#pseudo-legend").inner_text(), picture

        (low, low_picture), (high, high_picture) = pseudo_at(0.1), pseudo_at(0.9)
        assert low_picture != high_picture
        assert background_share(high) > background_share(low)  # a higher background score: more background
        if importlib.util.find_spec("pydensecrf") is not None:  # the CRF box adds the refined pseudo-label
            page.get_by_label("also refine with the dense CRF").check()
            shown("#pseudo-crf")

        page.get_by_role("tab", name="Inspect run").click()
        page.get_by_label("worst IoU first").check()
        first = page.locator("#image-table [data-testid=cell-0-1]")  # row 0, column "id"
        page.wait_for_function("(id) => { const c = document.querySelector('#image-table [data-testid=cell-0-1]'); "
                               "return c && c.innerText.trim() === id; }", arg=worst, timeout=120_000)  # fmt: skip
        first.click()
        page.locator("#run-panels img").first.wait_for(timeout=120_000)
        shown("#run-panels")
        assert f"{worst} (val)" in page.locator("#image-summary").inner_text()
        assert "mIoU on this image" in page.locator("#image-summary").inner_text()
        page.screenshot(path=str(shots / "inspect_run.png"), full_page=True)
        browser.close()
    assert sorted(path.name for path in shots.glob("*.png")) == ["bad_upload.png", "inspect_run.png",
                                                                 "try_threshold_0.1.png", "try_threshold_0.9.png"]


def block_labels(page):
    """Each block's id on the page to its label (None for a block without one)."""
    return {block._id: getattr(block, "label", None) for block in page.blocks.values()}


def test_pseudo_label_controls_share_one_listener_so_the_last_change_writes_last(tiny_run):
    """The threshold, the CAM choice and the CRF box relabel through one listener (run in order, the last trigger's
    values last): with one listener each, an older relabel could finish after a newer one and overwrite its panels."""
    pytest.importorskip("gradio", reason="weaktr-app needs the app extra: pip install 'weaktr-hf[app]'")
    from weaktr_hf.app import build_app

    page = build_app(App(run=tiny_run))
    labels = block_labels(page)
    controls = {"background threshold", "CAM behind the pseudo-label", "also refine with the dense CRF"}
    relabels = [dependency for dependency in page.config["dependencies"]
                if {labels.get(target) for target, _ in dependency["targets"]} & controls]  # fmt: skip
    assert len(relabels) == 1, [dependency["targets"] for dependency in relabels]
    events = {(labels.get(target), event) for target, event in relabels[0]["targets"]}
    assert events == {("background threshold", "release"), ("CAM behind the pseudo-label", "change"),
                      ("also refine with the dense CRF", "change")}  # fmt: skip
    assert relabels[0]["trigger_mode"] == "always_last"


def test_every_listener_writing_the_pseudo_label_panels_runs_in_one_queue(tiny_run):
    """The upload, the class threshold and the relabel listener all write the pseudo-label panels: they share one
    concurrency group of one event at a time, so a relabel triggered while an upload or a class-threshold change is
    running waits for it and writes last. In parallel, the older event could finish last with stale controls."""
    pytest.importorskip("gradio", reason="weaktr-app needs the app extra: pip install 'weaktr-hf[app]'")
    from weaktr_hf.app import PANELS_QUEUE, build_app

    page = build_app(App(run=tiny_run))
    crf_panel = next(block for block in page.blocks.values() if getattr(block, "elem_id", None) == "pseudo-crf")
    writers = [function for function in page.fns.values() if crf_panel in function.outputs]
    labels = block_labels(page)
    triggers = {(labels.get(target), event) for function in writers for target, event in function.targets}
    assert {("background threshold", "release"), ("also refine with the dense CRF", "change")} <= triggers
    assert {event for _, event in triggers} >= {"upload", "release", "change"} and len(writers) == 3
    assert all(function.concurrency_id == PANELS_QUEUE and function.concurrency_limit == 1 for function in writers)
    others = [function for function in page.fns.values() if function not in writers]
    assert all(function.concurrency_id != PANELS_QUEUE for function in others)


class SlowStepOneApp(App):
    """The app with every step-1 pass (an upload or a class-threshold change) made 3 s longer, told to the test."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.passes_started, self.passes_done = [], []
        self.second_started, self.second_done = threading.Event(), threading.Event()

    def cam_note(self, result, names, class_threshold):
        self.passes_started.append(class_threshold)
        if len(self.passes_started) == 2:
            self.second_started.set()
        time.sleep(3.0)
        note = super().cam_note(result, names, class_threshold)
        self.passes_done.append(class_threshold)
        if len(self.passes_done) == 2:
            self.second_done.set()
        return note


def test_browser_a_crf_tick_during_a_class_threshold_change_is_shown_last(tiny_run, tmp_path):
    """In a real browser: the CRF box ticked while a class-threshold change is still computing CAMs. The relabel it
    triggers waits for that change (one queue) and writes the CRF panel last; run in parallel, it would finish first
    and the class-threshold change, started with the box unticked, would empty the panel again."""
    playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
    pytest.importorskip("pydensecrf", reason="the CRF panel needs pydensecrf (the crf extra)")
    browser_path = chromium_path()
    if browser_path is None:
        pytest.skip("needs a chromium browser on PATH (Debian: apt-get install chromium)")
    from weaktr_hf.app import build_app

    app = SlowStepOneApp(run=tiny_run)
    page_app = build_app(app)
    port = free_port()
    page_app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    image_path = tmp_path / "photo.png"
    PIL.Image.fromarray(np.random.default_rng(5).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image_path)
    try:
        with playwright.sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=browser_path, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1400})
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#upload input[type=file]").set_input_files(str(image_path))
            page.locator("#pseudo img").first.wait_for(timeout=120_000)
            assert app.passes_done and page.locator("#pseudo-crf img").count() == 0  # the box starts unticked
            number = page.locator("#class-threshold input[type=number]")
            number.fill("0.05")
            number.press("Enter")
            page.locator("#class-threshold input[type=range]").dispatch_event("pointerup")  # the slider's release
            assert app.second_started.wait(60), "the class-threshold change did not start a step-1 pass"
            page.get_by_label("also refine with the dense CRF").check()  # while that pass is still running
            assert app.second_done.wait(60)
            assert app.passes_started == app.passes_done  # the tick started no step-1 pass of its own
            page.wait_for_function("() => { const i = document.querySelector('#pseudo-crf img'); return i && "
                                   "i.complete && i.naturalWidth > 0 && !document.querySelector('.pending'); }",
                                   timeout=60_000)  # fmt: skip
            time.sleep(1.0)  # nothing left to overwrite it: the panel is still there a moment later
            assert page.locator("#pseudo-crf img").count() == 1
            browser.close()
    finally:
        page_app.close()
