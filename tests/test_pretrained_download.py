"""The hub download ("Loading and saving": download, resolve_checkpoint) against a local HTTP server on 127.0.0.1.

The server plays the Hugging Face hub: files under /<repo_id>/resolve/main/<file>, Range requests answered
with 206 and Content-Range, the file's SHA-256 as its ETag (as the hub gives for large files). Switches
make it misbehave: cut the connection part way through a file, send a wrong SHA-256, serve a truncated
file with a matching Content-Length, change a file between two tries (If-Range is honoured, as RFC 9110 says), answer 404 for model.safetensors (so the client falls back to the
sharded index). Every request is recorded, so the tests can see a resume use a Range header and a cache
hit make no request at all. NANOGPT2_HUB_URL points at the server and NANOGPT2_CACHE at a temporary
folder, and proxies are switched off, so nothing but 127.0.0.1 is ever contacted.
"""

import hashlib
import http.server
import json
import os
import re
import shutil
import threading
import urllib.error

import pytest
import torch

import convert_tf
import imagegpt
import nanogpt2

SMALL = dict(n_layer=1, n_embd=32, n_head=2, n_positions=128, vocab_size=50257)  # the real vocabulary
REPO = "test-owner/tiny-gpt2"
PROMPT_IDS = [15496, 995, 11, 428, 318, 402, 11571, 12, 17, 0]  # "Hello world, this is GPT-2!"


