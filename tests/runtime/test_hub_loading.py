"""Models and Medusa heads named by hub id (`runtime.hub`), resolved from a Hugging Face cache that the
tests lay out from tiny models, offline (HF_HUB_OFFLINE=1): the same tokens as from the folder, revisions,
a local path winning over an id, official Medusa heads next to their base model, and the errors a user
sees, the CLI's included. No test reaches the network.

huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE once, into `huggingface_hub.constants`, when it is
first imported: in this process the tests set those constants; a child process gets the variables.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from huggingface_hub import constants, scan_cache_dir

from medusa.checkpoints import HeadsLoadError, load_heads, official_state_dict, save_official
from medusa.engine import Engine
from medusa.heads import MedusaConfig, random_heads
from medusa.tree import get_tree
from runtime.config import SamplingParams
from runtime.hub import HubId, hub_id
from runtime.loading import LoadedModel, ModelLoadError, load_model
from server.app import create_app
from tests.conftest import tiny_hf_model
from tests.server.support import tiny_engine, tiny_settings
from tests.tiny_tokenizer import tiny_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPT = [5, 6, 7, 8]
HEADS_REPO = "FasterDecoding/medusa-tiny"


def save_model(folder: Path, seed: int) -> Path:
    """A tiny Llama saved in shards (so the index and its shards are fetched) with its tokenizer."""
    tiny_hf_model("llama", seed=seed).save_pretrained(folder, safe_serialization=True, max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(folder)
    return folder


def cache_repo(cache: Path, repo_id: str, files: Path, refs: tuple[str, ...] = ("main",)) -> str:
    """Lay the folder `files` out in `cache` as huggingface_hub stores a download: each file a blob named by
    its hash, a snapshot folder named by the commit holding links to the blobs, and refs/<branch or tag>
    holding the commit. Returns the commit hash."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    names = sorted(p.relative_to(files).as_posix() for p in files.rglob("*") if p.is_file())
    digests = {name: hashlib.sha256((files / name).read_bytes()).hexdigest() for name in names}
    commit = hashlib.sha1(repr(sorted(digests.items())).encode()).hexdigest()  # 40 hex digits, as git's
    for name, digest in digests.items():
        blob = repo / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files / name, blob)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, offline, for this process and its children."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[int, Path]:
    """Two tiny models that greedy-decode differently, by seed."""
    root = tmp_path_factory.mktemp("models")
    return {seed: save_model(root / f"seed{seed}", seed) for seed in (0, 1)}


def greedy(loaded: LoadedModel, heads=None) -> list[int]:
    engine = Engine(loaded.model, loaded.tokenizer, loaded.eos_token_ids, max_batch_size=1,
                    max_total_tokens=64, heads=heads, tree=None if heads is None else get_tree("cpu"))
    return engine.generate([PROMPT], SamplingParams(max_new_tokens=12))[0]


