"""Model cards and Hub uploads for folders written by `save_pretrained` (trained or converted models).

- `prepare_hub_repos`: before any training, check the token and create (or find) the repositories a run will push
  to; a problem stops the run at once with one line (`HubSetupError`) instead of after the last stage.
- `model_card`: a `huggingface_hub.ModelCard` whose metadata comes from `ModelCardData` (library, pipeline tag,
  tags, licence, base model, datasets, a `model-index` of measured metrics) and whose text comes from the templates
  in `model_cards/`.
- `push_run_to_hub`: both models of a run, each with its processor and card. The segmenter goes to `repo_id`, the
  step-1 CAM model to a second repository `<repo_id>-cam` (`cam_repo_id`): a repository has one `config.json`, one
  pipeline tag and one model-index at its root, which the pipeline, the Auto classes and the Hub widget read; a
  subfolder would need `subfolder=` everywhere, which `pipeline()` does not take.
"""

import logging
import math
import os
from importlib import resources
from pathlib import Path
from string import Template

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, constants
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError
from huggingface_hub.utils import HFValidationError, validate_repo_id

logger = logging.getLogger(__name__)

PAPER_ARXIV = "2304.01184"
PAPER_URL = f"https://arxiv.org/abs/{PAPER_ARXIV}"
TAGS = ["weaktr", "weakly-supervised-semantic-segmentation", "vision-transformer", f"arxiv:{PAPER_ARXIV}"]
# The paper's BibTeX (arXiv 2304.01184).
CITATION = """@article{zhu2023weaktr,
  title={WeakTr: Exploring Plain Vision Transformer for Weakly-supervised Semantic Segmentation},
  author={Zhu, Lianghui and Li, Yingyue and Fang, Jieming and Liu, Yan and Xin, Hao and Liu, Wenyu and Wang, Xinggang},
  journal={arXiv preprint arXiv:2304.01184},
  year={2023}
}"""
# How a reader of a card gets the package.
INSTALL_COMMAND = 'pip install ".[train]"  # in a clone of the weaktr-hf repository (not on PyPI yet)'
CONVERTED_LICENSE = "mit"  # the authors' release (github.com/hustvl/WeakTr) is MIT-licensed
# What the Hub client raises for a missing or refused token, a failed request or no network (connection errors and
# offline mode are OSErrors).
HUB_ERRORS = (LocalTokenNotFoundError, HfHubHTTPError, OSError, ValueError)


class HubSetupError(RuntimeError):
    """The Hub cannot take a push (offline, no token, bad repository id...): one line saying why and what to do."""


def cam_repo_id(repo_id):
    """Where a run's step-1 CAM model goes: a second repository beside the segmenter's, `<repo_id>-cam`."""
    return f"{repo_id}-cam"


def prepare_hub_repos(repo_ids, token=None, private=None, api=None):
    """Check the token and create (or find) each repository of `repo_ids`, before any training.

    Fails fast with a `HubSetupError` of one line naming the cause: an invalid repository id, offline mode
    (`HF_HUB_OFFLINE`), no token, a token the Hub refuses, no network, or a repository that cannot be created.
    Returns the full ids (`namespace/name`) of the repositories, in order.
    """
    repo_ids = [repo_ids] if isinstance(repo_ids, str) else list(repo_ids)
    for repo_id in repo_ids:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as error:
            raise HubSetupError(f"--hub_model_id {repo_id!r} is not a valid repository id ({error}); use "
                                "'name' or 'namespace/name' with letters, digits, '-', '_' and '.'.") from None  # fmt: skip
    if constants.HF_HUB_OFFLINE:
        raise HubSetupError("cannot push to the Hub: offline mode is on (HF_HUB_OFFLINE=1); unset it, or train "
                            "without --push_to_hub and upload the folders later.")  # fmt: skip
    api = api or (HfApi(token=token) if token else HfApi())
    try:
        user = api.whoami(token=token)
    except HUB_ERRORS as error:
        raise HubSetupError(f"cannot push to the Hub: {_hub_failure(error)}") from None
    created = []
    for repo_id in repo_ids:
        full_id = repo_id if "/" in repo_id else f"{user['name']}/{repo_id}"
        try:
            api.create_repo(repo_id=full_id, private=private, exist_ok=True, repo_type="model")
        except HUB_ERRORS as error:
            raise HubSetupError(f"cannot create or use the Hub repository {full_id!r}: {_hub_failure(error)}") from None
        created.append(full_id)
    return created


