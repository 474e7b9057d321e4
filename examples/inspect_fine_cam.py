#!/usr/bin/env python
"""Measure what the fine CAM of a trained step-1 model is made of, to tell why it is (or is not) better than the
coarse CAM. Reads the `cam/` folder that `examples/train.py` writes and the same synthetic data.

    python examples/inspect_fine_cam.py outputs/weaktr-demo/cam --seed 42 [--synthetic_config default]

For each of the first `--num_images` training images, at the training size, it measures:
- the scale of the three image scores of the present classes: class tokens, coarse CAM (mean of the coarse map),
  fine CAM (mean of the fine map), and the fine loss; a fine score far below the coarse one keeps the fine loss
  near ln 2 whatever the fusion does;
- the Adaptive Attention Fusion's head weights (a sigmoid each): their spread, and the share of weights at the
  sigmoid's ceiling (> 0.99), where the fusion has stopped choosing between heads;
- the fused patch-to-patch attention that spreads the CAM: mean row entropy against a uniform row's (ln of the
  patch count), and the share of each row's attention on the patch itself, on patches of the same object, and on
  background patches;
- for each present class, the correlation of each CAM with the class's ground-truth mask pooled to the patch grid,
  and that of `cross_attention * relu(coarse_cam)`, what the patch attention then propagates into the fine CAM.
Prints one JSON object (the means) and writes it to `--output` if given.
"""

import argparse
import json
import math

import numpy as np
import torch
import torch.nn.functional as F

from weaktr_hf import WeakTrForCAM, WeakTrImageProcessor
from weaktr_hf.data import SYNTHETIC_CONFIGURATIONS, load_wsss_dataset, mask_to_array


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cam_model", help="a saved WeakTrForCAM folder (OUTPUT_DIR/cam of examples/train.py)")
    parser.add_argument("--seed", type=int, default=42, help="the data seed of the run (its --seed)")
    parser.add_argument("--synthetic_config", default="default", choices=sorted(SYNTHETIC_CONFIGURATIONS))
    parser.add_argument("--synthetic_num_classes", type=int, default=4)
    parser.add_argument("--synthetic_image_size", type=int, default=64)
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--output")
    return parser.parse_args(argv)


def correlation(a, b):
    """Pearson correlation of two maps; 0 when one is constant (a flat CAM says nothing about where the object is)."""
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else 0.0


@torch.no_grad()
def inspect(model, processor, rows):
    num_classes = model.config.num_labels
    grid = model.config.image_grid
    measures = {key: [] for key in (
        "class_score", "coarse_score", "fine_score", "fine_loss", "head_weight_mean", "head_weight_std",
        "head_weights_at_ceiling", "patch_attention_entropy", "uniform_entropy", "self_share", "same_object_share",
        "background_share", "background_patch_share", "coarse_cam_correlation", "cross_attention_correlation",
        "fine_cam_correlation", "before_propagation_correlation",
    )}  # fmt: skip
    for row in rows:
        labels = row["labels"]
        if not labels:
            continue
        pixel_values = processor(row["image"], return_tensors="pt").pixel_values
        encoder = model.weaktr(pixel_values, output_attentions=True, output_attention_outputs=True, return_dict=True)
        fused, head_weights = model.adaptive_attention_fusion(encoder.attentions, encoder.attention_outputs)
        outputs = model(pixel_values)
        target = torch.zeros(1, num_classes)
        target[0, labels] = 1
        measures["class_score"].append(float(outputs.logits[0, labels].mean()))
        measures["coarse_score"].append(float(outputs.coarse_logits[0, labels].mean()))
        measures["fine_score"].append(float(outputs.fine_logits[0, labels].mean()))
        measures["fine_loss"].append(float(F.multilabel_soft_margin_loss(outputs.fine_logits, target)))
        measures["head_weight_mean"].append(float(head_weights.mean()))
        measures["head_weight_std"].append(float(head_weights.std()))
        measures["head_weights_at_ceiling"].append(float((head_weights > 0.99).float().mean()))

        patch_attention = fused[0, num_classes:, num_classes:]
        rows_normalised = patch_attention / patch_attention.sum(-1, keepdim=True)
        entropy = -(rows_normalised * rows_normalised.clamp_min(1e-12).log()).sum(-1)
        measures["patch_attention_entropy"].append(float(entropy.mean()))
        measures["uniform_entropy"].append(math.log(patch_attention.shape[-1]))
        measures["self_share"].append(float(rows_normalised.diagonal().mean()))

        mask = torch.from_numpy(mask_to_array(row["semantic_mask"], row["id"]).astype(np.int64))
        # The label of each patch: its most frequent label at the model's grid.
        one_hot = F.one_hot(mask, num_classes + 1).permute(2, 0, 1).float()[None]
        pooled = F.adaptive_avg_pool2d(one_hot, grid)[0]  # (1 + C, rows, cols): class shares per patch
        patch_label = pooled.argmax(0).flatten()
        same = (patch_label[:, None] == patch_label[None, :]).float()
        foreground_rows = patch_label > 0
        if foreground_rows.any():
            share_same = (rows_normalised * same).sum(-1)[foreground_rows]
            share_background = rows_normalised[:, patch_label == 0].sum(-1)[foreground_rows]
            measures["same_object_share"].append(float(share_same.mean()))
            measures["background_share"].append(float(share_background.mean()))
            measures["background_patch_share"].append(float((patch_label == 0).float().mean()))
        for name in ("coarse_cam", "cross_attention", "fine_cam"):
            cams = getattr(outputs, name)[0]
            values = [correlation(cams[k], pooled[k + 1]) for k in labels]
            measures[f"{name}_correlation"].append(float(np.mean(values)))
        # What the patch attention propagates: the fine CAM with the identity in place of the patch attention.
        before = outputs.cross_attention[0] * F.relu(outputs.coarse_cam[0])
        values = [correlation(before[k], pooled[k + 1]) for k in labels]
        measures["before_propagation_correlation"].append(float(np.mean(values)))
    summary = {key: round(float(np.mean(values)), 4) for key, values in measures.items() if values}
    summary["fine_over_coarse_score"] = round(summary["fine_score"] / summary["coarse_score"], 4)
    summary["num_images"] = len(measures["class_score"])
    summary["num_patches"] = grid[0] * grid[1]
    return summary


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    model = WeakTrForCAM.from_pretrained(args.cam_model).eval()
    size = model.config.image_size
    processor = WeakTrImageProcessor(size={"height": size, "width": size} if isinstance(size, int) else None)
    options = {"num_classes": args.synthetic_num_classes, **SYNTHETIC_CONFIGURATIONS[args.synthetic_config]}
    rows = load_wsss_dataset("synthetic", split="train", image_size=args.synthetic_image_size,
                             num_train=args.num_images, seed=args.seed, **options)  # fmt: skip
    summary = inspect(model, processor, rows)
    print(json.dumps(summary, indent=2))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(summary, handle, indent=2)
    return summary


if __name__ == "__main__":
    main()
