"""`BWSKTrainer.push_to_hub()` of a single variant, through the local Hub-API test server."""

import pytest
import torch
from hub_server import TOKEN
from huggingface_hub import ModelCard
from test_trainer import train
from transformers import AutoModelForCausalLM

# huggingface_hub's LFS upload hands httpx2 a file object through ``data=``; httpx2 asks for ``content=``.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning:httpx2")


def test_push_to_hub_uploads_the_variant_with_our_card(tmp_path, hf_home):
    trainer, _ = train("llama", tmp_path / "run", mode="reversible", steps=2,
                       hub_model_id="tester/bwsk-llama-tiny", hub_token=TOKEN)
    trainer.push_to_hub(dataset="wikitext")

    card = ModelCard.load("tester/bwsk-llama-tiny", token=TOKEN)
    assert "bwsk" in card.data.tags and card.data.datasets == ["wikitext"]
    # Two steps without evaluation measured no perplexity: the card claims no result.
    assert card.data.eval_results is None and "n/a" in card.text
    loaded = AutoModelForCausalLM.from_pretrained("tester/bwsk-llama-tiny", token=TOKEN)
    trained = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, trained[name]), f"{name} differs after the round trip"
