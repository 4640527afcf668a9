"""Nothing a model folder, an index or a hub says reaches outside the folder, and nothing in it blocks forever.

A model folder is untrusted input: a downloaded repository or a folder someone shared. Its
model.safetensors.index.json names the shard files to fetch and read; the folder may hold links and special
files. The promise ("Loading and saving", Part III: file_named_in, regular_file_in, shard_names):
- a shard name is a plain file name inside the folder; `../x`, `/abs/x`, `sub/x` and non-strings are refused
  with one line naming the index and the name, before anything is read or downloaded (pip and git refuse
  paths that escape their trees the same way);
- a file that links out of the folder, or a FIFO or device in place of a file, is refused, never followed
  or waited on; Hugging Face's own cache layout (snapshots/<rev>/ linking into ../../blobs/) still loads;
- the same for an ImageGPT palette and a folder of PNGs.
Both model files are held to it, against local folders and a fake hub on 127.0.0.1 (test_pretrained_download).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import imagegpt
import nanogpt2
from helpers import examples
from test_pretrained_download import REPO, hub  # noqa: F401 (hub is a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = [nanogpt2, imagegpt]
IDS = ["nanogpt2", "imagegpt"]


def tiny(module):
    """A small model of each kind: (class, model)."""
    torch.manual_seed(0)
    if module is nanogpt2:
        cls, config = nanogpt2.GPT2LMHeadModel, nanogpt2.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=8,
                                                                     vocab_size=32)
    else:
        cls, config = imagegpt.ImageGPTForCausalImageModeling, imagegpt.ImageGPTConfig(
            n_layer=1, n_embd=16, n_head=2, n_positions=16, vocab_size=9)
    return cls, cls(config).eval()


def sharded(module, model, folder, names=("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")):
    """Save model into folder as two shards and an index that lists them under `names`; returns the
    {tensor: shard} map. The shards are written under their plain names, whatever `names` says."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    state = module.load_safetensors(folder / "model.safetensors")
    os.remove(folder / "model.safetensors")
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        module.save_safetensors({k: state[k] for k in part}, folder / f"model-0000{i + 1}-of-00002.safetensors")
        weight_map.update(dict.fromkeys(part, names[i]))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


class no_hang:
    """Fail the test, instead of hanging the suite, if the block takes longer than `seconds` (a FIFO opened
    for reading waits for a writer forever)."""

    def __init__(self, seconds=10):
        self.seconds = seconds

    def __enter__(self):
        def fail(signum, frame):
            raise AssertionError(f"blocked for {self.seconds} s")

        self.old = signal.signal(signal.SIGALRM, fail)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


# --- Shard names from a local index ---------------------------------------------------------------------


@pytest.mark.parametrize("module", MODULES, ids=IDS)
@pytest.mark.parametrize("bad", ["../outside.safetensors", "ABSOLUTE", "sub/model-00002-of-00002.safetensors",
                                 "..", "", 7, None, ["x.safetensors"], "model.bin"])
def test_a_shard_name_that_is_not_a_plain_file_name_is_refused_before_anything_is_read(module, bad, tmp_path):
    cls, model = tiny(module)
    folder = tmp_path / "model"
    outside = tmp_path / "outside.safetensors"  # a valid shard sits right there: it must never be read
    (folder / "sub").mkdir(parents=True)
    if bad == "ABSOLUTE":
        bad = str(outside)
    sharded(module, model, folder, names=("model-00001-of-00002.safetensors", bad))
    state = module.load_safetensors(folder / "model-00002-of-00002.safetensors")
    module.save_safetensors(state, outside)
    module.save_safetensors(state, folder / "sub" / "model-00002-of-00002.safetensors")
    with pytest.raises(module.CheckpointError, match="model.safetensors.index.json names the (file|shard) ") as e:
        cls.from_pretrained(folder)
    assert "\n" not in str(e.value) and repr(bad) in str(e.value)  # one line, naming the name