def _hub_failure(error):
    """One line for an exception of the Hub client, with what to do about the usual ones."""
    name, text = type(error).__name__, " ".join(str(error).split())[:300]
    status = getattr(getattr(error, "response", None), "status_code", None)
    if name == "LocalTokenNotFoundError" or "token" in text.lower() and status is None:
        return f"no Hugging Face token ({name}); run `hf auth login` or pass --hub_token."
    if status in (401, 403):
        return f"the token was refused (HTTP {status}: {text}); check it with `hf auth whoami` or pass --hub_token."
    if "connect" in name.lower() or "timeout" in name.lower() or "offline" in name.lower():
        return f"the Hub cannot be reached ({name}: {text}); check the network, or train without --push_to_hub."
    return f"{name}: {text}"


def model_card_template(name):
    """Text of `model_cards/<name>.md`: shipped inside the package when installed, else the repository's folder."""
    filename = f"{name}.md"
    try:
        packaged = resources.files("weaktr_hf.model_cards").joinpath(filename)
        if packaged.is_file():
            return packaged.read_text(encoding="utf-8")
    except ModuleNotFoundError:
        pass
    repository = Path(__file__).resolve().parents[2] / "model_cards" / filename
    if repository.is_file():
        return repository.read_text(encoding="utf-8")
    raise FileNotFoundError(f"No model-card template {filename!r} in the package or in the repository's model_cards/.")


def render_model_card(name, **fields):
    """Fill a template's `$field` placeholders; a placeholder left without a value is an error naming it."""
    try:
        return Template(model_card_template(name)).substitute(**fields)
    except KeyError as error:
        raise KeyError(f"Model-card template {name!r} needs a value for {error}.") from error


def model_card(text, pipeline_tag, license=None, base_model=None, datasets=None, metrics=(), model_name=None,
               extra_tags=(), reported_by=None):  # fmt: skip
    """A `ModelCard` with `text` under metadata built by `ModelCardData`.

    Args:
        text: the card's Markdown body (no front matter).
        pipeline_tag: `"image-segmentation"` (segmenter) or `"image-classification"` (step-1 CAM model).
        license: an SPDX-style Hub licence id, or None to write none (never guessed for a user's weights).
        base_model: a Hub model id the weights started from; None when they started elsewhere.
        datasets: Hub dataset ids; anything else (a local folder, the synthetic set) belongs in the text only.
        metrics: `(metric_name, value, dataset_name, dataset_type, split)` tuples with mIoU as a fraction or percent
            (written as given); they become the `model-index`.
        reported_by: `(source_name, source_url)` when the metrics are another's (a paper's), not measured here.
    """
    source_name, source_url = reported_by or (None, None)
    results = [
        EvalResult(task_type="image-segmentation", task_name="Semantic segmentation", dataset_type=dataset_type,
                   dataset_name=dataset_name, dataset_split=split, metric_type="mean_iou", metric_name=metric_name,
                   metric_value=value, source_name=source_name, source_url=source_url)
        for metric_name, value, dataset_name, dataset_type, split in metrics
    ]
    data = ModelCardData(
        library_name="transformers", pipeline_tag=pipeline_tag, license=license, base_model=base_model or None,
        datasets=list(datasets) if datasets else None, tags=TAGS + [tag for tag in extra_tags if tag],
        metrics=["mean_iou"] if results else None, model_name=model_name if results else None,
        eval_results=results or None,
    )  # fmt: skip
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text.lstrip()}")


