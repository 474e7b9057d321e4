"""The paper presets resolve to the authors' recipe (hustvl/WeakTr at 3457ad3), and the pieces behind them: lr
schedules, evaluation geometry, the evaluation CRF, the decoder ensemble, step-1 selection, labels files."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from timm.scheduler import CosineLRScheduler

import weaktr_hf.crf
import weaktr_hf.inference
from weaktr_hf import WeakTrForSemanticSegmentation
from weaktr_hf.data import load_wsss_dataset
from weaktr_hf.evaluation import evaluate_cams, evaluate_segmentation
from weaktr_hf.inference import segment, segment_pass_size
from conftest import recipe_api


# The authors' values, read from their code (file:line in examples/train.py next to each preset value).
AUTHORS = {
    "voc12-deit-s": {
        "patch_size": 16, "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
        "intermediate_size": 1536, "drop_path_rate": 0.1, "aaf_reduction": 8, "aaf_feat_reduction": 8,
        "cam_image_size": 224, "cam_augment": "timm", "total_train_batch_size": 64,
        "learning_rate": 6e-4 * 64 / 512, "weight_decay": 0.03, "decay_all_parameters": True,
        "num_train_epochs": 60, "warmup_epochs": 5, "warmup_learning_rate": 1e-6, "min_learning_rate": 1e-5,
        "cam_lr_schedule": "epoch", "cam_head_init": "pytorch", "cam_eval_split": "train", "cam_eval_samples": None,
        "cam_eval_scales": [1.0], "cam_eval_flip": True, "cam_selection_early_stop": True,
        "cam_selection_thresholds": [round(0.40 + 0.01 * i, 2) for i in range(20)], "cam_threshold": 0.43,
        "cam_scales": [1.0, 1.2], "cam_flip": True, "pseudo_label_cam": "fine_cam", "crf": "voc12",
        "train_split": "train_aug", "seg_init": "backbone", "seg_image_size": 480, "seg_crop_size": 480,
        "seg_base_size": 520, "seg_max_ratio": 8, "seg_antialias": False,
        "seg_image_mean": [123.68 / 255, 116.28 / 255, 103.53 / 255],
        "seg_image_std": [58.4 / 255, 57.12 / 255, 57.38 / 255], "seg_total_train_batch_size": 4,
        "seg_learning_rate": 1e-4, "seg_encoder_lr_scale": 0.1, "seg_min_learning_rate": 1e-5, "seg_nesterov": True,
        "seg_momentum": 0.9, "seg_num_train_epochs": 100, "decoder_hidden_size": 384, "decoder_num_hidden_layers": 2,
        "decoder_num_attention_heads": 6, "decoder_intermediate_size": 1536, "decoder_hidden_dropout_prob": 0.1,
        "clip_start_value": 1.2, "clip_window_size": 120, "window_size": 480, "window_stride": 320,
        "eval_scales": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75], "eval_base_size": 520, "eval_min_size": 480,
        "eval_crf": "voc12", "eval_aux_weight": 0.8, "coco_id_layout": "contiguous",
        "pseudo_label_eval_split": "train", "layer_norm_eps": 1e-6, "seg_layer_norm_eps": 1e-5, "cam_drop_last": True,
        # Unset: the model's initializer_range, 0.02, as Segmenter's trunc_normal_(cls_emb, std=0.02) in the
        # authors' decoder (OR/model/decoder.py:74).
        "decoder_class_embedding_std": None,
        # Per-pixel cross-entropy (ignore_index), clipped, then a plain mean over the map: OR/engine.py:21, 40, 47-48
        # (weight_reduce_loss, OR/data/utils.py:80), clipping in OR/model/decoder.py:119.
        "loss_average": "all_pixels",
    },
}  # fmt: skip
AUTHORS["coco14-deit-s"] = {
    **AUTHORS["voc12-deit-s"], "learning_rate": 2e-4 * 64 / 512, "train_split": "train", "coco_id_layout": "raw",
    "cam_eval_split": None, "cam_eval_samples": 1250, "cam_eval_order": "annotation_file", "cam_threshold": 0.42,
    "cam_scales": [1.0, 0.8, 1.2], "crf": "coco14", "eval_crf": "coco14", "pseudo_label_eval_split": None,
}  # fmt: skip


@pytest.fixture(scope="module")
def script():
    return recipe_api()


# A paper preset is checked as a real run is: it needs a dataset and initial weights, even to print its recipe.
PAPER_RUN = ["--dataset_path", "/data/VOCdevkit/VOC2012", "--backbone", "deit_small_patch16_224"]


def print_config(script, capsys, *argv):
    assert script.main([*argv, *PAPER_RUN, "--print_config"]) is None
    return json.loads(capsys.readouterr().out)


def authors_step1_lrs(peak, epochs=60):
    """lr of each epoch as the authors' loop gets it: timm's scheduler, `step(epoch)` after each epoch."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = CosineLRScheduler(optimizer, t_initial=epochs, lr_min=1e-5, warmup_t=5, warmup_lr_init=1e-6)
    lrs = []
    for epoch in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(epoch)
    return lrs


