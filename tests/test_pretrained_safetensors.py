"""nanogpt2's hand-written safetensors reader and writer ("Loading and saving", Part III): round trips, the `safetensors`
package as a second opinion, and fuzzing.

The reader's promise: a file either loads as exactly the tensors its header describes, every one read
from inside the file, or the load raises nanogpt2.CheckpointError. Never another exception, never a
read past the end. The fuzz tests mutate a small valid file (truncate it, flip bytes, rewrite the
header with lying shapes, offsets and dtypes, claim a huge header) and hold the reader to that promise
by decoding every tensor it returns independently, straight from the file's bytes.
"""

import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nanogpt2

# The format's dtype names, decoded here independently of nanogpt2's table.
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
ITEMSIZE = {name: torch.empty(0, dtype=dtype).element_size() for name, dtype in DTYPES.items()}
SAME_SIZE_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns, so that NaN == NaN and -0.0 != 0.0 when comparing."""
    if t.dtype == torch.bool:
        return t
    return t.contiguous().view(SAME_SIZE_INT[t.element_size()])


def assert_same_tensors(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert torch.equal(bits(got[name]), bits(want[name])), name  # bit for bit: nothing may change


def decode_from_file(data: bytes, name: str, info: dict) -> torch.Tensor:
    """What the header says tensor `name` is, read from the file's bytes by this test, not by nanogpt2."""
    n = struct.unpack("<Q", data[:8])[0]
    begin, end = info["data_offsets"]
    assert 0 <= begin <= end <= len(data) - 8 - n, f"{name}: returned from outside the file ({begin}, {end})"
    raw = bytearray(data[8 + n + begin: 8 + n + end])
    if not raw:
        return torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
    if info["dtype"] == "BOOL":  # any non-zero byte reads as True
        return torch.frombuffer(raw, dtype=torch.uint8).ne(0).reshape(info["shape"])
    return torch.frombuffer(raw, dtype=DTYPES[info["dtype"]]).reshape(info["shape"]).clone()


def assert_loads_as_its_header_says_or_fails_cleanly(path, data: bytes):
    """The fuzzing oracle: CheckpointError, or exactly the tensors the (possibly mutated) header describes."""
    try:
        got = nanogpt2.load_safetensors(path)
    except nanogpt2.CheckpointError as e:
        assert str(path) in str(e)  # the message names the file
        return None
    header = json.loads(data[8: 8 + struct.unpack("<Q", data[:8])[0]])
    want = {name: decode_from_file(data, name, info) for name, info in header.items() if name != "__metadata__"}
    assert_same_tensors(got, want)
    return got