def is_hub_dataset_id(value):
    """True for a string that names a Hub dataset (`namespace/name`), not a local path or a built-in name."""
    if not isinstance(value, str) or value.count("/") != 1 or os.path.exists(value):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def trained_model_card(folder, repo_id, results, command, dataset, license=None, base_model=None, cam_repo=None,
                       seg_repo=None):  # fmt: skip
    """The card of a model a weaktr-hf run trained (the `seg/` or `cam/` folder `folder`).

    `results` is the run's `all_results.json`: every measured mIoU of the model's kind becomes a `model-index` entry
    and a table row; nothing scored gives a sentence saying so, not an empty table. `dataset` is the run's
    `--dataset_path`: listed under `datasets` only when it is a Hub id. `cam_repo` / `seg_repo` name the other
    model's repository.
    """
    from .configuration_weaktr import WeakTrConfig

    config = WeakTrConfig.from_pretrained(folder)
    segmenter = "WeakTrForSemanticSegmentation" in (config.architectures or [])
    dataset_name = "the synthetic set" if dataset == "synthetic" else os.path.basename(os.path.normpath(str(dataset)))
    hub_dataset = dataset if is_hub_dataset_id(dataset) else None
    rows = measured_rows(results, segmenter)
    metrics = [(label, round(100 * value, 2), dataset_name, hub_dataset or dataset_name, split)
               for label, value, split in rows]  # fmt: skip
    if rows:
        table = "\n".join(["| result | split | mIoU % |", "|---|---|---|"]
                          + [f"| {label} | {split} | {100 * value:.1f} |" for label, value, split in rows])  # fmt: skip
    else:
        note = results.get("seg_val_note") if segmenter else None
        table = ("Nothing was scored: the run had no ground-truth masks for these images, so no mIoU was measured."
                 + (f" {note}" if note else ""))  # fmt: skip
    if segmenter:
        usage = (f'segmenter = pipeline("image-segmentation", model="{repo_id}", trust_remote_code=True)\n'
                 'segments = segmenter("image.jpg")  # one {"label", "mask"} per class present')  # fmt: skip
        usage_note = ("The processor gives the run's single-scale evaluation: the eval stage's resize and sliding "
                      "windows, and the model adds the decoder ensemble of its config. `weaktr-predict --model "
                      f"{repo_id}` also applies the run's scales, flips and CRF.")  # fmt: skip
        companion = f" Its step-1 CAM model is [{cam_repo}](https://huggingface.co/{cam_repo})." if cam_repo else ""
    else:
        usage = (f'classifier = pipeline("image-classification", model="{repo_id}", trust_remote_code=True)\n'
                 'scores = classifier("image.jpg")  # multi-label class scores (sigmoid)')  # fmt: skip
        usage_note = (f"`weaktr-predict --model {repo_id}` writes CAM pseudo-label masks with the CAM and threshold "
                      "the run chose (`cam_selection.json`).")  # fmt: skip
        companion = f" Its step-2 segmenter is [{seg_repo}](https://huggingface.co/{seg_repo})." if seg_repo else ""
    text = render_model_card(
        "trained_card", model_kind="segmenter (step 2)" if segmenter else "CAM model (step 1)",
        description=f"A `{(config.architectures or ['WeakTr'])[0]}` with {config.num_hidden_layers} layers of width "
        f"{config.hidden_size} and patch {config.patch_size}, {config.num_labels} labels, trained on {dataset_name}.",
        companion=companion, results=table, command=command, install=INSTALL_COMMAND, usage=usage,
        usage_note=usage_note, classes=", ".join(f"{i}: {name}" for i, name in sorted(config.id2label.items())),
        license_note=f"Released by the run's author under `{license}`." if license else
        "No licence was given when the model was pushed (`--license`); ask its author before reusing the weights.",
        citation=CITATION,
    )  # fmt: skip
    return model_card(
        text, "image-segmentation" if segmenter else "image-classification", license=license, base_model=base_model,
        datasets=[hub_dataset] if hub_dataset else None, metrics=metrics, model_name=repo_id,
    )  # fmt: skip