def authors_poly(base, fraction, min_lr=1e-5, power=0.9):
    return (base - min_lr) * (1 - fraction) ** power + min_lr


@pytest.mark.parametrize("preset", sorted(AUTHORS))
def test_paper_presets_resolve_to_the_authors_recipe(script, capsys, preset):
    config = print_config(script, capsys, "--preset", preset)
    for key, expected in AUTHORS[preset].items():
        assert config[key] == pytest.approx(expected), key
    assert config["per_device_train_batch_size"] == 64 and config["seg_per_device_train_batch_size"] == 4
    step1 = config["lr_schedule"]["step1_lr_at_epoch_start"]
    reference = authors_step1_lrs(AUTHORS[preset]["learning_rate"])
    assert set(step1) == {"0", "1", "5", "6", "30", "59"}
    for epoch, lr in step1.items():
        assert lr == pytest.approx(reference[int(epoch)], rel=1e-9), epoch
    assert step1["0"] == step1["1"] == pytest.approx(1e-6)  # the one-epoch lag of step(epoch) after the epoch
    for point, fraction in (("0%", 0.0), ("50%", 0.5), ("100%", 1.0)):
        lrs = config["lr_schedule"]["step2_lr"][point]
        assert lrs["decoder"] == pytest.approx(authors_poly(1e-4, fraction), rel=1e-9)
        assert lrs["encoder"] == pytest.approx(0.1 * authors_poly(1e-4, fraction), rel=1e-9)


def test_flags_override_presets_and_global_batches_split_over_processes(script, capsys):
    config = print_config(script, capsys, "--preset", "voc12-deit-s", "--seg_num_train_epochs", "64",
                          "--seg_per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2")  # fmt: skip
    assert config["seg_num_train_epochs"] == 64
    assert config["seg_total_train_batch_size"] == 4  # per-device 2 x 1 process x 2 accumulation steps
    assert config["per_device_train_batch_size"] == 32  # 64 over 2 accumulation steps
    args = script.parse_args(["--preset", "voc12-deit-s", *PAPER_RUN, "--print_config"])
    assert script.resolve_batch_sizes(args, 4).per_device_train_batch_size == 16
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        script.resolve_batch_sizes(script.parse_args(["--preset", "voc12-deit-s", *PAPER_RUN, "--print_config"]), 3)


def test_paper_preset_without_pretrained_weights_is_a_clear_error(script, capsys, tmp_path):
    with pytest.raises(script.RecipeError, match="--allow_random_init"):
        script.parse_args(["--preset", "voc12-deit-s", "--dataset_path", str(tmp_path)])
    args = script.parse_args(["--preset", "voc12-deit-s", "--dataset_path", str(tmp_path), "--allow_random_init"])
    assert args.seg_init == "scratch"
    args = script.parse_args(["--preset", "voc12-deit-s", "--dataset_path", str(tmp_path), "--stage", "eval"])
    assert args.stage == "eval"  # evaluation needs no initial weights