@pytest.mark.parametrize("module", MODULES, ids=IDS)
@pytest.mark.parametrize("index", [{}, {"weight_map": []}, {"weight_map": {}}, [], "text", {"metadata": {}}])
def test_an_index_without_a_weight_map_is_one_clear_error(module, index, tmp_path):
    cls, model = tiny(module)
    sharded(module, model, tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(module.CheckpointError, match='has no "weight_map"'):
        cls.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_bytes(b'{"weight_map": {"a": "b.safetensors"')  # cut short
    with pytest.raises(module.CheckpointError, match="is not valid JSON"):
        cls.from_pretrained(tmp_path)


@pytest.mark.parametrize("module", MODULES, ids=IDS)
def test_a_plain_sharded_folder_still_loads(module, tmp_path):
    cls, model = tiny(module)
    sharded(module, model, tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


# --- Links and special files ---------------------------------------------------------------------------


@pytest.mark.parametrize("module", MODULES, ids=IDS)
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "model-00002-of-00002.safetensors",
                                  "generation_config.json"])
def test_a_file_that_links_out_of_the_folder_is_refused(module, name, tmp_path):
    cls, model = tiny(module)
    folder, elsewhere = tmp_path / "model", tmp_path / "elsewhere"
    elsewhere.mkdir()
    if name.startswith("model-"):
        sharded(module, model, folder)
    else:
        model.save_pretrained(folder)
    os.replace(folder / name, elsewhere / name)  # the real file lives outside; the folder holds a link to it
    os.symlink(elsewhere / name, folder / name)
    with pytest.raises(module.CheckpointError, match=f"{name} is a link to .*outside"):
        cls.from_pretrained(folder)


@pytest.mark.parametrize("module", MODULES, ids=IDS)
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "model-00001-of-00002.safetensors",
                                  "model.safetensors.index.json", "generation_config.json"])
def test_a_fifo_or_device_in_place_of_a_file_is_refused_without_blocking(module, name, tmp_path):
    cls, model = tiny(module)
    if name.startswith("model-") or name.endswith("index.json"):
        sharded(module, model, tmp_path)
    else:
        model.save_pretrained(tmp_path)
    os.remove(tmp_path / name)
    os.mkfifo(tmp_path / name)  # nobody writes to it: opening it to read would wait forever
    with no_hang(), pytest.raises(module.CheckpointError, match=f"{name} is a FIFO, expected a regular file"):
        cls.from_pretrained(tmp_path)
    os.remove(tmp_path / name)
    os.symlink("/dev/zero", tmp_path / name)  # endless zeros; also a link out of the folder
    with no_hang(), pytest.raises(module.CheckpointError, match=f"{name} is a link to /dev/zero"):
        cls.from_pretrained(tmp_path)


