"""Hub helpers: the push fails fast before training with one line naming the cause, both models of a run are
uploaded (to `repo_id` and `repo_id-cam`) with a card that parses with huggingface_hub and holds the run's metrics,
and a run that scored nothing says so. The Hub client is a local stand-in: nothing reaches the network."""

from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import ModelCard
from huggingface_hub.errors import LocalTokenNotFoundError

from weaktr_hf import (
    WeakTrForCAM,
    WeakTrForSemanticSegmentation,
    WeakTrImageProcessor,
    hub,
)
from weaktr_hf.image_processing_weaktr import evaluation_processor


class StandInApi:
    """Records what a push does; `whoami` fails with `whoami_error` when given."""

    def __init__(self, whoami_error=None):
        self.whoami_error, self.created, self.uploads = whoami_error, [], {}

    def whoami(self, token=None):
        if self.whoami_error is not None:
            raise self.whoami_error
        return {"name": "someone"}

    def create_repo(self, repo_id, **kwargs):
        self.created.append(repo_id)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, **kwargs):
        self.uploads[repo_id] = {path.name: path.read_bytes() for path in Path(folder_path).iterdir()}


@pytest.fixture
def run_folder(tester, tmp_path):
    """A run's output folder with both saved models and their processors."""
    WeakTrForCAM(tester.get_config()).save_pretrained(tmp_path / "cam")
    WeakTrImageProcessor(size={"height": 32, "width": 32}, size_divisor=8).save_pretrained(tmp_path / "cam")
    WeakTrForSemanticSegmentation(tester.get_segmentation_config()).save_pretrained(tmp_path / "seg")
    evaluation_processor(32, 24, patch_size=8).save_pretrained(tmp_path / "seg")
    return tmp_path


def test_offline_stops_before_training_with_one_line(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubSetupError, match="offline") as error:
        hub.prepare_hub_repos(["someone/x", "someone/x-cam"], api=StandInApi())
    assert "\n" not in str(error.value)


def test_missing_token_and_bad_repo_id_are_named(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(hub.HubSetupError, match="no Hugging Face token"):
        hub.prepare_hub_repos("someone/x", api=StandInApi(whoami_error=LocalTokenNotFoundError("no token")))
    with pytest.raises(hub.HubSetupError, match="cannot be reached"):
        hub.prepare_hub_repos("someone/x", api=StandInApi(whoami_error=ConnectionError("Connection refused")))
    with pytest.raises(hub.HubSetupError, match="not a valid repository id"):
        hub.prepare_hub_repos("someone/x y", api=StandInApi())
    api = StandInApi()
    assert hub.prepare_hub_repos(["x", hub.cam_repo_id("x")], api=api) == ["someone/x", "someone/x-cam"]
    assert api.created == ["someone/x", "someone/x-cam"]


def test_push_run_uploads_both_models_with_cards_holding_the_runs_metrics(run_folder):
    api = StandInApi()
    results = {"seg_val_miou": 0.6123, "seg_val_miou_ms_flip": 0.654, "fine_cam_miou": 0.41, "pseudo_label_miou": 0.5}
    pushed = hub.push_run_to_hub(run_folder, "someone/weaktr-pets", results, "weaktr-train --push_to_hub",
                                 "synthetic", license="apache-2.0", api=api)  # fmt: skip
    assert pushed == {"seg": "someone/weaktr-pets", "cam": "someone/weaktr-pets-cam"}
    assert set(api.uploads) == {"someone/weaktr-pets", "someone/weaktr-pets-cam"}
    for repo_id, expected, tag in (("someone/weaktr-pets", {61.23, 65.4}, "image-segmentation"),
                                   ("someone/weaktr-pets-cam", {41.0, 50.0}, "image-classification")):  # fmt: skip
        files = api.uploads[repo_id]
        assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(files)
        card = ModelCard(files["README.md"].decode())
        data = card.data
        assert data.pipeline_tag == tag and data.library_name == "transformers" and data.license == "apache-2.0"
        assert "arxiv:2304.01184" in data.tags and "weakly-supervised-semantic-segmentation" in data.tags
        assert data.datasets is None and data.base_model is None  # "synthetic" is no Hub dataset id
        assert {result.metric_value for result in data.eval_results} == expected
        assert all(result.metric_type == "mean_iou" for result in data.eval_results)
        assert "@article{zhu2023weaktr" in card.text and hub.INSTALL_COMMAND in card.text
        assert "weaktr-train --push_to_hub" in card.text


def test_card_without_scores_has_no_table_and_no_licence_unless_given(run_folder):
    card = hub.trained_model_card(run_folder / "seg", "someone/x", {}, "cmd", "my/photos-dataset")
    assert card.data.eval_results is None and card.data.license is None
    assert card.data.datasets == ["my/photos-dataset"]
    assert "Nothing was scored" in card.text and "| result |" not in card.text
    local = hub.trained_model_card(run_folder / "seg", "someone/x", {}, "cmd", str(run_folder))
    assert local.data.datasets is None