def test_step1_scheduler_follows_timm_per_epoch_on_updates():
    """`UpdateStepCosineScheduler` stepped once per update equals timm's scheduler stepped after each epoch."""
    from weaktr_hf.training import UpdateStepCosineScheduler

    steps_per_epoch, epochs, peak = 3, 8, 1e-3
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = UpdateStepCosineScheduler(
        optimizer, num_training_steps=epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch, num_epochs=epochs,
        warmup_epochs=2, warmup_lr_init=1e-6, lr_min=1e-5, per="epoch",
    )  # fmt: skip
    reference_optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    reference = CosineLRScheduler(reference_optimizer, t_initial=epochs, lr_min=1e-5, warmup_t=2, warmup_lr_init=1e-6)
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            assert optimizer.param_groups[0]["lr"] == reference_optimizer.param_groups[0]["lr"]
            scheduler.step()
        reference.step(epoch)
    # Resuming mid-epoch restores the lr of that epoch.
    state = scheduler.state_dict()
    resumed_optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    resumed = UpdateStepCosineScheduler(
        resumed_optimizer, num_training_steps=epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch,
        num_epochs=epochs, warmup_epochs=2, warmup_lr_init=1e-6, lr_min=1e-5, per="epoch",
    )  # fmt: skip
    resumed.load_state_dict(state)
    assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_step_mode_equals_transformers_cosine_with_warmup():
    from transformers import get_cosine_schedule_with_warmup

    from weaktr_hf.training import UpdateStepCosineScheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    scheduler = UpdateStepCosineScheduler(optimizer, num_training_steps=20, steps_per_epoch=4, num_epochs=5,
                                          warmup_epochs=1, per="step")  # fmt: skip
    reference_optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    reference = get_cosine_schedule_with_warmup(reference_optimizer, 4, 20)
    for _ in range(20):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(reference_optimizer.param_groups[0]["lr"], abs=1e-12)
        scheduler.step()
        reference_optimizer.step()
        reference.step()


def test_eval_geometry_matches_the_authors_short_sides(monkeypatch):
    """A 500 x 375 image: passes with short sides 480, 480, 520, 650, 780, 910 (base 520, min 480)."""
    sizes = [segment_pass_size((375, 500), scale, 520, 480) for scale in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)]
    final = [second or first for first, second in sizes]
    assert [min(size) for size in final] == [480, 480, 520, 650, 780, 910]
    assert sizes[0] == ((260, 347), (480, 640))  # mmcv: int(500 * 260 / 375 + 0.5); then int(500 / 375 * 480)
    assert final[3] == (650, 867)
    assert segment_pass_size((375, 500), 0.5) == ((188, 250), None)  # without a base size: the native image
    # `segment` runs the model on exactly those inputs.
    seen = []

    def record(model, pixel_values, window_size, window_stride, batch_size, aux=False):
        seen.append(tuple(pixel_values.shape[-2:]))
        logits = torch.zeros(1, 3, *pixel_values.shape[-2:])
        return (logits, logits) if aux else logits

    monkeypatch.setattr(weaktr_hf.inference, "_sliding_window_logits", record)
    model = torch.nn.Linear(1, 1)
    model.config = None
    probabilities = segment(model, torch.zeros(1, 3, 375, 500), scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True,
                            base_size=520, min_size=480)  # fmt: skip
    assert seen == [size for size in final for _ in range(2)]
    assert probabilities.shape == (1, 3, 375, 500)


def test_demo_eval_geometry_is_the_authors_scaled_to_its_base(script):
    """The demo evaluates as the authors do with 520 -> 64: the same ratios, passes below 59 (= 480 x 64 / 520)
    upsampled, so a 64-px image gives short sides 59, 59, 64, 80, 96, 112 (the authors' 480 ... 910 x 64 / 520)."""
    args = script.parse_args([])
    assert args.eval_scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) and args.eval_base_size is None
    assert args.eval_min_size == round(480 * args.seg_base_size / 520)
    sides = [min(second or first) for first, second in (
        segment_pass_size((64, 64), scale, args.eval_base_size, args.eval_min_size) for scale in args.eval_scales)]
    authors = [min(second or first) for first, second in (
        segment_pass_size((375, 500), scale, 520, 480) for scale in args.eval_scales)]
    assert sides == [59, 59, 64, 80, 96, 112] == [round(side * 64 / 520) for side in authors]