class FakeHub(http.server.ThreadingHTTPServer):
    """Files from a dict {"/<repo>/resolve/main/<name>": bytes}, with switches to misbehave."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeHubHandler)
        self.files = {}
        self.requests = []  # (path, Range header or None), in order
        self.if_ranges = []  # the If-Range header of each request, or None
        self.cut_after = {}  # name -> bytes: send the full Content-Length, write only this many, close (once)
        self.wrong_sha = set()  # names whose ETag is a SHA-256 of something else
        self.missing = set()  # names answered with 404
        self.ignore_range = False  # answer Range requests with 200 and the whole file, as some servers do
        self.wrong_range = False  # answer Range requests with 206 and the file from byte 0 (a broken proxy)
        self.no_length = set()  # names sent with no Content-Length and no ETag: the body ends when the connection does
        self.chunked = set()  # names sent with Transfer-Encoding: chunked (no length); a cut drops the connection mid-chunk
        self.endless = set()  # names whose body, after the file, never ends (sent with no length)
        self.raw = {}  # name -> bytes sent as the whole answer, status line and headers included (not HTTP)
        self.always_206 = False  # answer even a request for the whole file with 206 and part of it
        self.lock = threading.Lock()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def add(self, repo, directory):
        for name in os.listdir(directory):
            with open(os.path.join(directory, name), "rb") as f:
                self.files[f"/{repo}/resolve/main/{name}"] = f.read()

    def names_requested(self):
        return [path.rsplit("/", 1)[1] for path, _ in self.requests]


class FakeHubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        hub = self.server
        name = self.path.rsplit("/", 1)[1]
        with hub.lock:
            hub.requests.append((self.path, self.headers.get("Range")))
            hub.if_ranges.append(self.headers.get("If-Range"))
            cut = hub.cut_after.pop(name, None)
        if name in hub.raw:
            self.wfile.write(hub.raw[name])
            self.close_connection = True
            return
        body = hub.files.get(self.path)
        if body is None or name in hub.missing:
            self.send_error(404)
            return
        sha = hashlib.sha256(b"not the file" if name in hub.wrong_sha else body).hexdigest()
        start = 0
        match = None if hub.ignore_range else re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if self.headers.get("If-Range") not in (None, f'"{sha}"'):  # the file changed: send all of the new one
            match = None
        if name in hub.chunked:
            self.protocol_version = "HTTP/1.1"  # chunked encoding needs HTTP/1.1
        if hub.always_206 and not match:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes 0-99/{len(body)}")
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(body[:100])
            return
        if match:
            start = int(match.group(1))
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            if hub.wrong_range:
                start = 0
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        if cut is not None:  # the connection drops part way
            payload = payload[:cut]
            self.close_connection = True
        if name in hub.chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(payload), 4096):
                piece = payload[i:i + 4096]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            if cut is None:
                self.wfile.write(b"0\r\n\r\n")  # the last chunk; without it the body is cut short
            self.close_connection = True
        elif name in hub.no_length or name in hub.endless:
            self.end_headers()  # HTTP/1.0: the body is whatever comes before the connection closes
            self.wfile.write(payload)
            while name in hub.endless:
                try:
                    self.wfile.write(b"\0" * (1 << 20))
                except OSError:  # the client hung up: what it should do
                    break
        else:  # a cut connection: the client sees fewer bytes than Content-Length promised
            self.send_header("Content-Length", str(len(body) - start))
            self.send_header("ETag", f'"{sha}"')
            self.end_headers()
            self.wfile.write(payload)
        self.wfile.flush()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running FakeHub; NANOGPT2_HUB_URL points at it and NANOGPT2_CACHE at tmp_path/cache."""
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("NANOGPT2_HUB_URL", server.url)
    monkeypatch.setenv("NANOGPT2_CACHE", str(tmp_path / "cache"))
    for proxy in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.chdir(tmp_path)  # so that REPO can never name a local directory
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory, model) of a small GPT2LMHeadModel saved by save_pretrained, to serve."""
    directory = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    model = nanogpt2.GPT2LMHeadModel(nanogpt2.GPT2Config(**SMALL)).eval()
    model.save_pretrained(directory)
    return directory, model


def logits(model, device):
    with torch.no_grad():
        return model.to(device)(torch.tensor([PROMPT_IDS], device=device)).logits


def weight_requests(hub):
    """The (path, Range) of each request for model.safetensors, in order (generation_config.json follows them)."""
    return [request for request in hub.requests if request[0].endswith("/model.safetensors")]


def cached(*names):
    return os.path.join(os.environ["NANOGPT2_CACHE"], *REPO.split("/"), *names)


def test_download_shows_progress_and_loads_the_served_model(hub, checkpoint, capfd, device):
    directory, source = checkpoint
    hub.add(REPO, directory)
    loaded = nanogpt2.GPT2LMHeadModel.from_pretrained(REPO, device=device)
    assert hub.names_requested() == ["config.json", "model.safetensors", "generation_config.json"]
    assert torch.equal(logits(loaded, device), logits(source, device))  # same weights, same code: bit for bit
    assert loaded.generation_config == source.generation_config
    err = capfd.readouterr().err
    size_mb = os.path.getsize(directory / "model.safetensors") / 1e6
    assert f"downloading model.safetensors: {size_mb:.1f} / {size_mb:.1f} MB (100%)" in err
    assert "downloading config.json" in err
    assert sorted(os.listdir(cached())) == ["config.json", "generation_config.json", "model.safetensors"]  # no .part


def test_second_load_is_a_cache_hit_with_no_request_even_with_the_server_down(hub, checkpoint, device):
    directory, source = checkpoint
    hub.add(REPO, directory)
    nanogpt2.GPT2LMHeadModel.from_pretrained(REPO, device=device)
    n_requests = len(hub.requests)
    hub.shutdown()
    hub.server_close()  # from now on a request would be refused
    again = nanogpt2.GPT2LMHeadModel.from_pretrained(REPO, device=device)
    assert len(hub.requests) == n_requests
    assert torch.equal(logits(again, device), logits(source, device))


def test_released_names_map_to_their_hub_repositories(hub, checkpoint, device):
    directory, source = checkpoint
    hub.add("openai-community/gpt2", directory)
    loaded = nanogpt2.GPT2LMHeadModel.from_pretrained("gpt2", device=device)
    assert [path for path, _ in hub.requests] == ["/openai-community/gpt2/resolve/main/config.json",
                                                  "/openai-community/gpt2/resolve/main/model.safetensors",
                                                  "/openai-community/gpt2/resolve/main/generation_config.json"]
    assert torch.equal(logits(loaded, device), logits(source, device))


def test_interrupted_download_fails_clearly_then_resumes_with_a_range_request(hub, checkpoint, device):
    directory, source = checkpoint
    hub.add(REPO, directory)
    size = os.path.getsize(directory / "model.safetensors")
    hub.cut_after["model.safetensors"] = 1_000_000
    with pytest.raises(nanogpt2.CheckpointError, match=f"stopped at 1000000 of {size} bytes; run again to resume"):
        nanogpt2.GPT2LMHeadModel.from_pretrained(REPO, device=device)
    assert not os.path.exists(cached("model.safetensors"))  # a partial file never looks like a cached one
    assert os.path.getsize(cached("model.safetensors.part")) == 1_000_000
    loaded = nanogpt2.GPT2LMHeadModel.from_pretrained(REPO, device=device)
    assert weight_requests(hub)[-1] == (f"/{REPO}/resolve/main/model.safetensors", "bytes=1000000-")
    assert hub.names_requested() == ["config.json", "model.safetensors", "model.safetensors",  # config was cached
                                     "generation_config.json"]
    assert not os.path.exists(cached("model.safetensors.part"))
    assert torch.equal(logits(loaded, device), logits(source, device))


def test_a_server_that_ignores_range_gets_the_whole_file_again(hub, checkpoint, device):
    directory, source = checkpoint
    hub.add(REPO, directory)
    os.makedirs(cached())
    with open(cached("model.safetensors.part"), "wb") as f:
        f.write(b"junk that a 200 reply must overwrite")
    sha = hashlib.sha256(hub.files[f"/{REPO}/resolve/main/model.safetensors"]).hexdigest()
    with open(cached("model.safetensors.part.if-range"), "w") as f:  # the version the .part was started under
        f.write(f'"{sha}"')
    hub.ignore_range = True
    loaded = nanogpt2.GPT2LMHeadModel.from_pretrained(REPO, device=device)
    assert weight_requests(hub)[-1][1] == "bytes=36-"  # it asked to resume, got a 200 with the whole file
    assert torch.equal(logits(loaded, device), logits(source, device))


def test_wrong_sha256_is_rejected_and_deleted_then_downloaded_afresh(hub, checkpoint, device):
    directory, source = checkpoint
    hub.add(REPO, directory)
    hub.wrong_sha.add("model.safetensors")
    with pytest.raises(nanogpt2.CheckpointError, match="model.safetensors is corrupt: sha256 .*run again"):
        nanogpt2.GPT2LMHeadModel.from_pretrained(REPO, device=device)
    assert not os.path.exists(cached("model.safetensors")) and not os.path.exists(cached("model.safetensors.part"))
    hub.wrong_sha.clear()
    loaded = nanogpt2.GPT2LMHeadModel.from_pretrained(REPO, device=device)
    assert hub.requests[-1][1] is None  # afresh, from byte 0
    assert torch.equal(logits(loaded, device), logits(source, device))


def test_truncated_file_with_matching_length_is_rejected_at_download_and_never_cached(hub, checkpoint, device):
    directory, _ = checkpoint
    hub.add(REPO, directory)
    path = f"/{REPO}/resolve/main/model.safetensors"
    whole = hub.files[path]
    hub.files[path] = whole[: len(whole) // 2]  # the server itself holds half the file
    with pytest.raises(nanogpt2.CheckpointError, match=f"is not a whole safetensors file \\({len(whole) // 2} bytes; "
                                                       f"its header says {len(whole)}\\); deleted it: run again"):
        nanogpt2.GPT2LMHeadModel.from_pretrained(REPO, device=device)
    assert sorted(os.listdir(cached())) == ["config.json"]  # nothing of the bad file stays to fail every later run


def test_sharded_checkpoint_is_fetched_through_its_index_when_there_is_no_single_file(hub, checkpoint, tmp_path,
                                                                                     device):
    directory, source = checkpoint
    shards = tmp_path / "sharded"
    shards.mkdir()
    state_dict = nanogpt2.load_safetensors(directory / "model.safetensors")
    names = sorted(state_dict)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        nanogpt2.save_safetensors({k: state_dict[k] for k in part}, shards / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (shards / "config.json").write_bytes((directory / "config.json").read_bytes())
    hub.add(REPO, shards)
    loaded = nanogpt2.GPT2LMHeadModel.from_pretrained(REPO, device=device)
    assert hub.names_requested() == ["config.json", "model.safetensors", "model.safetensors.index.json",
                                     "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                     "generation_config.json"]  # (not served here: a 404, which is fine)
    assert torch.equal(logits(loaded, device), logits(source, device))


def test_unreachable_hub_gives_a_checkpoint_error_saying_how_to_work_offline(hub, monkeypatch):
    port = hub.server_address[1]
    hub.shutdown()
    hub.server_close()  # nothing listens on the port any more
    monkeypatch.setenv("NANOGPT2_HUB_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(nanogpt2.CheckpointError, match="could not download .* To use it offline, put its config.json"):
        nanogpt2.resolve_checkpoint(REPO)


def test_repository_missing_on_the_hub_gives_a_checkpoint_error(hub):
    with pytest.raises(nanogpt2.CheckpointError, match="could not download test-owner/absent"):
        nanogpt2.resolve_checkpoint("test-owner/absent")
    assert hub.names_requested() == ["config.json"]
    assert not os.path.exists(os.environ["NANOGPT2_CACHE"])  # no empty folders left by the 404


def test_a_name_that_is_neither_a_directory_nor_a_repo_id_is_never_requested(hub):
    with pytest.raises(nanogpt2.CheckpointError, match="neither a directory nor a known name"):
        nanogpt2.resolve_checkpoint("no-such-model")
    assert hub.requests == []


@pytest.mark.parametrize("path", ["./my-checkpoint", "../my-checkpoint"])
def test_a_missing_relative_path_is_never_sent_to_the_hub(hub, path):
    with pytest.raises(nanogpt2.CheckpointError, match="neither a directory"):
        nanogpt2.resolve_checkpoint(path)
    assert hub.requests == []


# --- Resuming never splices two versions of a file ---------------------------------------------------------

@pytest.mark.parametrize("module", [nanogpt2, imagegpt], ids=["nanogpt2", "imagegpt"])
def test_a_file_changed_between_tries_is_fetched_afresh_not_spliced(hub, module, tmp_path):
    path = f"/{REPO}/resolve/main/weights.bin"
    old, new = bytes(range(256)) * 400, bytes(reversed(range(256))) * 400
    hub.files[path] = old
    hub.cut_after["weights.bin"] = 30_000
    dest = str(tmp_path / "dl" / "weights.bin")
    with pytest.raises(module.CheckpointError, match="stopped at 30000 of 102400 bytes"):
        module.download(hub.url + path, dest, quiet=True)
    hub.files[path] = new  # a new version is uploaded before the retry
    module.download(hub.url + path, dest, quiet=True)
    old_etag = f'"{hashlib.sha256(old).hexdigest()}"'
    assert hub.requests[-1] == (path, "bytes=30000-") and hub.if_ranges[-1] == old_etag
    with open(dest, "rb") as f:
        assert f.read() == new  # all of the new version, not 30 kB of the old one and the rest of the new
    assert os.listdir(tmp_path / "dl") == ["weights.bin"]  # no .part, no .part.if-range


@pytest.mark.parametrize("module", [nanogpt2, imagegpt], ids=["nanogpt2", "imagegpt"])
def test_an_unchanged_file_resumes_with_if_range_and_a_404_makes_no_folder(hub, module, tmp_path):
    path = f"/{REPO}/resolve/main/weights.bin"
    hub.files[path] = body = bytes(range(256)) * 400
    hub.cut_after["weights.bin"] = 30_000
    dest = str(tmp_path / "dl" / "weights.bin")
    with pytest.raises(module.CheckpointError, match="run again to resume"):
        module.download(hub.url + path, dest, quiet=True)
    module.download(hub.url + path, dest, quiet=True)
    assert hub.if_ranges[-1] == f'"{hashlib.sha256(body).hexdigest()}"'
    with open(dest, "rb") as f:
        assert f.read() == body
    with pytest.raises(urllib.error.HTTPError):
        module.download(hub.url + "/no/such/file", str(tmp_path / "absent" / "deeper" / "file"), quiet=True)
    assert not os.path.exists(tmp_path / "absent")


# --- Complete or absent: what cannot be checked by its length is checked by its format -----------------------

DOWNLOADERS = [nanogpt2, imagegpt, convert_tf]
DOWNLOADER_IDS = ["nanogpt2", "imagegpt", "convert_tf"]


@pytest.mark.parametrize("how", ["no_length", "chunked"])
def test_a_body_cut_short_with_no_length_is_deleted_then_fetched_again(hub, checkpoint, how, device):
    directory, source = checkpoint
    hub.add(REPO, directory)
    getattr(hub, how).add("model.safetensors")
    hub.cut_after["model.safetensors"] = 1_000_000
    # no length: the body just ends, and only the safetensors header can tell; chunked: the connection drops
    # inside a chunk, which http.client raises as IncompleteRead: both are one line
    expected = "is not a whole safetensors file" if how == "no_length" else r"stopped at \d+ bytes \(IncompleteRead"
    with pytest.raises(nanogpt2.CheckpointError, match=expected) as e:
        nanogpt2.GPT2LMHeadModel.from_pretrained(REPO, device=device)
    assert "\n" not in str(e.value)
    assert not os.path.exists(cached("model.safetensors"))  # never renamed into the cache as if complete
    loaded = nanogpt2.GPT2LMHeadModel.from_pretrained(REPO, device=device)  # the next run fetches it (or resumes)
    assert torch.equal(logits(loaded, device), logits(source, device))


@pytest.mark.parametrize("module", DOWNLOADERS, ids=DOWNLOADER_IDS)
@pytest.mark.parametrize("name, body, problem", [
    ("config.json", b"<html><body>Rate limited</body></html>", "is not valid JSON"),
    ("model.safetensors", b"<html><body>Rate limited</body></html>", "is not a safetensors file"),
    ("pytorch_model.bin", None, "is a zip archive cut short"),
])
def test_a_wrong_file_sent_with_status_200_is_never_cached(hub, module, name, body, problem, tmp_path):
    if body is None:  # a real torch.save zip, its last 100 bytes (the central directory's end) missing
        torch.save({"w": torch.ones(3)}, tmp_path / "whole.bin")
        body = (tmp_path / "whole.bin").read_bytes()[:-100]
    path = f"/{REPO}/resolve/main/{name}"
    hub.files[path] = body
    hub.no_length.add(name)  # no ETag either: only the format can tell
    dest = tmp_path / "dl" / name
    with pytest.raises(module.CheckpointError, match=f"{problem}.*deleted it"):
        module.download(hub.url + path, str(dest), quiet=True)
    assert os.listdir(tmp_path / "dl") == []  # no file, no .part: the next run asks again


@pytest.mark.parametrize("module", DOWNLOADERS, ids=DOWNLOADER_IDS)
def test_an_endless_body_stops_at_what_its_header_promised(hub, module, checkpoint, tmp_path):
    directory, _ = checkpoint
    path = f"/{REPO}/resolve/main/model.safetensors"
    hub.files[path] = (directory / "model.safetensors").read_bytes()
    hub.endless.add("model.safetensors")  # the file, then zeros for ever, with no length
    dest = tmp_path / "dl" / "model.safetensors"
    size = len(hub.files[path])
    with pytest.raises(module.CheckpointError, match=f"sent more than the {size} bytes its safetensors header "
                                                     "promised; stopped and deleted it"):
        module.download(hub.url + path, str(dest), quiet=True)
    assert os.listdir(tmp_path / "dl") == []


@pytest.mark.parametrize("module", DOWNLOADERS, ids=DOWNLOADER_IDS)
def test_an_endless_json_body_stops_at_the_json_limit(hub, module, tmp_path, monkeypatch):
    monkeypatch.setattr(module, "MAX_JSON_BYTES", 3 << 20)  # the same code path as 64 MB, in a tenth of the time
    path = f"/{REPO}/resolve/main/config.json"
    hub.files[path] = b'{"n_layer": 1}'
    hub.endless.add("config.json")
    with pytest.raises(module.CheckpointError, match=f"sent more than the {3 << 20} bytes the limit for a JSON file"):
        module.download(hub.url + path, str(tmp_path / "dl" / "config.json"), quiet=True)
    assert os.listdir(tmp_path / "dl") == []


class FakeDisk:
    """shutil.disk_usage with `free` bytes on the disk at first, less whatever .part files have taken since."""

    def __init__(self, folder, free):
        self.folder, self.free = folder, free

    def __call__(self, path):
        taken = sum(os.path.getsize(os.path.join(self.folder, f)) for f in os.listdir(self.folder)
                    if f.endswith(".part")) if os.path.isdir(self.folder) else 0
        return shutil._ntuple_diskusage(10**12, 10**12 - self.free + taken, self.free - taken)


@pytest.mark.parametrize("module", DOWNLOADERS, ids=DOWNLOADER_IDS)
def test_a_download_never_fills_the_disk(hub, module, tmp_path, monkeypatch):
    dl = tmp_path / "dl"
    path = f"/{REPO}/resolve/main/weights.dat"  # a format download_problem does not judge: only the disk bounds it
    hub.files[path] = b"x" * 1000
    hub.endless.add("weights.dat")
    monkeypatch.setattr(shutil, "disk_usage", FakeDisk(dl, module.MIN_FREE_BYTES + (5 << 20)))
    with pytest.raises(module.CheckpointError, match=f"less than {module.MIN_FREE_BYTES >> 20} MB is left on the "
                                                     "disk .*free some space and run again"):
        module.download(hub.url + path, str(dl / "weights.dat"), quiet=True)
    assert os.path.getsize(dl / "weights.dat.part") <= 6 << 20  # stopped within a chunk of the margin
    # With a length that does not fit, nothing is written at all.
    hub.endless.clear()
    hub.files[path] = b"x" * (6 << 20)
    monkeypatch.setattr(shutil, "disk_usage", FakeDisk(tmp_path / "dl2", module.MIN_FREE_BYTES + (5 << 20)))
    free = (module.MIN_FREE_BYTES + (5 << 20)) / 1e6
    with pytest.raises(module.CheckpointError, match=f"needs 6 MB, but only {free:.0f} MB are free"):
        module.download(hub.url + path, str(tmp_path / "dl2" / "weights.dat"), quiet=True)
    assert os.listdir(tmp_path / "dl2") == ["weights.dat.part.if-range"]


def test_a_206_reply_from_the_wrong_offset_is_never_spliced(hub, checkpoint, device):
    directory, source = checkpoint
    hub.add(REPO, directory)
    os.makedirs(cached())
    body = hub.files[f"/{REPO}/resolve/main/model.safetensors"]
    with open(cached("model.safetensors.part"), "wb") as f:
        f.write(body[:1000])
    with open(cached("model.safetensors.part.if-range"), "w") as f:
        f.write(f'"{hashlib.sha256(body).hexdigest()}"')
    hub.wrong_range = True  # asked for bytes=1000-, it answers 206 with the file from byte 0
    loaded = nanogpt2.GPT2LMHeadModel.from_pretrained(REPO, device=device)
    requests = weight_requests(hub)
    assert requests[-2][1] == "bytes=1000-" and requests[-1][1] is None  # then afresh, from zero
    assert torch.equal(logits(loaded, device), logits(source, device))


@pytest.mark.parametrize("module", DOWNLOADERS, ids=DOWNLOADER_IDS)
@pytest.mark.parametrize("answer", [b"HTTP/1.1 abc OK\r\n\r\n", b"garbage\r\n\r\n",
                                    b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 150 + b"\r\n",
                                    b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n"])
def test_an_answer_that_is_not_http_is_one_line(hub, module, answer, tmp_path):
    hub.raw["config.json"] = answer
    with pytest.raises(module.CheckpointError, match="the server's answer is not valid HTTP") as e:
        module.download(f"{hub.url}/{REPO}/resolve/main/config.json", str(tmp_path / "dl" / "config.json"), quiet=True)
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "dl")


def test_part_of_a_file_sent_for_a_request_of_the_whole_is_refused(hub, checkpoint):
    directory, _ = checkpoint
    hub.add(REPO, directory)
    hub.always_206 = True
    with pytest.raises(nanogpt2.CheckpointError, match=r"asked for the whole file, the server sent part of it \(206"):
        nanogpt2.resolve_checkpoint(REPO)
    assert not os.path.exists(cached("config.json"))
