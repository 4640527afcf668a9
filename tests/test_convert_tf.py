"""convert_tf.py against checkpoints written by real TensorFlow (tests/make_tf_fixtures.py, run by hand).

    Reader        every name, dtype, shape and value equals what TensorFlow's own reader returned
    Conversion    the output loads strictly in transformers (and nanogpt2.py / imagegpt.py) and gives the
                  logits of GPT-2 / ImageGPT written out here from the fixture arrays
    Corruption    byte flips and truncations give a clear error naming the file, or change nothing
    Command line  --download from a local HTTP server, resuming; --list; --help; exit status 2
"""

import gzip
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import convert_tf  # noqa: E402
from convert_tf import CheckpointError, CheckpointReader  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "tf"


def examples(n):
    """Hypothesis settings: n examples, no per-example deadline (2 slow cores), and tmp_path reused across
    examples on purpose (each example rebuilds what it uses)."""
    return settings(max_examples=n, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# --- Fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def many_dir(tmp_path_factory):
    """The "many" fixture is committed gzipped (700 KB of index compresses to 54 KB): unpack it once."""
    folder = tmp_path_factory.mktemp("many")
    for packed in (FIXTURES / "many").glob("*.gz"):
        with gzip.open(packed) as src, open(folder / packed.name[:-3], "wb") as dst:
            shutil.copyfileobj(src, dst)
    return folder


def expected(folder):
    """What TensorFlow's reader returned: {name: (dtype, shape, value or None for strings)}."""
    manifest = json.loads((folder / "expected.json").read_text())
    arrays = dict(np.load(folder / "expected.npz"))
    if "packed" in arrays:  # one float32 array, values concatenated in name order
        flat, arrays, start = arrays["packed"], {}, 0
        for name in sorted(n for n, m in manifest.items() if m["dtype"] != "string"):
            size = int(np.prod(manifest[name]["shape"]))
            arrays[name] = flat[start:start + size].reshape(manifest[name]["shape"])
            start += size
    return {name: (m["dtype"], tuple(m["shape"]), arrays.get(name)) for name, m in manifest.items()}


def prefix_of(folder):
    return convert_tf.find_checkpoint(folder)


@contextmanager
def time_limit(seconds):
    """A hang fails the test instead of stalling the suite."""
    def fail(*_):
        raise TimeoutError(f"took longer than {seconds} s")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The fixtures converted once, untouched: {family: model.safetensors bytes}."""
    out = tmp_path_factory.mktemp("clean")
    result = {}
    for family in ("gpt2", "igpt"):
        convert_tf.convert(FIXTURES / family, out / family, log=lambda _: None)
        result[family] = (out / family / "model.safetensors").read_bytes()
    result["dirs"] = {family: out / family for family in ("gpt2", "igpt")}
    return result


# --- Reader: bit for bit against TensorFlow ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "igpt", "dtypes", "many"])
def test_reader_returns_exactly_what_tensorflow_wrote(name, many_dir):
    folder = many_dir if name == "many" else FIXTURES / name
    truth = expected(many_dir if name == "many" else folder)
    with CheckpointReader(prefix_of(folder)) as reader:
        assert set(reader.entries) | set(reader.skipped) == set(truth)
        for var, (dtype, shape, value) in truth.items():
            if dtype == "string" or var == "part":
                assert var in reader.skipped  # strings and partitioned variables: skipped, with a note
                continue
            entry = reader.entries[var]
            assert (entry.dtype, entry.shape) == (dtype, shape), var
            got = reader.read(var, verify=True)
            if dtype == "bfloat16":  # stored as its uint16 bits; the reader widens to float32 exactly
                value = (value.astype(np.uint32) << 16).view(np.float32)
            assert got.shape == shape and got.dtype == value.dtype, var
            assert got.tobytes() == value.tobytes(), var  # bit for bit, not approximately


def test_every_supported_dtype_and_the_skipped_kinds_are_covered():
    with CheckpointReader(prefix_of(FIXTURES / "dtypes")) as reader:
        assert {e.dtype for e in reader.entries.values()} == {"float32", "float16", "bfloat16", "float64",
                                                              "int32", "int64"}
        assert reader.entries["scalar"].shape == () and reader.entries["empty"].shape == (0, 3)
        assert "string" in reader.skipped["text"] and "partitioned into 2 slices" in reader.skipped["part"]


def test_index_of_several_blocks_and_checkpoint_of_several_shards_are_walked(many_dir):
    data = (many_dir / "model.ckpt.index").read_bytes()
    footer = data[-convert_tf.FOOTER_SIZE:]
    _, pos = convert_tf.read_varint(footer, 0, "")
    _, pos = convert_tf.read_varint(footer, pos, "")
    index_block = convert_tf.read_block(data, footer[pos:40], "many", "index block")
    assert len(list(convert_tf.block_entries(index_block, "many", "index block"))) >= 3  # data blocks
    with CheckpointReader(prefix_of(many_dir)) as reader:
        assert len(reader.entries) == 4000
    with CheckpointReader(prefix_of(FIXTURES / "igpt")) as reader:
        assert reader.num_shards == 5 and len({e.shard for e in reader.entries.values()}) >= 4


def test_listing_reads_no_tensor_data(tmp_path):
    # Empty data shards: names, dtypes and shapes still list; only reading a tensor needs its bytes.
    for f in (FIXTURES / "igpt").glob("model.ckpt-1000.*"):
        target = tmp_path / f.name
        target.write_bytes(f.read_bytes() if f.suffix == ".index" else b"")
    with CheckpointReader(str(tmp_path / "model.ckpt-1000")) as reader:
        assert reader.entries["model/h1/attn/q_proj"].shape == (2, 4, 8)  # [n_head, head_dim, n_embd]
        with pytest.raises(CheckpointError, match=r"data-\d{5}-of-00005: truncated: tensor 'model/wte'"):
            reader.read("model/wte")


@pytest.mark.parametrize("crc", ["crc32c", "crc32c_fast"])
def test_crc32c_matches_the_standard_check_value(crc):
    crc = getattr(convert_tf, crc)
    assert crc(b"123456789") == 0xE3069283  # the CRC-32C catalogue's check value
    assert crc(b"") == 0
    # RFC 3720 (iSCSI), B.4: 32 bytes of zeros, of ones, counting up and counting down.
    assert crc(bytes(32)) == 0x8A9136AA and crc(b"\xff" * 32) == 0x62A8AB43
    assert crc(bytes(range(32))) == 0x46DD794E and crc(bytes(range(31, -1, -1))) == 0x113FDB5C


# Sizes at the fast version's seams: lanes = min(max_lanes, size // 1024), none under 2 (the textbook path);
# rows of an even width, the remainder going to the head; the rows read 256 two-byte words (512 bytes) at a time.
SEAMS = [0, 1, 2, 3, 1023, 1024, 2046, 2047, 2048, 2049, 2050, 3071, 3072, 4095, 4096, 4097, 65535, 65536, 65537]
MEGABYTE = [2**20 - 1, 2**20, 2**20 + 1]  # only with many lanes: two rows of 512 KB take numpy 10 s


@pytest.mark.parametrize("lanes", [2, 3, 7, 64, 65536])
def test_fast_crc32c_equals_the_textbook_loop_at_lane_and_block_seams(lanes):
    data = np.random.default_rng(lanes).bytes(2**20 + 1)
    for size in SEAMS + (MEGABYTE if lanes >= 64 else []):
        assert convert_tf.crc32c_fast(data[:size], max_lanes=lanes) == convert_tf.crc32c(data[:size]), size


@examples(60)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(0, 60000), lanes=st.integers(2, 48))
def test_fast_crc32c_equals_the_textbook_loop(seed, size, lanes):
    # Few lanes over kBs take the same path as 65536 lanes over GBs: head, rows side by side, fold.
    data = np.random.default_rng(seed).bytes(size)
    assert convert_tf.crc32c_fast(data, max_lanes=lanes) == convert_tf.crc32c(data)


# --- Conversion: the models built by hand from the fixture arrays -----------------------------------------

def layer_norm(x, g, b, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * g + b


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def causal_attention(q, k, v):  # (nh, T, hs) each
    T = q.shape[1]
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])  # (nh, T, T)
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    return softmax(scores) @ v                                  # (nh, T, hs)


def gpt2_by_hand(w, hp, ids):
    """GPT-2 as OpenAI's gpt-2/src/model.py computes it, in float64 numpy, from the TF arrays."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    n, nh = hp["n_embd"], hp["n_head"]
    x = w["model/wte"][ids] + w["model/wpe"][:len(ids)]  # (T, C)
    gelu = lambda u: 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))  # noqa: E731
    for i in range(hp["n_layer"]):
        p = lambda name: w[f"model/h{i}/{name}"]  # noqa: E731
        h = layer_norm(x, p("ln_1/g"), p("ln_1/b"))
        qkv = h @ p("attn/c_attn/w")[0] + p("attn/c_attn/b")  # (T, 3C)
        q, k, v = (t.reshape(len(ids), nh, n // nh).transpose(1, 0, 2) for t in np.split(qkv, 3, axis=-1))
        a = causal_attention(q, k, v).transpose(1, 0, 2).reshape(len(ids), n)
        x = x + a @ p("attn/c_proj/w")[0] + p("attn/c_proj/b")
        h = layer_norm(x, p("ln_2/g"), p("ln_2/b"))
        x = x + gelu(h @ p("mlp/c_fc/w")[0] + p("mlp/c_fc/b")) @ p("mlp/c_proj/w")[0] + p("mlp/c_proj/b")
    x = layer_norm(x, w["model/ln_f/g"], w["model/ln_f/b"])
    return x @ w["model/wte"].T  # (T, V): the head is tied to wte


def igpt_by_hand(w, n_layer, colours):
    """ImageGPT as OpenAI's image-gpt/src/model.py computes it: SOS first, the raw [head, e, f] projections
    through einsum, norms without mean or bias, x * sigmoid(1.702 x), the untied wtet head."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    norm = lambda x, g: x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * g  # noqa: E731
    T = len(colours)
    x = np.concatenate([w["model/sos"][None], w["model/wte"][colours[:-1]]]) + w["model/wpe"][:T]  # (T, C)
    for i in range(n_layer):
        p = lambda name: w[f"model/h{i}/{name}"]  # noqa: E731
        h = norm(x, p("ln_1/g"))
        q, k, v = (np.einsum("sf,hef->hse", h, p(f"attn/{proj}")) for proj in ("q_proj", "k_proj", "v_proj"))
        x = x + np.einsum("hse,hef->sf", causal_attention(q, k, v), p("attn/c_proj"))
        h = norm(x, p("ln_2/g")) @ p("mlp/c_fc/w")
        x = x + (h / (1 + np.exp(-1.702 * h))) @ p("mlp/c_proj/w")
    return norm(x, w["model/ln_f/g"]) @ w["model/wtet"].T  # (T, n_vocab)


def gpt2_inputs():
    truth = expected(FIXTURES / "gpt2")
    weights = {k: v for k, (_, _, v) in truth.items()}
    hp = json.loads((FIXTURES / "gpt2" / "hparams.json").read_text())
    ids = np.random.default_rng(0).integers(0, hp["n_vocab"], hp["n_ctx"])
    return weights, hp, ids, gpt2_by_hand(weights, hp, ids)


def igpt_inputs():
    truth = expected(FIXTURES / "igpt")
    weights = {k: v for k, (_, _, v) in truth.items()}
    n_vocab, n_ctx = weights["model/wte"].shape[0], weights["model/wpe"].shape[0]
    colours = np.random.default_rng(0).integers(0, n_vocab, n_ctx)
    # Hugging Face's ImageGPT takes the SOS token (id n_vocab) itself, then the colours but the last.
    ids = np.concatenate([[n_vocab], colours[:-1]])
    return ids, igpt_by_hand(weights, 2, colours)


def assert_logits(model, ids, reference):
    with torch.no_grad():
        logits = model(torch.tensor(ids)[None]).logits[0].double().numpy()
    # fp32 model against a float64 reference of a 2-layer model: 1e-5 covers float32 rounding.
    np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-5)


def test_converted_gpt2_loads_strictly_in_transformers_with_the_logits_of_gpt2_by_hand(clean):
    from transformers import GPT2LMHeadModel
    out = clean["dirs"]["gpt2"]
    model, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    _, _, ids, reference = gpt2_inputs()
    assert_logits(model.eval(), ids, reference)
    assert (out / "vocab.json").read_bytes() == (FIXTURES / "gpt2" / "encoder.json").read_bytes()
    assert (out / "merges.txt").read_bytes() == (FIXTURES / "gpt2" / "vocab.bpe").read_bytes()


def test_converted_imagegpt_loads_strictly_in_transformers_with_the_logits_of_imagegpt_by_hand(clean):
    from transformers import ImageGPTForCausalImageModeling
    out = clean["dirs"]["igpt"]
    model, info = ImageGPTForCausalImageModeling.from_pretrained(out, output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    ids, reference = igpt_inputs()
    assert_logits(model.eval(), ids, reference)
    config = json.loads((out / "config.json").read_text())
    assert (config["vocab_size"], config["n_head"], config["n_positions"]) == (13, 2, 9)
    assert (out / "kmeans_centers.npy").read_bytes() == (FIXTURES / "igpt" / "kmeans_centers.npy").read_bytes()


def test_converted_gpt2_loads_in_nanogpt2_with_the_logits_of_gpt2_by_hand(clean):
    nanogpt2 = pytest.importorskip("nanogpt2")
    model = nanogpt2.GPT2LMHeadModel.from_pretrained(str(clean["dirs"]["gpt2"]))
    _, _, ids, reference = gpt2_inputs()
    assert_logits(model.eval(), ids, reference)


def test_converted_imagegpt_loads_in_imagegpt_py_with_the_logits_of_imagegpt_by_hand(clean):
    imagegpt = pytest.importorskip("imagegpt")
    if not hasattr(getattr(imagegpt, "ImageGPTForCausalImageModeling", None), "from_pretrained"):
        pytest.skip("imagegpt.py has no ImageGPTForCausalImageModeling.from_pretrained yet")
    model = imagegpt.ImageGPTForCausalImageModeling.from_pretrained(str(clean["dirs"]["igpt"]))
    ids, reference = igpt_inputs()
    assert_logits(model.eval(), ids, reference)
    palette = np.load(FIXTURES / "igpt" / "kmeans_centers.npy")  # copied beside the weights, found by imagegpt.py
    np.testing.assert_array_equal(np.asarray(model.palette, dtype=np.float32), palette)


def test_optimiser_slots_are_skipped_and_unknown_variables_listed_and_missing_ones_named():
    with CheckpointReader(prefix_of(FIXTURES / "igpt")) as reader:
        plan, _ = convert_tf.make_plan(reader)
        assert plan.unrecognised() == []  # Adam slots, beta powers and global_step are training state
        assert not any("Adam" in name for name, _, _ in plan.items)
        reader.entries["model/clf/wclf"] = reader.entries["model/wte"]
        assert convert_tf.make_plan(reader)[0].unrecognised() == ["model/clf/wclf"]
        del reader.entries["model/h1/ln_2/g"]
        with pytest.raises(CheckpointError, match="ImageGPT needs variable model/h1/ln_2/g"):
            convert_tf.make_plan(reader)
    with CheckpointReader(prefix_of(FIXTURES / "dtypes")) as reader:
        with pytest.raises(CheckpointError, match="neither GPT-2 .* nor ImageGPT"):
            convert_tf.make_plan(reader)


def test_gpt2_hparams_must_agree_with_the_shapes(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "gpt2", src)
    hp = json.loads((src / "hparams.json").read_text())
    (src / "hparams.json").write_text(json.dumps({**hp, "n_embd": 30}))
    with pytest.raises(CheckpointError, match=r"model/wte has shape \[50, 24\], expected \[50, 30\]"):
        convert_tf.convert(src, tmp_path / "out")
    (src / "hparams.json").write_text(json.dumps({**hp, "n_embd": 32}))
    with pytest.raises(CheckpointError, match="n_head 3 does not divide n_embd 32"):
        convert_tf.convert(src, tmp_path / "out")
    (src / "hparams.json").unlink()
    with pytest.raises(CheckpointError, match="hparams.json: not found"):
        convert_tf.convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- Corruption: a clear error naming the file, or no change at all ---------------------------------------

def convert_damaged(tmp_path, family, damage):
    """Copy a fixture, damage one file, convert. Returns (error or None, damaged path, out dir)."""
    src = tmp_path / "src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(FIXTURES / family, src)
    target = damage(src)
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    try:
        with time_limit(20):
            convert_tf.convert(src, out, log=lambda _: None)
    except CheckpointError as error:  # anything else (IndexError, struct.error, ...) is a crash: fails
        return error, target, out
    return None, target, out


def check_outcome(error, target, out, clean_bytes):
    if error is not None:
        assert str(target) in str(error), f"error does not name {target.name}: {error}"
        assert not out.exists() and not list(out.parent.glob(".out.*"))  # nothing left behind
    else:  # the damage fell on bytes nothing reads (padding, optimiser slots): the output is unchanged
        assert (out / "model.safetensors").read_bytes() == clean_bytes


def flip(path, position, mask):
    data = bytearray(path.read_bytes())
    data[position % len(data)] ^= mask
    path.write_bytes(bytes(data))
    return path


def truncate(path, fraction):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * fraction)])
    return path


@examples(40)
@given(family=st.sampled_from(["gpt2", "igpt"]), mask=st.integers(1, 255),
       position=st.one_of(st.integers(0, 10**6), st.integers(-48, -1)))  # anywhere, or in the 48-byte footer
def test_index_byte_flip_gives_an_error_naming_the_index_or_changes_nothing(tmp_path, clean, family, position, mask):
    index = lambda src: next(src.glob("*.index"))  # noqa: E731
    error, target, out = convert_damaged(tmp_path, family, lambda src: flip(index(src), position, mask))
    check_outcome(error, target, out, clean[family])


@examples(20)
@given(family=st.sampled_from(["gpt2", "igpt"]), fraction=st.floats(0, 0.999))
def test_truncated_index_always_gives_an_error_naming_it(tmp_path, clean, family, fraction):
    error, target, out = convert_damaged(tmp_path, family, lambda src: truncate(next(src.glob("*.index")), fraction))
    assert error is not None
    check_outcome(error, target, out, clean[family])


@examples(40)
@given(family=st.sampled_from(["gpt2", "igpt"]), shard=st.integers(0, 4), position=st.integers(0, 10**6),
       mask=st.integers(1, 255))
def test_data_byte_flip_gives_a_crc_error_naming_the_shard_or_changes_nothing(tmp_path, clean, family, shard,
                                                                              position, mask):
    def damage(src):
        shards = sorted(src.glob("*.data-*"))
        return flip(shards[shard % len(shards)], position, mask)
    error, target, out = convert_damaged(tmp_path, family, damage)
    check_outcome(error, target, out, clean[family])
    if error is not None:
        assert "CRC mismatch" in str(error)


@examples(20)
@given(family=st.sampled_from(["gpt2", "igpt"]), shard=st.integers(0, 4), fraction=st.floats(0, 0.999))
def test_truncated_data_shard_gives_an_error_naming_it_or_changes_nothing(tmp_path, clean, family, shard, fraction):
    def damage(src):
        shards = sorted(src.glob("*.data-*"))
        return truncate(shards[shard % len(shards)], fraction)
    error, target, out = convert_damaged(tmp_path, family, damage)
    check_outcome(error, target, out, clean[family])


def test_known_damage_gives_the_expected_message(tmp_path):
    cases = [  # (what, damage, message)
        ("footer magic", lambda src: flip(src / "model.ckpt.index", -1, 0xFF), "bad magic number"),
        ("a data block", lambda src: flip(src / "model.ckpt.index", 5, 0x01), "CRC mismatch in data block"),
        ("short index", lambda src: truncate(src / "model.ckpt.index", 0.01), "too short"),
        ("cut index", lambda src: truncate(src / "model.ckpt.index", 0.5), "bad magic number"),
        ("missing shard", lambda src: (src / "model.ckpt.data-00000-of-00001").unlink() or
         src / "model.ckpt.data-00000-of-00001", "data shard missing"),
    ]
    for what, damage, message in cases:
        error, target, out = convert_damaged(tmp_path, "gpt2", damage)
        assert error is not None and message in str(error) and str(target) in str(error), what
        assert not out.exists()


def test_failure_while_writing_leaves_no_out_dir(tmp_path, monkeypatch):
    def broken_read(self, name, verify=False):
        raise CheckpointError(f"{self.prefix}: simulated failure reading {name}")
    monkeypatch.setattr(CheckpointReader, "read", broken_read)
    with pytest.raises(CheckpointError, match="simulated"):
        convert_tf.convert(FIXTURES / "gpt2", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither out nor its temporary .out.tmp<PID>
    with pytest.raises(CheckpointError, match="simulated"):
        convert_tf.convert(FIXTURES / "gpt2", tmp_path / "a" / "b" / "out")
    assert list(tmp_path.iterdir()) == []  # nor the folders made on the way to it


def test_an_out_dir_that_is_a_link_is_refused_before_any_work(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "out")
    with pytest.raises(CheckpointError, match="out: is a symbolic link"):
        convert_tf.convert(FIXTURES / "gpt2", tmp_path / "out")


def test_existing_out_dir_is_refused_and_left_alone(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists and is not an empty folder"):
        convert_tf.convert(FIXTURES / "gpt2", tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


# --- Command line ---------------------------------------------------------------------------------------

def run_cli(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "convert_tf.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_cli_user_errors_exit_2_with_one_line_and_no_traceback(tmp_path):
    damaged = tmp_path / "src"
    shutil.copytree(FIXTURES / "gpt2", damaged)
    flip(damaged / "model.ckpt.data-00000-of-00001", 100, 0x10)
    for args, message in [((tmp_path / "nowhere", tmp_path / "out"), "not found"),
                          ((damaged, tmp_path / "out"), "CRC mismatch in tensor")]:
        result = run_cli(*args)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()
    assert run_cli(FIXTURES / "gpt2").returncode == 2  # OUT_DIR missing: argparse's usage error


def test_cli_help_teaches_the_options_and_list_prints_every_variable():
    help_text = run_cli("--help").stdout
    for word in ("SRC OUT_DIR", "--download", "gpt2-124M", "igpt-s", "--list", "--no-verify", "examples:"):
        assert word in help_text
    listing = run_cli("--list", FIXTURES / "dtypes").stdout
    assert re.search(r"bf16\s+bfloat16\s+\[2, 3, 4\]", listing) and re.search(r"text\s+skipped", listing)


class RangeServer(http.server.ThreadingHTTPServer):
    """A local stand-in for OpenAI's blob store: serves a folder, honours Range and If-Range, logs requests."""

    def __init__(self, root):
        self.root, self.requests, self.cut_after, self.ignore_range = Path(root), [], None, False
        super().__init__(("127.0.0.1", 0), RangeHandler)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class RangeHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        path = server.root / self.path.lstrip("/")
        server.requests.append((self.path, self.headers.get("Range")))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        etag = f'"{hashlib.md5(data).hexdigest()}"'  # as Azure blob storage gives one
        match = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
        if self.headers.get("If-Range") not in (None, etag):  # the file changed: send all of the new one
            match = None
        start = int(match.group(1)) if match and not server.ignore_range else 0
        if start >= len(data) and start:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", etag)
        self.end_headers()
        body = data[start:]
        self.wfile.write(body if server.cut_after is None else body[:server.cut_after])  # cut: a dropped link

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """OpenAI's layout under a local root, filled from the fixtures (the iGPT prefix renamed to the release's:
    file names are not recorded inside a checkpoint, so renaming the prefix is harmless)."""
    root = tmp_path / "www"
    gpt2 = root / "gpt-2" / "models" / "124M"
    shutil.copytree(FIXTURES / "gpt2", gpt2)
    igpt = root / "image-gpt" / "checkpoints" / "igpt-s" / "1000000"
    igpt.mkdir(parents=True)
    for f in (FIXTURES / "igpt").glob("model.ckpt-1000.*"):
        shutil.copy(f, igpt / f.name.replace("model.ckpt-1000.", "model.ckpt-1000000."))
    (root / "image-gpt" / "color-clusters").mkdir()
    shutil.copy(FIXTURES / "igpt" / "kmeans_centers.npy", root / "image-gpt" / "color-clusters")
    httpd = RangeServer(root)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_download_gpt2_from_a_local_server_then_convert(tmp_path, server, clean):
    downloads = tmp_path / "dl"
    result = run_cli("--download", "gpt2-124M", tmp_path / "out", "--download-dir", downloads,
                     env={"NANOGPT2_OPENAI_BASE_URL": server.url})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == clean["gpt2"]
    assert not list(downloads.glob("*.part"))
    assert ("/gpt-2/models/124M/model.ckpt.data-00000-of-00001", None) in server.requests


def test_download_imagegpt_fetches_the_shards_its_index_names(tmp_path, server, clean):
    convert_tf.main(["--download", "igpt-s", str(tmp_path / "out"), "--download-dir", str(tmp_path / "dl"),
                     "--base-url", server.url])
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == clean["igpt"]
    assert (tmp_path / "out" / "kmeans_centers.npy").is_file()
    assert len([p for p, _ in server.requests if ".data-" in p]) == 5
    server.requests.clear()  # a second run finds every file complete and fetches nothing
    convert_tf.download_release("igpt-s", tmp_path / "dl", server.url)
    assert server.requests == []


def test_interrupted_download_never_looks_complete_and_resumes_with_range(tmp_path, server):
    url = f"{server.url}/gpt-2/models/124M/model.ckpt.data-00000-of-00001"
    original = (FIXTURES / "gpt2" / "model.ckpt.data-00000-of-00001").read_bytes()
    target = tmp_path / "shard"
    server.cut_after = 20000  # the connection drops after 20 kB
    with pytest.raises(CheckpointError, match="run again to resume"):
        convert_tf.fetch(url, target)
    assert not target.exists() and (tmp_path / "shard.part").read_bytes() == original[:20000]
    server.cut_after = None
    convert_tf.fetch(url, target)
    assert target.read_bytes() == original and not (tmp_path / "shard.part").exists()
    assert server.requests[-1] == ("/gpt-2/models/124M/model.ckpt.data-00000-of-00001", "bytes=20000-")


def test_download_restarts_when_the_server_ignores_range_and_finishes_a_whole_part(tmp_path, server):
    url = f"{server.url}/gpt-2/models/124M/hparams.json"
    original = (FIXTURES / "gpt2" / "hparams.json").read_bytes()
    (tmp_path / "a.part").write_bytes(original[:10])
    server.ignore_range = True  # answers 200 with the whole file: the part must not be appended to
    convert_tf.fetch(url, tmp_path / "a")
    assert (tmp_path / "a").read_bytes() == original
    server.ignore_range = False
    (tmp_path / "b.part").write_bytes(original)  # complete, but never renamed (killed at the last moment)
    convert_tf.fetch(url, tmp_path / "b")        # the server answers 416: nothing left to send
    assert (tmp_path / "b").read_bytes() == original
    with pytest.raises(CheckpointError, match="HTTP 404"):
        convert_tf.fetch(f"{server.url}/no/such/file", tmp_path / "c")


def test_a_file_changed_between_tries_is_fetched_afresh_not_spliced(tmp_path, server):
    served = server.root / "gpt-2" / "models" / "124M" / "model.ckpt.data-00000-of-00001"
    old = served.read_bytes()
    new = bytes(255 - b for b in old)  # the same length: only If-Range can tell the versions apart
    target = tmp_path / "dl" / "shard"
    server.cut_after = 20000
    with pytest.raises(CheckpointError, match="run again to resume"):
        convert_tf.fetch(f"{server.url}/gpt-2/models/124M/{served.name}", target)
    server.cut_after = None
    served.write_bytes(new)  # a new version is uploaded before the retry
    convert_tf.fetch(f"{server.url}/gpt-2/models/124M/{served.name}", target)
    assert server.requests[-1][1] == "bytes=20000-"  # it asked to resume, and was sent the whole new file
    assert target.read_bytes() == new  # not 20 kB of the old version followed by the rest of the new
    assert sorted(p.name for p in target.parent.iterdir()) == ["shard"]  # no .part, no .part.if-range


def test_a_404_download_leaves_no_empty_folder(tmp_path, server):
    result = run_cli("--download", "gpt2-124M", tmp_path / "out", "--download-dir", tmp_path / "cache" / "dl",
                     "--base-url", server.url + "/nothing-here")
    assert result.returncode == 2 and "HTTP 404" in result.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_download_deletes_a_cached_shard_that_fails_its_checksum_so_a_rerun_fetches_it(tmp_path, server, clean):
    downloads, shard = tmp_path / "dl", tmp_path / "dl" / "model.ckpt.data-00000-of-00001"
    args = ("--download", "gpt2-124M", tmp_path / "out", "--download-dir", downloads, "--base-url", server.url)
    assert run_cli(*args).returncode == 0
    shutil.rmtree(tmp_path / "out")
    flip(shard, 100, 0x10)  # the cached copy rots on disk
    result = run_cli(*args)
    assert result.returncode == 2 and "CRC mismatch in tensor" in result.stderr, result.stderr
    assert "run again to fetch it afresh" in result.stderr and not shard.exists()
    server.requests.clear()
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert [path for path, _ in server.requests] == ["/gpt-2/models/124M/model.ckpt.data-00000-of-00001"]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == clean["gpt2"]


def test_the_checkpoint_pointer_file_never_leads_out_of_the_folder(tmp_path):
    """TF's `checkpoint` file names the latest of several checkpoints; a name pointing elsewhere (an absolute
    path, ../) is followed only as its base name inside SRC, as TF does when a folder has moved."""
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    shutil.copytree(FIXTURES / "gpt2", src)
    shutil.copytree(FIXTURES / "gpt2", elsewhere)
    for suffix in (".index", ".data-00000-of-00001"):  # a second checkpoint, so the pointer is read
        shutil.copy(src / f"model.ckpt{suffix}", src / f"older.ckpt{suffix}")
    (src / "checkpoint").write_text(f'model_checkpoint_path: "{elsewhere}/model.ckpt"\n')
    assert convert_tf.find_checkpoint(src) == str(src / "model.ckpt")  # the base name, inside SRC
    (src / "checkpoint").write_text(f'model_checkpoint_path: "{elsewhere}/outside.ckpt"\n')
    with pytest.raises(convert_tf.CheckpointError, match="not one of this folder's checkpoints"):
        convert_tf.find_checkpoint(src)
    (src / "checkpoint").write_bytes(b'model_checkpoint_path: "older.ckpt"\n\xff\xfe')  # not UTF-8 after it
    assert convert_tf.find_checkpoint(src) == str(src / "older.ckpt")


def test_a_fifo_named_like_an_index_is_never_opened(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "gpt2", src)
    os.mkfifo(src / "stale.ckpt.index")  # opening it to read would wait for a writer forever
    with time_limit(20):
        assert convert_tf.find_checkpoint(src) == str(src / "model.ckpt")