def test_demo_clipping_starts_at_the_papers_fraction_of_the_chance_loss(script):
    """The paper clips from a mean loss of 1.2 with 21 classes (ln 21 at chance); the demo, 4 classes + background,
    from the same fraction of ln 5, and the VOC preset keeps the paper's 1.2."""
    demo, voc = script.parse_args([]), script.parse_args(["--preset", "voc12-deit-s", *PAPER_RUN, "--print_config"])
    assert voc.clip_start_value == 1.2 and demo.synthetic_num_classes == 4
    assert demo.clip_start_value == pytest.approx(1.2 * np.log(demo.synthetic_num_classes + 1) / np.log(21), abs=5e-3)


def test_demo_step2_keeps_every_class_the_paper_presets_keep_the_authors_step2(script):
    """The demo's step-2 choices (docs/step2-diagnosis.md) are the demo's only: wide class embeddings and a
    square-root class-balanced loss; a paper preset keeps the authors' 0.02 embeddings and pixel mean."""
    demo = script.parse_args([])
    assert (demo.decoder_class_embedding_std, demo.loss_average, demo.loss_class_balance) == (1.0, "classes", 0.5)
    for preset in ("voc12-deit-s", "coco14-deit-s", "own-deit-s", "voc12-dinov3-s"):
        paper = script.parse_args(["--preset", preset, *PAPER_RUN, "--print_config"])
        assert (paper.decoder_class_embedding_std, paper.loss_average) == (None, "all_pixels"), preset
    config = script.seg_model_config(demo, {0: "background", 1: "disc"})
    assert (config.decoder_class_embedding_std, config.loss_average, config.loss_class_balance) == (1.0, "classes", 0.5)


def tiny_segmenter(tester, layers=2):
    config = tester.get_segmentation_config(decoder_num_hidden_layers=layers)
    return WeakTrForSemanticSegmentation(config).eval()


