"""Publishing the tiny run through the local Hub-API server, and loading it back as users would."""

import json
import logging
import shutil
import traceback

import pytest
import torch
from fake_run import VARIANTS
from hub_server import TOKEN, USER

from hf_bwsk.errors import BWSKError
from hf_bwsk.publishing.hub import assemble, push

CARD_AND_RESULTS = ["README.md", "plots/loss_curves.png", "plots/peak_memory.png", "results.json"]

# huggingface_hub's LFS upload hands httpx2 a file object through ``data=``; httpx2 asks for ``content=``.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning:httpx2")


@pytest.fixture(scope="module")
def run_dir(fake_run_dir):
    return fake_run_dir


def hub_calls(hub):
    """Requests of the Hub API proper (huggingface_hub also fetches its agent registry once per process)."""
    return [request for request in hub.state.requests if request[1] != "agent_harnesses"]


def expected_paths(run_dir):
    variant_paths = [f"{v}/{p.name}" for v in VARIANTS for p in (run_dir / v).iterdir()]
    return sorted(CARD_AND_RESULTS + variant_paths)


def test_assemble_writes_the_repo_layout_without_checkpoints(run_dir, tmp_path):
    written = assemble(run_dir, tmp_path / "repo", repo_id="tester/bwsk-tiny")
    relative = sorted(p.relative_to(tmp_path / "repo").as_posix() for p in written)
    assert relative == expected_paths(run_dir)
    assert not any(path.startswith("checkpoints") for path in relative)
    for variant in VARIANTS:
        assert (tmp_path / "repo" / variant / "model.safetensors").read_bytes() == \
            (run_dir / variant / "model.safetensors").read_bytes()
    with pytest.raises(BWSKError, match="is not empty"):
        assemble(run_dir, tmp_path / "repo")


@pytest.mark.parametrize("damage, message", [
    (lambda folder: shutil.rmtree(folder), "variant scratch-bwsk-analyzed is incomplete"),
    (lambda folder: (folder / "model.safetensors").unlink(), "scratch-bwsk-analyzed has no model.safetensors"),
    (lambda folder: (folder / "tokenizer_config.json").unlink(), "tokenizer_config.json missing"),
    (lambda folder: (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:500]),
     "not a readable safetensors file"),
])
def test_incomplete_variant_is_refused_by_name(run_dir, tmp_path, damage, message):
    broken = shutil.copytree(run_dir, tmp_path / "run")
    damage(broken / "scratch-bwsk-analyzed")
    with pytest.raises(BWSKError, match=message):
        assemble(broken, tmp_path / "repo")
    with pytest.raises(BWSKError, match=message):
        push(broken, "tester/x", dry_run=True)


def test_dry_run_lists_every_file_and_size_without_network(run_dir, hf_home, hub):
    result = push(run_dir, "tester/bwsk-tiny", dry_run=True)
    assert hub.state.requests == []
    assert [path for path, _ in result.files] == expected_paths(run_dir)
    sizes = dict(result.files)
    assert sizes["finetune-conventional/model.safetensors"] == \
        (run_dir / "finetune-conventional" / "model.safetensors").stat().st_size
    table = result.to_table()
    assert f"{len(result.files)} files, {result.total_bytes:,d} B: would push to tester/bwsk-tiny@main" in table


@pytest.mark.parametrize("repo_id", ["not a repo", "a/b/c", "tester/bad--name..", ""])
def test_malformed_repo_id_fails_before_any_request(run_dir, hf_home, hub, repo_id):
    with pytest.raises(BWSKError, match="invalid repo id"):
        push(run_dir, repo_id, token=TOKEN)
    assert hub.state.requests == []


def test_missing_token_fails_before_any_request(run_dir, hf_home, hub):
    with pytest.raises(BWSKError, match="no Hugging Face token"):
        push(run_dir, "tester/bwsk-tiny")
    assert hub.state.requests == []