@pytest.mark.parametrize("spec, expected", [
    ("org/name", HubId("org/name", None)),
    ("org/name@v1.0", HubId("org/name", "v1.0")),
    ("org/name@refs/pr/3", HubId("org/name", "refs/pr/3")),
    ("smollm2", None),  # the embedded model's name
    ("name", None),  # an id without its organisation is not taken for one
    ("./org/name", None),
    ("/models/org/name", None),
    ("~/name", None),
    ("org/na--me", None),  # not a valid repository id
])
def test_what_reads_as_a_hub_id(spec, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_id(spec) == expected
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub_id("org/name") is None  # a folder of that name is there


def test_the_laid_out_cache_is_what_huggingface_hub_reads(hub_cache, models):
    commit = cache_repo(hub_cache, "org/tiny", models[0], refs=("main", "v1"))
    (repo,) = scan_cache_dir(hub_cache).repos
    (revision,) = repo.revisions
    assert (repo.repo_id, repo.repo_type, revision.commit_hash) == ("org/tiny", "model", commit)
    assert revision.refs == {"main", "v1"}
    assert {f.file_name for f in revision.files} == {p.name for p in models[0].iterdir()}


def test_a_model_by_id_generates_what_its_folder_does(hub_cache, models):
    commit = cache_repo(hub_cache, "org/tiny", models[0])
    by_id = load_model("org/tiny")
    assert by_id.model_id == "org/tiny"
    assert by_id.path == hub_cache / "models--org--tiny" / "snapshots" / commit
    by_folder = load_model(str(models[0]))
    assert greedy(by_id) == greedy(by_folder)
    assert (by_id.commit, by_folder.commit) == (commit, None)
    settings = tiny_settings(medusa_heads="none")
    with TestClient(create_app(settings, by_id, engine=tiny_engine(by_id, settings))) as client:
        assert client.get("/info").json()["model_sha"] == commit  # TGI's /info names the commit


def test_a_revision_picks_its_snapshot(hub_cache, models):
    main = cache_repo(hub_cache, "org/tiny", models[0], refs=("main",))
    tagged = cache_repo(hub_cache, "org/tiny", models[1], refs=("v2",))
    expected = {seed: greedy(load_model(str(folder))) for seed, folder in models.items()}
    assert expected[0] != expected[1]
    cases = [("org/tiny", 0, main), ("org/tiny@v2", 1, tagged), (f"org/tiny@{main}", 0, main)]
    for spec, seed, commit in cases:
        loaded = load_model(spec)
        assert loaded.path.name == commit and greedy(loaded) == expected[seed], spec


def test_a_local_path_wins_over_the_id(hub_cache, models, tmp_path, monkeypatch):
    cache_repo(hub_cache, "org/tiny", models[0])
    monkeypatch.chdir(tmp_path)
    shutil.copytree(models[1], tmp_path / "org" / "tiny")
    loaded = load_model("org/tiny")
    assert loaded.path == Path("org/tiny") and loaded.model_id == "tiny"
    assert greedy(loaded) == greedy(load_model(str(models[1])))


def test_an_unknown_id_names_itself_and_the_offline_switch(hub_cache, models):
    cache_repo(hub_cache, "org/tiny", models[0])
    unknown = r"'nobody/nothing' is not a local path, and the model 'nobody/nothing' is not in the hub cache"
    with pytest.raises(ModelLoadError, match=unknown + r" .*HF_HUB_OFFLINE is set"):
        load_model("nobody/nothing")
    with pytest.raises(ModelLoadError, match=r"revision 'v9' of the model 'org/tiny' is not in the hub"):
        load_model("org/tiny@v9")


def test_a_hub_repository_without_config_says_so(hub_cache, tmp_path):
    gguf_only = tmp_path / "gguf-only"
    gguf_only.mkdir()
    (gguf_only / "tiny.Q4_0.gguf").write_bytes(b"GGUF")
    cache_repo(hub_cache, "org/tiny-GGUF", gguf_only)
    with pytest.raises(ModelLoadError, match=r"hub model 'org/tiny-GGUF' has no config.json.*GGUF files"):
        load_model("org/tiny-GGUF")


@pytest.mark.parametrize("weights", ["safetensors", "pt"])
def test_official_heads_by_id_serve_next_to_their_base_model_by_id(weights, hub_cache, models, tmp_path):
    """FasterDecoding's layout: config.json (medusa_num_heads, medusa_num_layers, base_model_name_or_path)
    and medusa_lm_head.safetensors or .pt, a projection per head."""
    cache_repo(hub_cache, "org/tiny", models[0])
    base = load_model("org/tiny")
    config = base.model.config
    heads = random_heads(MedusaConfig(hidden_size=config.hidden_size, vocab_size=config.vocab_size,
                                      shared_lm_head=False), seed=0, scale=0.3)
    folder = tmp_path / "official"
    save_official(heads, folder, base_model_name_or_path="org/tiny")
    if weights == "pt":
        (folder / "medusa_lm_head.safetensors").unlink()
        torch.save(official_state_dict(heads), folder / "medusa_lm_head.pt")
    cache_repo(hub_cache, HEADS_REPO, folder)

    by_id = load_heads(HEADS_REPO, config, base.model.lm_head)
    by_folder = load_heads(folder, config, base.model.lm_head)
    assert by_id.state_dict().keys() == by_folder.state_dict().keys()
    assert all(torch.equal(by_id.state_dict()[k], v) for k, v in by_folder.state_dict().items())
    # greedy speculation in float32 is token for token the plain output
    assert greedy(base, heads=by_id) == greedy(base)


def test_unknown_heads_id_names_itself(hub_cache):
    base = load_model(str(save_model(hub_cache.parent / "m", seed=0)))
    with pytest.raises(HeadsLoadError, match=r"'nobody/heads' is not a local path, and the Medusa heads or "
                                             r"draft layer 'nobody/heads' is not in the hub cache"):
        load_heads("nobody/heads", base.model.config, base.model.lm_head)


def test_the_cli_exits_with_the_message_not_a_traceback(hub_cache, models):
    """A child process: the variables (not this process's constants) put huggingface_hub offline and on
    the laid-out cache; the model by id loads from it, then the heads' id is not there."""
    cache_repo(hub_cache, "org/tiny", models[0])
    done = subprocess.run([sys.executable, "-m", "server.cli", "--model", "org/tiny", "--medusa-heads",
                           "nobody/heads", "--max-input-tokens", "32", "--max-total-tokens", "64"],
                          cwd=REPO_ROOT, env=os.environ, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("medusa-serve: 'nobody/heads' is not a local path") and "HF_HUB_OFFLINE" in last


# --- Downloading: a stand-in for the hub on loopback (HF_ENDPOINT) ---------------------------------


class StandInHub(http.server.ThreadingHTTPServer):
    """The two calls huggingface_hub's snapshot_download makes, for repositories held in memory: the
    repository's file list at a revision (`/api/models/{id}/revision/{rev}`) and each file
    (`/{id}/resolve/{commit}/{file}`, HEAD for its metadata, then GET). Records what it was asked."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), StandInHubHandler)
        self.repos: dict[str, tuple[str, dict[str, bytes]]] = {}  # id -> (commit, {file: content})
        self.fetched: list[tuple[str, str]] = []  # (id, file) for each GET of a file
        self.authorizations: set[str | None] = set()

    def add(self, repo_id: str, files: dict[str, bytes]) -> None:
        self.repos[repo_id] = (hashlib.sha1(repo_id.encode()).hexdigest(), files)


class StandInHubHandler(http.server.BaseHTTPRequestHandler):
    server: StandInHub

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._answer(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def log_message(self, format, *args) -> None:  # noqa: A002 (the signature it overrides)
        pass

    def _answer(self, body: bool) -> None:
        self.server.authorizations.add(self.headers.get("Authorization"))
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        repo_id = (api or resolve)[1] if api or resolve else None
        if repo_id not in self.server.repos:
            return self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"}, body)
        commit, files = self.server.repos[repo_id]
        revision = (api or resolve)[2]
        if revision not in ("main", commit):
            return self._send(404, b"{}", {"X-Error-Code": "RevisionNotFound"}, body)
        if api:
            info = {"id": repo_id, "sha": commit, "siblings": [{"rfilename": name} for name in files]}
            return self._send(200, json.dumps(info).encode(), {}, body)
        name = resolve[3]
        if name not in files:
            return self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"}, body)
        if body:
            self.server.fetched.append((repo_id, name))
        content = files[name]
        self._send(200, content, {"X-Repo-Commit": commit,
                                  "ETag": f'"{hashlib.sha256(content).hexdigest()}"'}, body)

    def _send(self, status: int, content: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(content)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(content)


@pytest.fixture
def stand_in_hub():
    hub = StandInHub()
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    yield hub
    hub.shutdown()
    hub.server_close()


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


RESOLVE_IN_A_CHILD = """
import json
from medusa.checkpoints import HeadsLoadError, resolve_heads
from runtime.loading import ModelLoadError, resolve

drafters = ("heads-pt", "heads-both", "eagle-bin", "eagle-st")
found = {"model": str(resolve("org/tiny")), **{name: str(resolve_heads(f"org/{name}")) for name in drafters}}
refused = [("nobody/nothing", resolve, ModelLoadError), ("org/tiny@v9", resolve, ModelLoadError),
           ("nobody/heads", resolve_heads, HeadsLoadError)]
for spec, load, error in refused:
    try:
        load(spec)
    except error as err:
        found[spec] = str(err)
print(json.dumps(found))
"""


def test_download_fetches_only_what_the_loaders_read(stand_in_hub, models, tmp_path, monkeypatch):
    """A child process told by the variables where the hub, the cache and the token are: the model (with
    a .bin and a GGUF copy of its weights beside the safetensors shards) and two official heads
    repositories are fetched; the snapshot then loads offline and decodes as the folder does."""
    junk = {"pytorch_model.bin": b"pickled weights", "tiny.Q4_0.gguf": b"GGUF", "README.md": b"# tiny"}
    stand_in_hub.add("org/tiny", folder_files(models[0]) | junk)
    stand_in_hub.add("org/heads-pt", {"config.json": b"{}", "medusa_lm_head.pt": b"pt", "README.md": b"#"})
    stand_in_hub.add("org/heads-both", {"config.json": b"{}", "medusa_lm_head.pt": b"pt",
                                        "medusa_lm_head.safetensors": b"st"})
    # official EAGLE-1/2 layers: pickled weights only, and both
    stand_in_hub.add("org/eagle-bin", {"config.json": b"{}", "pytorch_model.bin": b"pt", "README.md": b"#"})
    stand_in_hub.add("org/eagle-st", {"config.json": b"{}", "pytorch_model.bin": b"pt",
                                      "model.safetensors": b"st"})
    cache = tmp_path / "hub"
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{stand_in_hub.server_port}",
           "HF_HUB_CACHE": str(cache), "HF_TOKEN": "hf_stand_in", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run([sys.executable, "-c", RESOLVE_IN_A_CHILD], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])

    fetched = {repo: sorted(name for r, name in stand_in_hub.fetched if r == repo)
               for repo in ("org/tiny", "org/heads-pt", "org/heads-both", "org/eagle-bin", "org/eagle-st")}
    assert fetched == {"org/tiny": sorted(p.name for p in models[0].iterdir()),
                       "org/heads-pt": ["config.json", "medusa_lm_head.pt"],
                       "org/heads-both": ["config.json", "medusa_lm_head.safetensors"],
                       "org/eagle-bin": ["config.json", "pytorch_model.bin"],
                       "org/eagle-st": ["config.json", "model.safetensors"]}
    assert len(stand_in_hub.fetched) == sum(map(len, fetched.values()))  # each file once
    assert stand_in_hub.authorizations == {"Bearer hf_stand_in"}
    assert "'nobody/nothing' is not a local path, and the hub has no model of that" in found["nobody/nothing"]
    assert "the model 'org/tiny' on the hub has no revision 'v9'" in found["org/tiny@v9"]
    assert "the hub has no Medusa heads or draft layer of that id" in found["nobody/heads"]

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    by_id = load_model("org/tiny")
    assert by_id.path == Path(found["model"])
    assert greedy(by_id) == greedy(load_model(str(models[0])))