def test_ensemble_is_aux_weight_times_block1_probabilities_plus_final(tester):
    """0.8 x softmax(decoded after decoder block 1) + softmax(final), computed by hand from the modules."""
    torch.manual_seed(0)
    model = tiny_segmenter(tester)
    pixel_values = tester.prepare_pixel_values(batch_size=1)
    height, width = pixel_values.shape[-2:]
    decoder, patch = model.decoder, model.config.patch_size
    with torch.no_grad():
        tokens = model.weaktr(pixel_values).last_hidden_state[:, 1:]
        hidden = torch.cat([decoder.proj_dec(tokens), decoder.cls_emb], dim=1)

        def head(states):
            states = decoder.decoder_norm(states)
            patches = F.normalize(states[:, : -decoder.num_labels] @ decoder.proj_patch, dim=-1)
            classes = F.normalize(states[:, -decoder.num_labels :] @ decoder.proj_classes, dim=-1)
            masks = decoder.mask_norm(patches @ classes.transpose(1, 2)).transpose(1, 2)
            masks = masks.reshape(1, -1, height // patch, width // patch)
            return F.interpolate(masks, size=(height, width), mode="bilinear", align_corners=False).softmax(1)

        after_block1 = decoder.blocks[0](hidden)[0]
        final = decoder.blocks[1](after_block1)[0]
        expected = 0.8 * head(after_block1) + head(final)
    probabilities = segment(model, pixel_values, window_size=max(height, width), window_stride=8, aux_weight=0.8)
    torch.testing.assert_close(probabilities * 1.8, expected, rtol=1e-5, atol=1e-6)
    plain = segment(model, pixel_values, window_size=max(height, width), window_stride=8)
    torch.testing.assert_close(plain, head(final), rtol=1e-5, atol=1e-6)
    outputs = model(pixel_values)
    assert outputs.aux_logits is None  # off by default


def segmentation_dataset(num_images=2, size=(24, 32), num_labels=3, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(num_images):
        mask = rng.integers(0, num_labels, size, dtype=np.uint8)
        rows.append({"id": f"img{index}", "image": PIL.Image.fromarray(rng.integers(0, 255, (*size, 3), np.uint8)),
                     "labels": sorted({int(v) - 1 for v in np.unique(mask) if v}),
                     "semantic_mask": PIL.Image.fromarray(mask)})  # fmt: skip
    return Dataset.from_list(rows)


@pytest.mark.parametrize("preset", sorted(AUTHORS))
def test_eval_crf_gets_the_preset_parameters_and_only_present_classes(script, tester, monkeypatch, preset):
    calls = []

    def recording_crf(image, probs, **parameters):
        calls.append((np.asarray(probs).copy(), parameters))
        return np.asarray(probs)

    monkeypatch.setattr(weaktr_hf.crf, "crf_refine_probs", recording_crf)
    crf = script.EVAL_CRFS[AUTHORS[preset]["eval_crf"]]
    authors = {"voc12": (3, 3, 83, 5, 3), "coco14": (1, 3, 67, 3, 4)}[AUTHORS[preset]["eval_crf"]]
    assert (crf["gaussian_sxy"], crf["gaussian_compat"], crf["bilateral_sxy"], crf["bilateral_srgb"],
            crf["bilateral_compat"], crf["iterations"]) == (*authors, 10)  # fmt: skip
    model = tiny_segmenter(tester)
    dataset = segmentation_dataset(num_labels=model.config.num_labels)
    predictions = []
    scores = evaluate_segmentation(
        model, dataset, window_size=16, window_stride=8, crf=dict(crf), aux_weight=0.8, show_progress=False,
        on_prediction=lambda index, example, prediction: predictions.append(prediction),
    )  # fmt: skip
    assert len(calls) == len(dataset) and "crf" in scores and 0 <= scores["crf"]["mean_iou"] <= 1
    final_only = evaluate_segmentation(model, dataset, window_size=16, window_stride=8, show_progress=False)
    assert scores["final_only"]["mean_iou"] == pytest.approx(final_only["mean_iou"])
    for (probs, parameters), example, prediction in zip(calls, dataset, predictions):
        assert parameters == dict(crf)
        pixel_values = script.WeakTrImageProcessor(do_resize=False, do_pad=False)(
            example["image"], return_tensors="pt"
        ).pixel_values
        full = segment(model, pixel_values, 16, 8, aux_weight=0.8)[0].numpy() * 1.8
        keys = np.unique(full.argmax(0))
        np.testing.assert_allclose(probs, full[keys], rtol=1e-5, atol=1e-6)  # present classes only, unnormalised
        np.testing.assert_array_equal(prediction, keys[probs.argmax(0)])


def test_selection_sweep_stops_at_the_first_threshold_that_does_not_improve():
    from weaktr_hf.evaluation import _early_stopped_best

    assert _early_stopped_best([0.50, 0.52, 0.51, 0.60]) == 1  # the authors stop at 0.51, never see 0.60
    assert _early_stopped_best([0.50, 0.50]) == 0
    assert _early_stopped_best([0.1, 0.2, 0.3]) == 2


def test_cam_selection_with_flip_and_early_stop_runs_on_a_tiny_model(tester):
    from weaktr_hf import WeakTrForCAM

    model = WeakTrForCAM(tester.get_config()).eval()
    dataset = segmentation_dataset(num_labels=model.config.num_labels + 1)
    thresholds = tuple(round(0.40 + 0.01 * i, 2) for i in range(20))
    scores = evaluate_cams(model, dataset, cams=("fine_cam",), thresholds=thresholds, flip=True, early_stop=True,
                           show_progress=False)["fine_cam"]  # fmt: skip
    sweep = [scores["per_threshold"][t] for t in thresholds]
    best = thresholds.index(scores["threshold"])
    assert all(later > earlier for earlier, later in zip(sweep[:best], sweep[1 : best + 1]))
    assert best == len(sweep) - 1 or not sweep[best + 1] > sweep[best]


def test_selection_subset_is_voc_train_or_the_coco_annotation_order(script, tmp_path):
    rows = lambda ids: [{"id": i, "labels": [0]} for i in ids]  # noqa: E731
    dataset = DatasetDict({"train_aug": Dataset.from_list(rows(["a", "b", "c", "d"])),
                           "train": Dataset.from_list(rows(["c", "a"]))})  # fmt: skip
    args = script.parse_args(["--print_config", "--train_split", "train_aug", "--cam_eval_split", "train"])
    assert list(script.cam_selection_subset(args, dataset)["id"]) == ["c", "a"]
    args = script.parse_args(["--print_config", "--train_split", "train_aug", "--cam_eval_samples", "2"])
    assert list(script.cam_selection_subset(args, dataset)["id"]) == ["a", "b"]
    (tmp_path / "ids.txt").write_text("d\nb\n")
    ids_file = str(tmp_path / "ids.txt")
    args = script.parse_args(["--print_config", "--train_split", "train_aug", "--cam_eval_ids", ids_file])
    assert list(script.cam_selection_subset(args, dataset)["id"]) == ["d", "b"]
    (tmp_path / "bad.txt").write_text("zzz\n")
    args.cam_eval_ids = str(tmp_path / "bad.txt")
    with pytest.raises(ValueError, match="not in the dataset"):
        script.cam_selection_subset(args, dataset)
    # COCO: the annotation file lists images 30, 9, 25; the dataset is sorted by id.
    coco = write_tiny_coco(tmp_path / "coco", order=(30, 9, 25))
    loaded = load_wsss_dataset(str(coco), id_layout="raw", verify_images=False)
    assert list(loaded["train"]["id"]) == [f"{i:012d}" for i in (9, 25, 30)]
    args = script.parse_args(["--print_config", "--preset", "coco14-deit-s", *PAPER_RUN, "--cam_eval_samples", "2"])
    assert list(script.cam_selection_subset(args, loaded)["id"]) == [f"{i:012d}" for i in (30, 9)]


def write_tiny_coco(root, order):
    (root / "annotations").mkdir(parents=True)
    images, annotations = [], []
    for split, ids in (("train", order), ("val", (7,))):
        (root / f"{split}2014").mkdir()
        images = []
        annotations = []
        for image_id in ids:
            name = f"COCO_{split}2014_{image_id:012d}.jpg"
            PIL.Image.new("RGB", (8, 6), (image_id, 0, 0)).save(root / f"{split}2014" / name)
            images.append({"id": image_id, "file_name": name, "width": 8, "height": 6})
            annotations.append({"id": image_id, "image_id": image_id, "category_id": 18, "iscrowd": 0,
                                "segmentation": [[0.5, 0.5, 4.5, 0.5, 4.5, 3.5, 0.5, 3.5]]})  # fmt: skip
        payload = {"images": images, "annotations": annotations,
                   "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]}  # fmt: skip
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(payload))
    return root


def test_image_labels_file_replaces_labels_and_checks_every_id(script, tmp_path):
    dataset = load_wsss_dataset("synthetic", num_classes=3, image_size=32, num_train=3, num_val=1, seed=0)
    ids = list(dataset["train"]["id"]) + list(dataset["val"]["id"])
    table = {f"{sample_id}.jpg": np.eye(3, dtype=np.float32)[index % 3] for index, sample_id in enumerate(ids)}
    np.save(tmp_path / "cls_labels.npy", table)
    relabelled = script.with_image_labels_file(dataset, str(tmp_path / "cls_labels.npy"))
    assert list(relabelled["train"]["labels"]) == [[0], [1], [2]]
    np.save(tmp_path / "short.npy", {ids[0]: np.ones(3)})
    with pytest.raises(KeyError, match="no labels for image"):
        script.with_image_labels_file(dataset, str(tmp_path / "short.npy"))
    np.save(tmp_path / "wide.npy", {sample_id: np.ones(90) for sample_id in ids})
    with pytest.raises(ValueError, match="coco_id_layout"):
        script.with_image_labels_file(dataset, str(tmp_path / "wide.npy"))


def test_step2_resize_without_antialias_and_long_side_cap():
    from weaktr_hf.data import SegmentationTrainTransform

    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 100, 3), np.uint8))
    example = {"id": "x", "image": image, "labels": [0], "semantic_mask": PIL.Image.new("L", (100, 10))}
    for max_ratio, expected_width in ((4, 80), (8, 160)):  # short side 20 would make it 200: capped at 4 or 8 x 20
        transform = SegmentationTrainTransform(crop_size=(40, 200), base_size=20, scale_range=(1.0, 1.0),
                                               max_ratio=max_ratio, antialias=False, photometric=False,
                                               flip_prob=0.0)  # fmt: skip
        out = transform(example)
        valid = out["semantic_mask"] != 255
        assert int(valid.any(0).sum()) == expected_width
