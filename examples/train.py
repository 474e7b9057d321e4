#!/usr/bin/env python
"""WeakTr's whole weakly-supervised segmentation recipe with Accelerate: the script behind `weaktr-train`.

    accelerate launch examples/train.py            # the offline demo on the built-in synthetic set (CPU, minutes)
    accelerate launch examples/train.py --preset voc12-deit-s --dataset_path /data/VOCdevkit/VOC2012 \\
        --backbone deit_small_patch16_224 --output_dir runs/voc12
    accelerate launch examples/train.py --preset own-deit-s --dataset_path my_photos \\
        --backbone deit_small_patch16_224 --output_dir runs/mine

The recipe lives in the package, so an installed wheel runs the same thing with `weaktr-train` or
`accelerate launch -m weaktr_hf.train`:
- `weaktr_hf.recipes`: every preset as data, each value with the authors' file:line (`--print_config` shows one);
- `weaktr_hf.stages`: the four stages below, each reading the run folder and writing its outputs there;
- `weaktr_hf.runs`: the run folder's record (a folder holding another run is refused without
  --overwrite_output_dir; `--resume_from_checkpoint latest` continues an interrupted run with the same options).

`python examples/train.py --help` lists every option with the value the chosen --preset gives it.
"""

import json
import sys

from weaktr_hf.recipes import resolve_batch_sizes, resolved_config
from weaktr_hf.train import Run, parse_args


def main(argv=None):
    # 1. Flags -> the resolved recipe: the preset's values, your flags over them, checked as a run checks them.
    args = parse_args(argv, prog="accelerate launch examples/train.py")
    if args.print_config:
        print(json.dumps(resolved_config(resolve_batch_sizes(args, 1)), indent=2))
        return None

    # 2. Accelerate, the run folder, the Hub repositories (checked before anything trains), the dataset.
    run = Run(args)

    # 3. The stages, in order (or the one --stage names), each from the seed:
    #    cam    step 1: train WeakTrForCAM from image-level labels, keep the best epoch (CAM mIoU on a train subset;
    #           without masks the lowest held-out classification loss, then the CAM and threshold by Otsu's rule)
    #    pseudo multi-scale + flip CAMs -> background threshold -> dense CRF -> one pseudo-label PNG per image
    #    seg    step 2: train WeakTrForSemanticSegmentation on the pseudo-labels with the gradient-clipping loss
    #    eval   predict the validation split (predictions/, figures/), score it where it has masks
    for stage in run.stages:
        run.run_stage(stage)

    # 4. The results table (all_results.json), the summary figure, and the push of both models with --push_to_hub.
    return run.finish()


if __name__ == "__main__":
    # Command-line use: a user's mistake is one line on stderr and a non-zero exit, as `weaktr-train` does.
    from weaktr_hf.cli import console_script

    sys.exit(console_script("train.py")(main)())