# all_results.json keys of each model kind, with the label and split of their model-index entry.
SEGMENTER_RESULTS = (
    ("seg_val_miou", "segmentation, single scale", "val"),
    ("seg_val_miou_ms_flip", "segmentation, multi-scale + flip", "val"),
    ("seg_val_miou_ms_flip_final_only", "segmentation, multi-scale + flip, final decoder output only", "val"),
    ("seg_val_miou_ms_flip_crf", "segmentation, multi-scale + flip + CRF", "val"),
)
CAM_RESULTS = (
    ("coarse_cam_miou", "coarse CAM", "train subset"),
    ("fine_cam_miou", "fine CAM", "train subset"),
    ("cross_attention_miou", "cross-attention CAM", "train subset"),
    ("pseudo_label_miou", "pseudo-labels, no CRF", "train"),
    ("pseudo_label_crf_miou", "pseudo-labels, CRF", "train"),
)


def measured_rows(results, segmenter):
    """(label, mIoU fraction, split) of each result of the model's kind the run measured (None / NaN left out)."""
    rows = []
    for key, label, split in SEGMENTER_RESULTS if segmenter else CAM_RESULTS:
        value = results.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            rows.append((label, float(value), split))
    return rows


def push_folder_to_hub(folder, repo_id, token=None, private=None, commit_message=None, api=None):
    """Create `repo_id` (if needed) and upload `folder` (model, processor, README.md) to it. Returns the commit info."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder} has no config.json; push a folder written by save_pretrained.")
    api = api or (HfApi(token=token) if token else HfApi())
    repo_url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    logger.info("Uploading %s to %s", folder, repo_url)
    return api.upload_folder(
        repo_id=repo_id, folder_path=folder, commit_message=commit_message or "Upload WeakTr model",
        repo_type="model",
    )  # fmt: skip


def push_run_to_hub(output_dir, repo_id, results, command, dataset, license=None, base_model=None, token=None,
                    private=None, api=None):  # fmt: skip
    """Write the card of each model of a run (`seg/`, `cam/`) and upload it with its processor: the segmenter to
    `repo_id`, the CAM model to `cam_repo_id(repo_id)`. Returns `{folder name: repository id}` of what was pushed.

    Call `prepare_hub_repos([repo_id, cam_repo_id(repo_id)], ...)` before training, so that this cannot fail on a
    token or a repository id after the run.
    """
    folders = {name: os.path.join(output_dir, name) for name in ("seg", "cam")}
    present = {name: folder for name, folder in folders.items() if os.path.isfile(os.path.join(folder, "config.json"))}
    if not present:
        raise FileNotFoundError(f"{output_dir} holds neither seg/ nor cam/ with a saved model; nothing to push.")
    repos = {"seg": repo_id, "cam": cam_repo_id(repo_id)}
    pushed = {}
    for name, folder in present.items():
        card = trained_model_card(
            folder, repos[name], results, command, dataset, license=license, base_model=base_model,
            cam_repo=repos["cam"] if name == "seg" and "cam" in present else None,
            seg_repo=repos["seg"] if name == "cam" and "seg" in present else None,
        )  # fmt: skip
        card.save(os.path.join(folder, "README.md"))
        push_folder_to_hub(folder, repos[name], token=token, private=private, api=api,
                           commit_message=f"Upload WeakTr {'segmenter' if name == 'seg' else 'CAM model'}")  # fmt: skip
        pushed[name] = repos[name]
    return pushed


__all__ = [
    "CITATION",
    "HubSetupError",
    "cam_repo_id",
    "is_hub_dataset_id",
    "model_card",
    "model_card_template",
    "prepare_hub_repos",
    "push_folder_to_hub",
    "push_run_to_hub",
    "render_model_card",
    "trained_model_card",
]
