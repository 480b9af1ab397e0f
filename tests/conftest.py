import os
import sys
from pathlib import Path

# Test helpers (tiny_models, ...) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))

import pytest
import torch

# Tiny test models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
# spin-waiting made a 20-step tiny Trainer run take 29 s instead of 1.5 s.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def analysis_cache(tmp_path_factory):
    """`hf-bwsk analyze` caches its output under HF_HOME: the tests use a cache of their own."""
    path = tmp_path_factory.mktemp("analysis_cache")
    previous = os.environ.get("HF_BWSK_CACHE")
    os.environ["HF_BWSK_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("HF_BWSK_CACHE", None)
    else:
        os.environ["HF_BWSK_CACHE"] = previous


@pytest.fixture(scope="module")
def fake_run_dir(tmp_path_factory):
    """A six-variant run directory in the runner's layout (``fake_run.make_fake_run``), one per test module."""
    from fake_run import make_fake_run

    return make_fake_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def hub():
    """The local Hub-API server, knowing ``hub_server.TOKEN`` as ``hub_server.USER``."""
    from hub_server import TOKEN, USER, HubServer

    with HubServer({TOKEN: USER}) as server:
        yield server


@pytest.fixture
def hf_home(hub, monkeypatch, tmp_path):
    """huggingface_hub pointed at ``hub`` with a fresh cache; the server's request logs cleared."""
    from hub_server import point_hf_at

    point_hf_at(hub, monkeypatch, tmp_path / "hf_home")
    hub.state.requests.clear()
    hub.state.unhandled.clear()
    return tmp_path / "hf_home"