def sample_tensors():
    """One tensor of each kind the models save, with awkward values (NaN, inf, -0.0) and shapes (0-d, empty)."""
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.tensor([[1.5, -0.0, float("nan")], [float("inf"), -float("inf"), 3e-42]]),
        "f16": torch.randn(4, generator=g).half(),
        "bf16": torch.randn(1, 3, generator=g).bfloat16(),
        "i64": torch.tensor([-(2 ** 63), 0, 2 ** 63 - 1]),
        "bool": torch.tensor([[True, False], [False, True]]),
        "i8": torch.tensor([-128, 127, 0, 1, -1], dtype=torch.int8),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
    }


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """(tensors, bytes) of a small valid file written by nanogpt2.save_safetensors."""
    path = tmp_path_factory.mktemp("st") / "original.safetensors"
    tensors = sample_tensors()
    nanogpt2.save_safetensors(tensors, path, metadata={"format": "pt"})
    return tensors, path.read_bytes()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A path to write mutated files to (module scoped: hypothesis reruns the test body many times)."""
    return tmp_path_factory.mktemp("fuzz") / "mutated.safetensors"


# --- round trips ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_save_then_load_gives_identical_tensors_for_every_dtype(tmp_path, dtype):
    g = torch.Generator().manual_seed(1)
    if dtype == torch.bool:
        t = torch.rand(3, 5, generator=g) > 0.5
    elif dtype.is_floating_point:
        t = (100 * torch.randn(3, 5, generator=g)).to(dtype)
        t[0, 0], t[0, 1], t[0, 2] = float("nan"), float("-inf"), -0.0
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(info.min, info.max, (3, 5), generator=g, dtype=torch.int64).to(dtype)
        t[0, 0], t[0, 1] = info.min, info.max
    tensors = {"matrix": t, "row": t[1], "column": t[:, 2], "scalar": t[2, 3].clone(), "empty": t[:0]}
    nanogpt2.save_safetensors(tensors, tmp_path / "t.safetensors")
    assert_same_tensors(nanogpt2.load_safetensors(tmp_path / "t.safetensors"), tensors)


@given(shapes=st.lists(st.lists(st.integers(0, 4), max_size=3), min_size=1, max_size=4),
       dtype_names=st.lists(st.sampled_from(sorted(DTYPES)), min_size=4, max_size=4))
def test_save_then_load_round_trips_any_collection_of_shapes(scratch, shapes, dtype_names):
    g = torch.Generator().manual_seed(len(shapes))
    tensors = {f"t{i}": (torch.randn(shape, generator=g) * 50).to(DTYPES[dtype_names[i]])
               for i, shape in enumerate(shapes)}
    nanogpt2.save_safetensors(tensors, scratch)
    data = scratch.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    assert (8 + n) % 8 == 0  # the data section starts 8-byte aligned, as the format recommends
    assert_same_tensors(nanogpt2.load_safetensors(scratch), tensors)


def test_safetensors_package_reads_our_files_identically(tmp_path, original):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors, data = original
    (tmp_path / "ours.safetensors").write_bytes(data)
    assert_same_tensors(safetensors_torch.load_file(tmp_path / "ours.safetensors"), tensors)
    with safetensors_torch.safe_open(tmp_path / "ours.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_we_read_safetensors_package_files_identically(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = sample_tensors()
    safetensors_torch.save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    assert_same_tensors(nanogpt2.load_safetensors(tmp_path / "theirs.safetensors"), tensors)


def test_saving_an_unsupported_dtype_is_a_type_error_naming_the_tensor(tmp_path):
    with pytest.raises(TypeError, match="'z'.*complex64"):
        nanogpt2.save_safetensors({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "z.safetensors")
    assert not any(tmp_path.iterdir())  # no half-written file left behind


# --- fuzzing ----------------------------------------------------------------------------------------

@given(in_data=st.booleans(), position=st.integers(min_value=0))
def test_any_truncation_is_a_checkpoint_error(original, scratch, in_data, position):
    _, data = original
    n = struct.unpack("<Q", data[:8])[0]  # the header is most of this small file: cut in each part half the time
    cut = 8 + n + position % (len(data) - 8 - n) if in_data else position % (8 + n)
    scratch.write_bytes(data[:cut])  # every prefix is too short: the last tensor is not empty
    with pytest.raises(nanogpt2.CheckpointError, match="truncated|too short|not valid JSON"):
        nanogpt2.load_safetensors(scratch)


@given(flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(1, 255)), min_size=1, max_size=4))
def test_flipped_header_bytes_give_checkpoint_error_or_exactly_what_the_header_says(original, scratch, flips):
    _, data = original
    n = struct.unpack("<Q", data[:8])[0]
    mutated = bytearray(data)
    for position, xor in flips:
        mutated[8 + position % n] ^= xor
    scratch.write_bytes(bytes(mutated))
    assert_loads_as_its_header_says_or_fails_cleanly(scratch, bytes(mutated))


@given(flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(1, 255)), min_size=1, max_size=4))
def test_flipped_data_bytes_change_only_values(original, scratch, flips):
    tensors, data = original
    n = struct.unpack("<Q", data[:8])[0]
    mutated = bytearray(data)
    for position, xor in flips:
        mutated[8 + n + position % (len(data) - 8 - n)] ^= xor
    scratch.write_bytes(bytes(mutated))
    got = assert_loads_as_its_header_says_or_fails_cleanly(scratch, bytes(mutated))
    assert got is not None, "the header is intact, so the file must load"
    assert {k: (v.dtype, v.shape) for k, v in got.items()} == {k: (v.dtype, v.shape) for k, v in tensors.items()}


def _entries(data_size):
    """Header entries that may lie: dtype names real and unknown (strings; other JSON types are a known bug,
    see test_a_dtype_that_is_not_a_string_is_a_checkpoint_error), shapes that do or do not match the bytes,
    offsets inside, at the edge of and beyond the data section, negative, reversed, not integers."""
    unknown = ["F8_E4M3", "U16", "U64", "C64", "f32", "", "BOOL "]
    dtype = st.one_of(st.sampled_from(sorted(DTYPES)), st.sampled_from(unknown))  # half real, half unknown
    shape = st.lists(st.integers(-2, 1024), max_size=4)  # numbers numpy can hold (impossible shapes: see below)
    edge = st.sampled_from([-1, 0, 1, data_size - 1, data_size, data_size + 1, data_size + 8, 2 ** 64])
    begin = st.one_of(st.integers(-2, data_size + 2), st.integers(data_size, data_size + 8), edge)
    offsets = st.one_of(
        st.tuples(begin, st.integers(-4, 24)).map(lambda t: [t[0], t[0] + t[1]]),  # a span starting anywhere
        st.lists(st.one_of(edge, st.sampled_from([1.0, "0", None, True])), max_size=3),  # not a pair of ints
        st.none(),
    )
    return st.fixed_dictionaries({"dtype": dtype, "shape": shape, "data_offsets": offsets})


@settings(max_examples=8 * settings.default.max_examples)  # cheap examples, and the lies that pass most checks are rare
@given(data=st.data())
def test_lying_headers_give_checkpoint_error_or_exactly_the_claimed_bytes(original, scratch, data):
    _, valid = original
    n = struct.unpack("<Q", valid[:8])[0]
    body = valid[8 + n:]
    header = json.loads(valid[8: 8 + n])
    names = data.draw(st.lists(st.sampled_from(sorted(header) + ["new"]), min_size=1, max_size=3, unique=True))
    for name in names:  # rewrite (or add) a few entries, keep the rest honest
        header[name] = data.draw(_entries(len(body)))
        if data.draw(st.integers(0, 3)):  # mostly make the shape agree with the byte count, to get past that check
            info = header[name]
            if info["dtype"] in ITEMSIZE and isinstance(info["data_offsets"], list) and len(info["data_offsets"]) == 2 \
                    and all(type(o) is int for o in info["data_offsets"]):
                span = info["data_offsets"][1] - info["data_offsets"][0]
                if span >= 0 and span % ITEMSIZE[info["dtype"]] == 0:
                    info["shape"] = [span // ITEMSIZE[info["dtype"]]]
    header_bytes = json.dumps(header).encode()
    mutated = struct.pack("<Q", len(header_bytes)) + header_bytes + body
    scratch.write_bytes(mutated)
    assert_loads_as_its_header_says_or_fails_cleanly(scratch, mutated)


@given(change=st.one_of(st.integers(-16, 16), st.integers(-(2 ** 64), 2 ** 64)))
def test_a_wrong_header_length_gives_checkpoint_error_or_exactly_what_the_header_says(original, scratch, change):
    _, data = original
    n = struct.unpack("<Q", data[:8])[0]
    claimed = (n + change) % 2 ** 64  # near the true length, or anywhere up to 2**64 - 1
    mutated = struct.pack("<Q", claimed) + data[8:]
    scratch.write_bytes(mutated)
    # Mostly a shorter claim cuts the JSON and a longer one swallows binary data into it (or runs past the
    # end); but a claim that cuts only the header's padding (spaces) leaves a valid file with another
    # data section, whose tensors the oracle then reads from there.
    got = assert_loads_as_its_header_says_or_fails_cleanly(scratch, mutated)
    assert got is None or n - 7 <= claimed <= n


def test_empty_and_tiny_files_are_checkpoint_errors(scratch):
    for data in (b"", b"\x00" * 7, struct.pack("<Q", 0), struct.pack("<Q", 2) + b"[]", struct.pack("<Q", 4) + b"null"):
        scratch.write_bytes(data)
        with pytest.raises(nanogpt2.CheckpointError):
            nanogpt2.load_safetensors(scratch)


@pytest.mark.parametrize("offsets", [[80, 84], [78, 82], [-4, 0], [8, 4], [0, 2 ** 64], [2 ** 64, 2 ** 64 + 4]],
                         ids=["past_the_end", "straddling_the_end", "negative", "reversed", "huge_end", "huge_begin"])
def test_offsets_outside_the_data_are_a_checkpoint_error(scratch, offsets):
    span = max(offsets[1] - offsets[0], 0)
    header = json.dumps({"a": {"dtype": "U8", "shape": [span], "data_offsets": offsets}}).encode()
    scratch.write_bytes(struct.pack("<Q", len(header)) + header + bytes(80))
    with pytest.raises(nanogpt2.CheckpointError, match="tensor 'a'"):
        nanogpt2.load_safetensors(scratch)


def test_overlapping_tensors_are_a_checkpoint_error(scratch):
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}).encode()
    scratch.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(nanogpt2.CheckpointError, match="overlap"):
        nanogpt2.load_safetensors(scratch)


# --- known bugs: headers the checks let through to numpy and json, which raise their own errors ----------

def _write_header(path, header_bytes: bytes, data: bytes = bytes(4)):
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)


@pytest.mark.parametrize("dtype", [["F32"], {"name": "F32"}], ids=["list", "object"])
def test_a_dtype_that_is_not_a_string_is_a_checkpoint_error(scratch, dtype):
    _write_header(scratch, json.dumps({"a": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}}).encode())
    with pytest.raises(nanogpt2.CheckpointError, match="dtype"):
        nanogpt2.load_safetensors(scratch)


@pytest.mark.parametrize("shape, offsets", [([True], [0, 4]), ([1] * 65, [0, 4]), ([0, 2 ** 63], [0, 0]),
                                            ([0, 2 ** 40, 2 ** 40], [0, 0])],
                         ids=["boolean", "65_dimensions", "huge_times_zero", "product_overflows"])
def test_a_shape_numpy_cannot_hold_is_a_checkpoint_error(scratch, shape, offsets):
    _write_header(scratch, json.dumps({"a": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}).encode())
    with pytest.raises(nanogpt2.CheckpointError, match="shape"):
        nanogpt2.load_safetensors(scratch)


@pytest.mark.parametrize("header_bytes", [b'{"a": {"dtype": "F32", "shape": [' + b"1" * 5000 + b'], '
                                          b'"data_offsets": [0, 4]}}', b"[" * 100_000 + b"]" * 100_000],
                         ids=["5000_digit_integer", "nested_100000_deep"])
def test_header_json_python_cannot_parse_is_a_checkpoint_error(scratch, header_bytes):
    _write_header(scratch, header_bytes)
    with pytest.raises(nanogpt2.CheckpointError, match="JSON"):
        nanogpt2.load_safetensors(scratch)
