#!/usr/bin/env python
"""What choosing the pseudo-label CAM and background threshold WITHOUT masks costs (README, "Train on your own images").

For each synthetic configuration and seed:

1. the demo-sized synthetic train / val sets are built and saved with every mask removed;
2. `examples/train.py --stage cam` (demo preset) trains step 1 on that mask-free copy, so the epoch is kept by the
   held-out classification loss and the CAM and threshold are chosen by Otsu's rule (`weaktr_hf.selection`), all
   without a mask in sight;
3. with the masks back, the CAMs of the first `--num_scored` training images (the pseudo-labels' scales and flip) are
   thresholded at every (CAM, threshold) of the demo's sweep and scored (pseudo-label maps before the dense CRF);
4. reported: the pseudo-label mIoU of the mask-free choice, of the mask-based choice (what the recipe picks with masks:
   the best (CAM, threshold) on its first `cam_eval_samples` training images), and of the best choice on the scored
   images themselves (an oracle), for the same step-1 model.

    PYTHONPATH=src python benchmarks/mask_free_selection.py --output_dir runs/mask_free \
        --configs default small-cluttered --seeds 0 1

A finished step-1 run (its cam_selection.json) is reused when the script is run again; the table is printed and
written to `<output_dir>/mask_free_selection.json`.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from weaktr_hf import WeakTrForCAM
from weaktr_hf.data import SYNTHETIC_CONFIGURATIONS, load_wsss_dataset, mask_to_array
from weaktr_hf.inference import cams_to_labels, generate_cams
from weaktr_hf.metrics import ConfusionMatrix
from weaktr_hf.pseudo_labels import _default_image_transform
from weaktr_hf.selection import choose_cam_without_masks

ROOT = Path(__file__).resolve().parents[1]
CAM_NAMES = ("coarse_cam", "fine_cam", "cross_attention")


def load_demo_preset():
    """The demo preset (sizes, sweep, scales) of weaktr_hf.recipes."""
    from weaktr_hf.recipes import PRESETS

    return PRESETS["demo"]


def build_mask_free_copy(config, seed, preset, folder):
    """The synthetic dataset (demo sizes, `config`) saved twice: as is, and with the masks removed."""
    if (folder / "with_masks").is_dir() and (folder / "mask_free").is_dir():
        return
    dataset = load_wsss_dataset(
        "synthetic", image_size=preset["synthetic_image_size"], num_train=preset["synthetic_num_train"],
        num_val=preset["synthetic_num_val"], seed=seed,
        **{"num_classes": preset["synthetic_num_classes"], **SYNTHETIC_CONFIGURATIONS[config]},
    )  # fmt: skip
    dataset.save_to_disk(str(folder / "with_masks"))
    dataset.remove_columns("semantic_mask").save_to_disk(str(folder / "mask_free"))


def train_step1_without_masks(folder, seed, extra_args):
    """examples/train.py --stage cam on the mask-free copy (skipped when a finished run is there)."""
    run = folder / "run"
    selection = run / "cam_selection.json"
    if selection.is_file() and "rule" in json.loads(selection.read_text()):
        return run
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(ROOT / "examples" / "train.py"), "--stage", "cam", "--seed", str(seed),
               "--dataset_path", str(folder / "mask_free"), "--output_dir", str(run), *extra_args]  # fmt: skip
    subprocess.run(command, env=env, check=True)
    return run


def score_grid(model, dataset, thresholds, scales, flip, num_scored, num_selection):
    """Confusion matrices of every (CAM, threshold) on the first `num_scored` images, and on the first
    `num_selection` of them separately (where the recipe with masks makes its choice)."""
    transform = _default_image_transform()
    num_labels = model.config.num_labels + 1
    scored = {(cam, t): ConfusionMatrix(num_labels) for cam in CAM_NAMES for t in thresholds}
    selection = {(cam, t): ConfusionMatrix(num_labels) for cam in CAM_NAMES for t in thresholds}
    for index in tqdm(range(min(num_scored, len(dataset))), desc="scoring the sweep"):
        example = dataset[index]
        reference = mask_to_array(example["semantic_mask"], example["id"])
        pixel_values = transform(example["image"]).unsqueeze(0)
        maps = generate_cams(model, pixel_values, [example["labels"]], scales=scales, flip=flip, cam=CAM_NAMES)
        for cam in CAM_NAMES:
            for threshold in thresholds:
                prediction = cams_to_labels(maps[cam], [example["labels"]], threshold)[0].numpy()
                scored[cam, threshold].update(prediction, reference)
                if index < num_selection:
                    selection[cam, threshold].update(prediction, reference)
    miou = {key: matrix.compute()["mean_iou"] for key, matrix in scored.items()}
    selection_miou = {key: matrix.compute()["mean_iou"] for key, matrix in selection.items()}
    return miou, selection_miou


def measure(config, seed, args, preset):
    folder = Path(args.output_dir) / f"{config}-seed{seed}"
    build_mask_free_copy(config, seed, preset, folder)
    run = train_step1_without_masks(folder, seed, args.train_args)
    epoch = json.loads((run / "cam_selection.json").read_text())["epoch"]
    model = WeakTrForCAM.from_pretrained(run / "cam")
    thresholds = tuple(preset["cam_sweep_thresholds"])
    # The rule again, as the library has it now (the run's cam_selection.json holds the same when the code has not
    # changed since), on the mask-free copy: it never sees a mask.
    hidden = load_wsss_dataset(folder / "mask_free", split="train")
    choice = choose_cam_without_masks(model, hidden.select(range(preset["cam_eval_samples"])),
                                      scales=preset["cam_scales"], flip=preset["cam_flip"])  # fmt: skip
    train = load_wsss_dataset(folder / "with_masks", split="train")
    # The sweep, plus the mask-free threshold (Otsu's, anywhere in [0, 1]) so that choice is scored too.
    miou, selection_miou = score_grid(model, train, (*thresholds, choice["threshold"]), preset["cam_scales"],
                                      preset["cam_flip"], args.num_scored, preset["cam_eval_samples"])  # fmt: skip
    # The recipe with masks, and the oracle, choose among the sweep's thresholds.
    mask_based = max((key for key in selection_miou if key[1] in thresholds), key=selection_miou.get)
    oracle = max((key for key in miou if key[1] in thresholds), key=miou.get)
    mask_free = (choice["cam"], choice["threshold"])
    return {
        "config": config, "seed": seed, "epoch": epoch, "num_scored": min(args.num_scored, len(train)),
        "mask_free_choice": list(mask_free), "mask_free_miou": miou[mask_free],
        "mask_based_choice": list(mask_based), "mask_based_miou": miou[mask_based],
        "oracle_choice": list(oracle), "oracle_miou": miou[oracle],
        "per_choice_miou": {f"{cam}@{t:g}": value for (cam, t), value in miou.items()},
        "rule": choice["rule"], "per_cam": choice["per_cam"],
    }  # fmt: skip


def table(rows):
    lines = ["| configuration | seed | mask-free choice | mIoU | mask-based choice | mIoU | best on scored | mIoU | "
             "mask-free - mask-based |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        cells = [row["config"], row["seed"]]
        for key in ("mask_free", "mask_based", "oracle"):
            cam, threshold = row[f"{key}_choice"]
            cells += [f"{cam} @ {threshold:.2f}", f"{100 * row[f'{key}_miou']:.1f}"]
        cells.append(f"{100 * (row['mask_free_miou'] - row['mask_based_miou']):+.1f}")
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    for config in dict.fromkeys(row["config"] for row in rows):
        gaps = [100 * (r["mask_free_miou"] - r["mask_based_miou"]) for r in rows if r["config"] == config]
        lines.append(f"\n{config}: mask-free - mask-based = {np.mean(gaps):+.1f} (min {min(gaps):+.1f}, max "
                     f"{max(gaps):+.1f}) mIoU points over {len(gaps)} seed(s)")  # fmt: skip
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/mask_free_selection")
    parser.add_argument("--configs", nargs="+", default=["default", "small-cluttered"],
                        choices=sorted(SYNTHETIC_CONFIGURATIONS))  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--num_scored", type=int, default=300, help="training images whose pseudo-labels are scored")
    parser.add_argument("--train_args", nargs=argparse.REMAINDER, default=[],
                        help="extra examples/train.py flags (last on the line), e.g. --num_train_epochs 20")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    preset = load_demo_preset()
    rows = []
    for config in args.configs:
        for seed in args.seeds:
            rows.append(measure(config, seed, args, preset))
            out = Path(args.output_dir) / "mask_free_selection.json"
            out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2))
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