def test_unreachable_hub_is_a_one_line_error(run_dir, hf_home):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(BWSKError, match=f"could not reach {closed}") as caught:
        push(run_dir, "tester/bwsk-tiny", token=TOKEN, endpoint=closed)
    assert "\n" not in str(caught.value)


def test_rejected_token_stops_before_upload_and_is_never_shown(run_dir, hf_home, hub, caplog, capsys):
    bad_token = "hf_rejected_secret_token_987654"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(BWSKError) as caught:
        push(run_dir, "tester/bwsk-tiny", token=bad_token)
    message = str(caught.value)
    assert "rejected" in message and "\n" not in message
    assert hub_calls(hub) == [("GET", "whoami")]
    shown = "".join(traceback.format_exception(caught.value)) + caplog.text + "".join(capsys.readouterr())
    assert bad_token not in shown


def test_push_then_load_every_variant_through_the_hub(run_dir, hf_home, hub, caplog, capfd):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    caplog.set_level(logging.DEBUG)
    repo_id = "tester/bwsk-tiny"
    result = push(run_dir, repo_id, token=TOKEN, commit_message="Publish the tiny run")

    assert result.commit_oid == hub.state.repos[repo_id].refs["main"]
    assert hub.commit_count(repo_id) == 2  # the repo's initial commit + ONE commit with every file
    remote = hub.files(repo_id)
    assert sorted(remote) == sorted([".gitattributes"] + expected_paths(run_dir))
    assert hub.lfs_paths(repo_id) == sorted([f"{v}/model.safetensors" for v in VARIANTS] + CARD_AND_RESULTS[1:3])
    assert ("POST", "lfs_batch") in hub.state.requests
    assert not any(TOKEN.encode() in content for content in remote.values())

    prompt = "The history of"
    for variant in VARIANTS:
        model = AutoModelForCausalLM.from_pretrained(repo_id, subfolder=variant)
        tokenizer = AutoTokenizer.from_pretrained(repo_id, subfolder=variant)
        local = AutoModelForCausalLM.from_pretrained(run_dir / variant).state_dict()
        loaded = model.state_dict()
        assert loaded.keys() == local.keys()
        mismatched = [name for name, tensor in local.items() if not torch.equal(loaded[name], tensor)]
        assert mismatched == [], f"{variant}: weights differ after the round trip: {mismatched}"
        inputs = tokenizer(prompt, return_tensors="pt")
        assert tokenizer.decode(inputs["input_ids"][0]) == prompt
        output = model.generate(**inputs, min_new_tokens=4, max_new_tokens=4, do_sample=False)
        assert output.shape == (1, inputs["input_ids"].shape[1] + 4)

    card = ModelCard.load(repo_id)
    assert [r.task_name for r in card.data.eval_results] == [
        f"{e} ({m})" for e in ("Fine-tune", "From Scratch") for m in ("Conventional", "BWSK Analyzed", "BWSK Reversible")
    ]
    records = [json.loads((run_dir / v / "training_results.json").read_text()) for v in VARIANTS]
    assert [r.metric_value for r in card.data.eval_results] == [r["test_metric"] for r in records]
    assert f'repo = "{repo_id}"' in card.text
    assert hub.state.unhandled == []
    assert TOKEN not in caplog.text + "".join(capfd.readouterr())


