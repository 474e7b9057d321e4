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


def prepare_repositories(repo_ids, token=None, private=None):
    """Check the token and create (or find) each repository, before a run trains anything: a missing login, no
    network or a bad repository id stops the run at once with one line naming the cause."""
    api = HfApi(token=token) if token else HfApi()
    try:
        user = api.whoami()
    except Exception as error:  # offline, no token, an expired token: all say why in their message
        raise ValueError(
            f"--push_to_hub: cannot reach the Hub as a logged-in user ({type(error).__name__}: {error}). Run "
            "`hf auth login` (or pass --hub_token) where the Hub is reachable, or drop --push_to_hub."
        ) from error
    urls = []
    for repo_id in repo_ids:
        try:
            urls.append(api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model"))
        except Exception as error:
            raise ValueError(
                f"--push_to_hub: cannot create or find the repository {repo_id!r} as {user.get('name')!r} "
                f"({type(error).__name__}: {error}). Check --hub_model_id."
            ) from error
    return list(repo_ids)


__all__ = ["model_card_template", "prepare_repositories", "push_folder_to_hub", "render_model_card"]