@pytest.mark.parametrize("module", MODULES, ids=IDS)
def test_hugging_face_cache_snapshots_that_link_into_blobs_still_load(module, tmp_path):
    """huggingface_hub's cache: models--owner--name/snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    cls, model = tiny(module)
    repo = tmp_path / "models--owner--name"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    sharded(module, model, snapshot)
    blobs.mkdir()
    for name in os.listdir(snapshot):
        os.replace(snapshot / name, blobs / f"blob-{name}")
        os.symlink(f"../../blobs/blob-{name}", snapshot / name)
    loaded = cls.from_pretrained(snapshot)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


# --- A tensor whose dtype label lies at the same byte size -------------------------------------------------


@pytest.mark.parametrize("module", MODULES, ids=IDS)
def test_float_weights_labelled_as_integers_are_refused_by_name(module, tmp_path):
    cls, model = tiny(module)
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    victim = sorted(k for k in header if k.endswith("attn.c_attn.weight"))[0]
    header[victim]["dtype"] = "I32"  # same 4 bytes per value: the sizes all check out
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (n - len(blob))
    path.write_bytes(data[:8] + blob + data[8 + n:])
    with pytest.raises(module.CheckpointError, match=f"{victim}: checkpoint torch.int32, model torch.float32"):
        cls.from_pretrained(tmp_path)


# --- The same through a download: nothing is written or fetched outside the cache ---------------------------


def files_under(root):
    return {os.path.join(d, f) for d, _, names in os.walk(root) for f in names}


@pytest.mark.parametrize("module", MODULES, ids=IDS)
@pytest.mark.parametrize("bad", ["../../../escaped.safetensors", "ABSOLUTE", "sub/x.safetensors", "..",
                                 "model-00002-of-00002.safetensors/../../../../escaped.safetensors"])
def test_a_hostile_hub_index_cannot_write_outside_the_cache(hub, module, bad, tmp_path):  # noqa: F811
    cls, model = tiny(module)
    served = tmp_path / "served"
    if bad == "ABSOLUTE":
        bad = str(tmp_path / "escaped.safetensors")
    sharded(module, model, served, names=("model-00001-of-00002.safetensors", bad))
    os.remove(served / "model-00002-of-00002.safetensors")
    if module is imagegpt:
        (served / "preprocessor_config.json").unlink(missing_ok=True)
    hub.add(REPO, served)
    hub.files[f"/{REPO}/resolve/main/{bad}"] = b"#" * 100  # what the attacker would have written
    before = files_under(tmp_path)
    with pytest.raises(module.CheckpointError, match="model.safetensors.index.json names the (file|shard) "):
        cls.from_pretrained(REPO)
    created = files_under(tmp_path) - before
    cache = os.path.realpath(os.environ["NANOGPT2_CACHE"])
    assert created and all(os.path.realpath(p).startswith(cache + os.sep) for p in created), created
    assert not any(name.startswith("model-") for name in hub.names_requested())  # no shard was fetched at all


# --- Fuzz: hypothesis-made index files ----------------------------------------------------------------------

JUNK = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=6)
GOOD = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
SHARD_NAMES = st.sampled_from(GOOD + ["../outside.safetensors", "/tmp/outside.safetensors", "sub/x.safetensors",
                                      "./model-00001-of-00002.safetensors", "model.safetensors", "", ".", "..",
                                      "model-00003-of-00002.safetensors", "evil.bin", "a\x00b.safetensors",
                                      "C:\\x.safetensors", "~/x.safetensors"]) | st.text(max_size=12) | JUNK
INDEXES = st.one_of(
    JUNK,
    st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=30), SHARD_NAMES, max_size=4)}),
    st.fixed_dictionaries({"weight_map": st.dictionaries(st.sampled_from(["transformer.wte.weight", "lm_head.weight",
                                                                          "transformer.h.0.ln_1.weight"]),
                                                         st.sampled_from(GOOD), min_size=1)}),
)


@pytest.fixture(scope="module")
def fuzz_folder(tmp_path_factory):
    """A real two-shard GPT-2 folder, and a valid shard outside it, reused by every fuzz example (the
    index file is rewritten each time)."""
    root = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)  # GPT-2's own vocabulary, so that the command line can sample from it
    model = nanogpt2.GPT2LMHeadModel(nanogpt2.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=8))
    weight_map = sharded(nanogpt2, model, root / "model")
    (root / "model" / "sub").mkdir()
    nanogpt2.save_safetensors({"transformer.wte.weight": torch.zeros(32, 16)}, root / "outside.safetensors")
    return root / "model", weight_map


@examples(40)
@given(index=INDEXES)
def test_fuzz_any_index_loads_from_inside_the_folder_or_fails_with_a_checkpoint_error(fuzz_folder, index):
    folder, weight_map = fuzz_folder
    try:
        text = json.dumps(index)
    except ValueError:  # NaN is valid to json.dumps; nothing else here fails, but be safe
        return
    (folder / "model.safetensors.index.json").write_text(text)
    try:
        with no_hang():
            state = nanogpt2.load_state_dict_files(str(folder))
    except nanogpt2.CheckpointError as e:
        assert "\n" not in str(e)
        return
    # It loaded: then every name in the index was one of the folder's own shards, and only they were read.
    listed = set(index["weight_map"].values())
    assert listed <= set(GOOD)
    assert set(state) == {key for key, shard in weight_map.items() if shard in listed}
    try:  # and the model built from it: whole (both shards) or a clear error (missing keys)
        nanogpt2.GPT2LMHeadModel.from_pretrained(folder)
    except nanogpt2.CheckpointError as e:
        assert "\n" not in str(e) and listed != set(GOOD)


@examples(4)
@given(index=INDEXES)
def test_fuzz_any_index_through_the_command_line_samples_or_is_one_error_line(fuzz_folder, index):
    """The same indexes through `python nanogpt2.py sample` in a subprocess (a handful: each costs a second)."""
    folder, _ = fuzz_folder
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    run = subprocess.run([sys.executable, os.path.join(ROOT, "nanogpt2.py"), "sample", "--model", str(folder),
                          "--prompt", "hi", "--max-new-tokens", "1", "--temperature", "0"],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, TIKTOKEN_CACHE_DIR=os.path.join(ROOT, "tests", "fixtures", "tiktoken")))
    if run.returncode != 0:
        assert run.returncode == 2 and run.stderr.startswith("nanogpt2.py: error: ") \
            and run.stderr.count("\n") == 1, run.stderr


# --- ImageGPT's palette and PNG folders ----------------------------------------------------------------------


def test_a_palette_that_links_out_of_the_model_folder_is_refused(tmp_path):
    _, model = tiny(imagegpt)
    model.palette = torch.rand(8, 3) * 2 - 1
    folder, elsewhere = tmp_path / "model", tmp_path / "elsewhere"
    elsewhere.mkdir()
    model.save_pretrained(folder)
    assert torch.allclose(imagegpt.load_palette(folder), model.palette)
    os.replace(folder / "preprocessor_config.json", elsewhere / "preprocessor_config.json")
    os.symlink(elsewhere / "preprocessor_config.json", folder / "preprocessor_config.json")
    with pytest.raises(imagegpt.CheckpointError, match="preprocessor_config.json is a link to .*outside"):
        imagegpt.load_palette(folder)


@pytest.mark.parametrize("junk", [b"[1, 2]", b"7", b'{"clusters": "red"}', b'{"clusters": [[1, 2], [3]]}', b"{"])
def test_a_damaged_palette_file_is_one_clear_error(junk, tmp_path):
    (tmp_path / "preprocessor_config.json").write_bytes(junk)
    with pytest.raises(ValueError, match="preprocessor_config.json") as e:
        imagegpt.load_palette(tmp_path)
    assert "\n" not in str(e.value)


def test_a_png_folder_with_a_link_out_or_a_fifo_is_refused(tmp_path):
    folder = tmp_path / "pngs"
    folder.mkdir()
    image = torch.randint(0, 256, (4, 4, 3), dtype=torch.uint8).numpy()
    imagegpt.write_png(folder / "a.png", image)
    imagegpt.write_png(tmp_path / "secret.png", image)
    assert imagegpt.read_images(str(folder), 4)[1] == ["a.png"]
    os.symlink(tmp_path / "secret.png", folder / "b.png")
    with pytest.raises(imagegpt.CheckpointError, match="b.png is a link to .*outside"):
        imagegpt.read_images(str(folder), 4)
    os.remove(folder / "b.png")
    os.mkfifo(folder / "b.png")
    with no_hang(), pytest.raises(imagegpt.CheckpointError, match="b.png is a FIFO"):
        imagegpt.read_images(str(folder), 4)
    os.remove(folder / "b.png")
    os.symlink("/dev/zero", folder / "b.png")  # would be read forever (and fill the memory)
    with no_hang(), pytest.raises(imagegpt.CheckpointError, match="b.png is a link to /dev/zero"):
        imagegpt.read_images(str(folder), 4)


def test_a_png_named_on_the_command_line_must_be_a_file(tmp_path):
    os.mkfifo(tmp_path / "in.png")
    with no_hang(), pytest.raises(imagegpt.CheckpointError, match="in.png is a FIFO"):
        imagegpt.read_png(tmp_path / "in.png")
    with no_hang(), pytest.raises(imagegpt.CheckpointError, match="/dev/zero is a device"):
        imagegpt.read_png("/dev/zero")



# --- Run folders: a folder handed to --resume is read only inside itself -------------------------------------

TINY_RUN = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--max-steps", "2", "--eval-every", "1"]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A finished two-step addition run, copied afresh by each test that damages it."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert nanogpt2.main(["train", *TINY_RUN, "--out", str(out)]) == 0
    return out


def one_line_error(capsys, argv):
    assert nanogpt2.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanogpt2.py: error: ") and err.count("\n") == 1, err  # one line, no traceback
    return err


@pytest.mark.parametrize("name, kind", [("training_state.pt", "link"), ("training_state.pt", "fifo"),
                                        ("training_state.pt.sha256", "fifo"), ("log.csv", "fifo"),
                                        ("log.csv", "link")])
def test_resuming_a_run_folder_never_reads_a_link_out_of_it_or_waits_on_a_fifo(run_folder, tmp_path, capsys,
                                                                               name, kind):
    out = tmp_path / "run"
    shutil.copytree(run_folder, out)
    if kind == "link":
        os.replace(out / name, tmp_path / name)
        os.symlink(tmp_path / name, out / name)
    else:
        os.remove(out / name)
        os.mkfifo(out / name)
    expected = f"{name} is a link to .*outside" if kind == "link" else f"{name} is a FIFO, expected a regular file"
    with no_hang():
        err = one_line_error(capsys, ["train", "--resume", str(out), "--max-steps", "3"])
    assert re.search(expected, err), err


def test_data_that_is_a_fifo_or_a_device_is_refused_at_once(tmp_path, capsys):
    os.mkfifo(tmp_path / "corpus.txt")
    with no_hang():
        err = one_line_error(capsys, ["train", "--data", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "o")])
    assert "corpus.txt is a FIFO, expected a regular file" in err
    with no_hang():
        err = one_line_error(capsys, ["train", "--data", "/dev/zero", "--out", str(tmp_path / "o")])
    assert "--data: /dev/zero is a device or socket, expected a regular file" in err
    assert not os.path.exists(tmp_path / "o")


def test_a_huge_file_named_png_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "big.png"
    with open(path, "wb") as f:
        f.write(imagegpt.PNG_SIGNATURE)
        f.truncate(2 * imagegpt.MAX_PNG_BYTES + 1)  # sparse: 512 MB on paper, nothing on the disk
    with pytest.raises(ValueError, match="big.png is 536,870,913 bytes, more than a PNG of at most"):
        imagegpt.read_png(path)
    path.write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="is not a PNG file"):
        imagegpt.read_png(path)


def edited_state(run_folder, tmp_path, edit):
    """A copy of the run whose training_state.pt was edited (and its .sha256 removed, as for a state older
    than checksums, or one rewritten with the edit): the plain fields are still checked."""
    out = tmp_path / "run"
    shutil.copytree(run_folder, out)
    state = torch.load(out / "training_state.pt", weights_only=True)
    edit(state)
    torch.save(state, out / "training_state.pt")
    os.remove(out / "training_state.pt.sha256")
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(step=-5), r"step -5 \(expected an integer >= 0\)"),  # would train with negative rates
    (lambda s: s.update(step="three"), r"step 'three' \(expected an integer >= 0\)"),
    (lambda s: s.update(elapsed=float("nan")), r"elapsed nan \(expected seconds >= 0\)"),
    (lambda s: s.update(args=[1, 2]), r"args \[1, 2\] \(expected a dict of options\)"),
    (lambda s: s.update(config=[]), r"config \[\] \(expected a dict\)"),
    (lambda s: s.pop("rng"), "it lacks rng"),
    (lambda s: s["args"].update(batch_size="32"), r"holds the option --batch-size '32', which is not valid"),
    (lambda s: s["args"].update(digits=20), r"holds the option --digits 20, which is not valid \(must be in"),
    (lambda s: s["args"].update(dtype="float8"), r"holds the option --dtype 'float8'.*expected one of"),
    (lambda s: s.update(rng=[{}]), r"does not fit the model and optimiser it describes \(KeyError"),
    (lambda s: s["model"].pop("transformer.wte.weight"), r"does not fit the model .*\(RuntimeError: Error\(s\) in "),
    (lambda s: s["optimizer"].update(state={0: {"step": "x"}}), "does not fit the model and optimiser"),
])
def test_a_training_state_edited_by_hand_is_one_line_naming_it(run_folder, tmp_path, capsys, edit, message):
    out = edited_state(run_folder, tmp_path, edit)
    err = one_line_error(capsys, ["train", "--resume", str(out), "--max-steps", "3"])
    assert "training_state.pt" in err and re.search(message, err), err


@pytest.mark.parametrize("module", MODULES, ids=IDS)
@pytest.mark.parametrize("name, message", [("config.json", "is 100,000,000 bytes, not a config.json"),
                                           ("model.safetensors.index.json", "is not valid JSON")])
def test_a_huge_json_file_in_a_model_folder_is_refused_unread(module, name, message, tmp_path):
    cls, model = tiny(module)
    sharded(module, model, tmp_path)
    with open(tmp_path / name, "ab") as f:
        f.truncate(100_000_000)  # sparse: read whole, it would be 100 MB of NULs in memory (and a 6 GB one, 6 GB)
    with pytest.raises(module.CheckpointError, match=message):
        cls.from_pretrained(tmp_path)


@pytest.mark.parametrize("edit", ["count", "vocab", "bin", "nested"])
def test_tokens_json_that_does_not_describe_tokens_bin_is_named_and_made_again(tmp_path, capsys, edit):
    text = tmp_path / "corpus.txt"
    text.write_text("hello world, a small corpus of text. " * 40)
    out = tmp_path / "run"
    argv = ["train", *TINY_RUN, "--data", str(text), "--tokenizer", "char", "--block-size", "8", "--out", str(out)]
    assert nanogpt2.main(argv) == 0
    meta = json.loads((out / "tokens.json").read_text())
    if edit == "count":
        meta["tokens"] += 1  # tokens.bin would be read with the wrong length
    elif edit == "vocab":
        meta["char_vocab"] = 5
    (out / "tokens.json").write_text(json.dumps(meta) if edit != "nested" else "[" * 100_000)  # json: RecursionError
    if edit == "bin":
        with open(out / "tokens.bin", "ab") as f:
            f.write(b"\0")  # half a token
    capsys.readouterr()
    assert nanogpt2.main(["train", "--resume", str(out), "--max-steps", "3"]) == 0  # made again, then trained
    assert "tokens.json is damaged" in capsys.readouterr().err
    meta = json.loads((out / "tokens.json").read_text())
    assert (out / "tokens.bin").stat().st_size == meta["tokens"] * 2 and isinstance(meta["char_vocab"], str)


def test_tokens_bin_holding_ids_beyond_the_vocabulary_is_named_and_made_again(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("hello world, a small corpus of text. " * 40)
    out = tmp_path / "run"
    argv = ["train", *TINY_RUN, "--data", str(text), "--tokenizer", "char", "--block-size", "8", "--out", str(out)]
    assert nanogpt2.main(argv) == 0
    vocab = len(json.loads((out / "tokens.json").read_text())["char_vocab"])
    count = (out / "tokens.bin").stat().st_size // 2
    (out / "tokens.bin").write_bytes(b"\x60\xea" * count)  # id 60,000 throughout: tokens.json still fits its size
    capsys.readouterr()
    # Was a run that started, then failed on "input_ids holds token id 60000", an argument the user never gave.
    assert nanogpt2.main(["train", "--resume", str(out), "--max-steps", "3"]) == 0  # made again, then trained
    err = capsys.readouterr().err
    assert f"note: {out / 'tokens.bin'} holds token id 60,000, but the vocabulary has {vocab} tokens " in err, err
    assert "it is only a cache of --data's tokens; tokenising --data again" in err, err
    tokens = (out / "tokens.bin").read_bytes()
    assert len(tokens) == 2 * count and max(tokens[0::2]) < vocab and not any(tokens[1::2])