def test_failure_mid_push_commits_nothing_and_a_second_push_succeeds(run_dir, hf_home, hub):
    repo_id = "tester/faulty"
    hub.fail("commit", status=500)
    with pytest.raises(BWSKError, match=r"failed during the upload and commit \(HTTP 500: Injected failure on commit"):
        push(run_dir, repo_id, token=TOKEN)
    assert hub.commit_count(repo_id) == 1 and sorted(hub.files(repo_id)) == [".gitattributes"]

    hub.fail("lfs_upload", status=403)  # the storage refuses one upload: not retried, nothing committed
    with pytest.raises(BWSKError, match="Error while uploading"):
        push(run_dir, "tester/faulty-upload", token=TOKEN)
    assert sorted(hub.files("tester/faulty-upload")) == [".gitattributes"]

    hub.state.requests.clear()
    result = push(run_dir, repo_id, token=TOKEN)
    assert hub.commit_count(repo_id) == 2 and result.commit_oid == hub.state.repos[repo_id].refs["main"]
    assert ("PUT", "lfs_upload") not in hub.state.requests  # the objects uploaded before the 500 are reused
    assert sorted(hub.files(repo_id)) == sorted([".gitattributes"] + expected_paths(run_dir))

    push(run_dir, repo_id, token=TOKEN)  # nothing changed: no empty commit
    assert hub.commit_count(repo_id) == 2


def test_private_push_to_a_branch(run_dir, hf_home, hub):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError

    result = push(run_dir, "bwsk-private", token=TOKEN, private=True, revision="v1")  # bare name: token's account
    assert (result.repo_id, result.revision) == ("tester/bwsk-private", "v1")
    repo = hub.state.repos["tester/bwsk-private"]
    assert repo.private and sorted(hub.files("tester/bwsk-private")) == [".gitattributes"]  # main untouched
    assert "results.json" in hub.files("tester/bwsk-private", "v1")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tester/bwsk-private", "results.json", revision="v1", token=False)
    path = hf_hub_download("tester/bwsk-private", "results.json", revision="v1", token=TOKEN)
    assert open(path, "rb").read() == (run_dir / "results.json").read_bytes()


def hub_request(hub, method, path, body=b"", headers=None):
    """A raw request to the test Hub: (status, JSON answer)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(hub.endpoint + path, data=body or None, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_test_hub_is_strict_about_auth_and_lfs_objects(hub):
    status, _ = hub_request(hub, "POST", "/api/repos/create", json.dumps({"name": "strict"}).encode())
    assert status == 401  # no Authorization header
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, _ = hub_request(hub, "POST", "/api/repos/create", json.dumps({"name": "strict"}).encode(), auth)
    assert status == 200
    never_uploaded = {"path": "model.safetensors", "algo": "sha256", "oid": "ab" * 32, "size": 10}
    ndjson = b"".join(json.dumps(line).encode() + b"\n" for line in [
        {"key": "header", "value": {"summary": "sneak a pointer in"}},
        {"key": "file", "value": {"path": "notes.txt", "content": "aGk=", "encoding": "base64"}},
        {"key": "lfsFile", "value": never_uploaded},
    ])
    status, answer = hub_request(hub, "POST", "/api/models/tester/strict/commit/main", ndjson,
                                 {**auth, "Content-Type": "application/x-ndjson"})
    assert status == 422 and "never uploaded" in answer["error"]
    assert sorted(hub.files("tester/strict")) == [".gitattributes"]  # the whole commit was refused


def test_check_token_names_the_account_or_refuses_in_one_line(hf_home, hub, monkeypatch):
    from hf_bwsk.publishing.hub import check_token

    with pytest.raises(BWSKError, match="no Hugging Face token"):
        check_token()
    with pytest.raises(BWSKError, match="rejected"):
        check_token("hf_not_a_known_token")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert check_token() == USER


def test_a_file_holding_the_token_is_never_uploaded(run_dir, tmp_path, hf_home, hub):
    leaky = shutil.copytree(run_dir, tmp_path / "run")
    path = leaky / "scratch-conventional" / "training_results.json"
    record = json.loads(path.read_text())
    record["hyperparameters"]["hub_token"] = TOKEN
    path.write_text(json.dumps(record))
    # The card's training configuration shows the hyperparameters, so README.md is the first to hold it.
    with pytest.raises(BWSKError, match="README.md contains your Hugging Face token") as caught:
        push(leaky, "tester/leaky", token=TOKEN)
    assert TOKEN not in "".join(traceback.format_exception(caught.value))
    assert hub_calls(hub) == [("GET", "whoami")]
