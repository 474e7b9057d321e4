"""A run owns its output folder: what made it, which stage wrote which result, and nothing of another run.

`run.json` in the output folder records the run's id and, per stage, the recipe the stage ran with and the result keys
it wrote. A new run into a folder that holds another run is refused (or, with `overwrite`, the old run's state is
removed first); rerunning a stage of the same run drops the results of that stage and of the stages after it, and
its half-finished checkpoints; resuming needs the same run and the same recipe.
"""

import json
import os
import shutil
import uuid

from .recipes import STAGES, RecipeError, requested_stages

RUN_FILE = "run.json"
RESULTS_FILE = "all_results.json"
# What a run writes in its folder (README, "What a run writes"); `overwrite` removes exactly these.
RUN_ENTRIES = (
    RUN_FILE, RESULTS_FILE, "cam_selection.json", "cam", "seg", "checkpoints", "pseudo_labels", "pseudo_labels_nocrf",
    "predictions", "figures", "logs", "weaktr",
)  # fmt: skip
# Options that do not change what a stage computes, so a resumed stage may differ in them.
NOT_RECIPE = {
    "stage", "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "print_config", "push_to_hub",
    "hub_model_id", "hub_token", "hub_private_repo", "with_tracking", "report_to", "logging_steps", "num_threads",
    "dataloader_num_workers", "checkpointing_steps", "checkpoints_total_limit", "num_visualizations", "license",
    "fit_report_samples", "per_device_train_batch_size", "seg_per_device_train_batch_size", "gradient_accumulation_steps",
    "command",
}


def recipe_of(args):
    """The options that decide what a run computes, as JSON values."""
    return json.loads(json.dumps({k: v for k, v in sorted(vars(args).items()) if k not in NOT_RECIPE}, default=list))


def read_run(output_dir):
    path = os.path.join(output_dir, RUN_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _write_run(output_dir, record):
    path = os.path.join(output_dir, RUN_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def _differences(recorded, recipe):
    changed = sorted(key for key in set(recorded) | set(recipe) if recorded.get(key) != recipe.get(key))
    return "; ".join(f"{key}: {recorded.get(key)!r} -> {recipe.get(key)!r}" for key in changed)


def start_run(args):
    """Claim `args.output_dir` for this run and return its record (the main process calls it).

    - `--stage all` (a new run): the folder must be new or empty, or hold no weaktr run; with
      `--overwrite_output_dir` a previous run's entries are removed first. `--resume_from_checkpoint` continues the
      run recorded there instead, if the recipe is the same.
    - `--stage NAME`: continues the run recorded in the folder (a folder without one starts a new run there).
    """
    output_dir = args.output_dir
    record = read_run(output_dir)
    entries = sorted(name for name in os.listdir(output_dir) if name in RUN_ENTRIES) if os.path.isdir(output_dir) else []
    resuming = bool(args.resume_from_checkpoint)
    new_run = args.stage == "all" and not resuming
    if new_run and entries:
        if not args.overwrite_output_dir:
            raise RecipeError(
                f"--output_dir {output_dir} already holds a run ({', '.join(entries)}). Pass --overwrite_output_dir "
                "to replace it, --resume_from_checkpoint latest to continue it, or choose another --output_dir."
            )
        for name in entries:
            path = os.path.join(output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        record = None
    recipe = recipe_of(args)
    if resuming:
        if record is None:
            raise RecipeError(
                f"--resume_from_checkpoint: {output_dir} holds no run to resume ({RUN_FILE} is missing); start the run "
                "without --resume_from_checkpoint."
            )
        for stage in requested_stages(args):
            recorded = record.get("stages", {}).get(stage, {}).get("recipe")
            if recorded is not None and recorded != recipe:
                raise RecipeError(
                    f"--resume_from_checkpoint: stage {stage} of the run in {output_dir} ran with another recipe "
                    f"({_differences(recorded, recipe)}); resume with the same options, or start a new run."
                )
    if record is None:
        record = {"run_id": uuid.uuid4().hex, "stages": {}}
    os.makedirs(output_dir, exist_ok=True)
    _write_run(output_dir, record)
    return record


def begin_stage(args, record, stage, results, is_main_process=True):
    """A stage (re)starts: drop the results of this stage and the later ones, and (unless resuming) the stage's
    checkpoints from an earlier attempt, so nothing stale is resumed or reported; record the stage's recipe."""
    later = STAGES[STAGES.index(stage):]
    for name in later:
        for key in record["stages"].get(name, {}).get("result_keys", []):
            results.pop(key, None)
    if is_main_process and not args.resume_from_checkpoint and stage in ("cam", "seg"):
        shutil.rmtree(os.path.join(args.output_dir, "checkpoints", stage), ignore_errors=True)
    record["stages"][stage] = {"recipe": recipe_of(args), "result_keys": [], "finished": False}
    for name in later[1:]:
        record["stages"].pop(name, None)
    if is_main_process:
        _write_run(args.output_dir, record)


def end_stage(args, record, stage, keys_before, results, is_main_process=True):
    """Record which result keys the stage wrote and that it finished."""
    record["stages"][stage].update(result_keys=sorted(set(results) - set(keys_before)), finished=True)
    if is_main_process:
        _write_run(args.output_dir, record)


def load_results(output_dir, record):
    """This run's results so far: `all_results.json` when it belongs to the run recorded in `run.json`."""
    path = os.path.join(output_dir, RESULTS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        results = json.load(handle)
    return results if results.get("run_id") == record["run_id"] else {}
