"""Model cards and Hub uploads for folders written by `save_pretrained` (trained or converted models)."""

import logging
import os
from importlib import resources
from pathlib import Path
from string import Template

from huggingface_hub import HfApi

logger = logging.getLogger(__name__)


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


def push_folder_to_hub(folder, repo_id, token=None, private=None, commit_message=None):
    """Create `repo_id` (if needed) and upload `folder` (model, processor, README.md) to it. Returns the commit info."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder} has no config.json; push a folder written by save_pretrained.")
    api = HfApi(token=token) if token else HfApi()
    repo_url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    logger.info("Uploading %s to %s", folder, repo_url)
    return api.upload_folder(
        repo_id=repo_id, folder_path=folder, commit_message=commit_message or "Upload WeakTr model",
        repo_type="model",
    )  # fmt: skip


__all__ = ["model_card_template", "push_folder_to_hub", "render_model_card"]
