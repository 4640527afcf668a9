"""convert_tf.py: OpenAI's original TensorFlow checkpoints of GPT-2 and ImageGPT, read with numpy alone and
written as Hugging Face folders (config.json + model.safetensors) that nanogpt2.py, imagegpt.py and
transformers all load. TensorFlow is never imported.

How a TensorFlow checkpoint is stored (the "tensor bundle" format), from the outside in:

    model.ckpt.index                   an SSTable (LevelDB's sorted table): name -> BundleEntryProto
    model.ckpt.data-00000-of-00001     the raw tensor bytes, one tensor after another (several shards possible)

    .index   [data block][trailer] [data block][trailer] ... [metaindex block][trailer] [index block][trailer] [footer]
    footer   48 bytes at the very end: two block handles (varint offset, varint size), zero padding, and the
             magic number 0xdb4775248b80fb57. The "index block" handle says where the index block is.
    trailer  5 bytes after every block: a compression byte (0 = none) and a masked CRC32C of block + that byte.
    block    entries (shared, unshared, value_length as varints; the key's unshared tail; the value), then
             "restart points": uint32 offsets of entries whose key is stored whole, then their count.
             Each key stores only what differs from the key before it (prefix compression).
    index block    key = a separator >= every key of a data block, value = that block's handle.
    data blocks    key "" = BundleHeaderProto (num_shards, endianness); every other key is a tensor name and
                   its value a BundleEntryProto: dtype, shape, shard_id, offset, size, crc32c.
    tensor   bytes [offset, offset + size) of model.ckpt.data-{shard_id:05d}-of-{num_shards:05d}, little-endian,
             row-major; crc32c is the masked CRC32C of exactly those bytes.

Map of this file:
    1. CRC32C              the checksum of blocks and tensors, the textbook loop (ten lines); LevelDB's mask
    2. Protobuf by hand    varints and the three messages the bundle needs
    3. The .index SSTable  footer -> index block -> data blocks -> entries
    4. CheckpointReader    lists names, dtypes and shapes without touching data; reads one tensor at a time
    5. GPT-2 mapping       openai/gpt-2 names -> GPT2LMHeadModel's state dict and config
    6. ImageGPT mapping    openai/image-gpt names -> ImageGPTForCausalImageModeling's state dict and config
    7. Writing             model.safetensors by hand, config.json, an output folder that appears whole or not at all
    8. Downloading         OpenAI's release files over HTTPS, resumable
    9. Command line
    Appendix               a fast CRC32C: the same checksum on numpy lanes, ~30x faster, for GBs of tensor data

Run:
    python convert_tf.py models/124M out/gpt2            # a folder with hparams.json and model.ckpt.*
    python convert_tf.py --download gpt2-124M out/gpt2   # fetch OpenAI's files first, then convert
    python convert_tf.py --list models/124M              # names, dtypes and shapes only
"""

import argparse
import errno
import hashlib
import http.client
import json
import math
import mmap
import os
import re
import shutil
import struct
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file is malformed, corrupted or not what was expected. The message names the file."""


class CorruptFileError(CheckpointError):
    """A file whose bytes fail their CRC32C, or are cut short: `path` names it, so that --download can
    delete its cached copy and a rerun fetch it again."""

    def __init__(self, path, message):
        super().__init__(f"{path}: {message}")
        self.path = path


# --- 1. CRC32C -------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli) is what LevelDB and TensorFlow checksum with. Stored values are "masked": a CRC of
# data that itself contains CRCs is weak, so the stored value is rotated right by 15 bits and offset.
# Which loop checks what: crc32c below, the textbook loop (~5 MB/s in Python), checks the .index file's blocks
# (KBs). Tensor data (up to 6 GB for GPT-2 1558M) is checked by crc32c_fast, the same CRC run on numpy lanes at
# ~150 MB/s, in the appendix at the end of the file; tests/test_convert_tf.py checks that the two agree.

CRC_POLY = 0x82F63B78  # Castagnoli polynomial, bit-reversed (the CRC is computed least significant bit first)


def _make_crc_table():
    """CRC_TABLE[i]: a register holding i after eight steps of one bit each (shift right; XOR the polynomial
    in when the bit shifted out was 1)."""
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (CRC_POLY if crc & 1 else 0)
        table.append(crc)
    return table


CRC_TABLE = _make_crc_table()


def crc32c(data):
    """CRC-32C of a bytes-like object, as an int in [0, 2^32). A 32-bit register starts at 0xFFFFFFFF. Each byte
    in turn is XORed into the register's low 8 bits; those 8 bits are then shifted out (the register moves right
    by 8) and what they leave behind, CRC_TABLE at their value, is XORed in. The result is the last register with
    all 32 bits flipped. Check value: crc32c(b"123456789") == 0xE3069283."""
    register = 0xFFFFFFFF
    for byte in data:
        register = CRC_TABLE[(register ^ byte) & 0xFF] ^ (register >> 8)
    return register ^ 0xFFFFFFFF


def mask_crc(crc):
    """LevelDB's masked CRC, as TensorFlow stores it: rotate the 32-bit crc right by 15 bits, then add
    0xA282EAD8, all mod 2^32. Returns an int in [0, 2^32)."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# --- 2. Protobuf by hand ---------------------------------------------------------------------------------
# A protobuf message is a list of (field number << 3 | wire type) keys, each followed by its value:
# wire type 0 a varint, 1 eight bytes, 2 a varint length and that many bytes, 5 four bytes.

def read_varint(buf, pos, where):
    """Decode the base-128 varint at buf[pos]: 7 bits per byte, low bits first, high bit = "more follows".
    Returns (value, position after it). Running out of bytes, or more than 10 bytes, is a CheckpointError
    naming `where`."""
    result = 0
    for shift in range(0, 70, 7):
        if pos >= len(buf):
            raise CheckpointError(f"{where}: truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
    raise CheckpointError(f"{where}: varint longer than 10 bytes")


def proto_fields(buf, where):
    """Yield (field number, value) for every field of the protobuf message in buf, in order. Each field is a
    varint key (field number = key >> 3, wire type = key & 7) and a value: wire type 0 a varint (an int);
    1 eight bytes and 5 four bytes (little-endian ints); 2 a varint length and that many bytes (bytes). Any
    other wire type, or a value running past the end, is a CheckpointError naming `where`."""
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos, where)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(buf, pos, where)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > len(buf):
                raise CheckpointError(f"{where}: truncated fixed-size field {field}")
            value, pos = int.from_bytes(buf[pos:pos + size], "little"), pos + size
        elif wire == 2:
            size, pos = read_varint(buf, pos, where)
            if pos + size > len(buf):
                raise CheckpointError(f"{where}: field {field} claims {size} bytes, {len(buf) - pos} remain")
            value, pos = bytes(buf[pos:pos + size]), pos + size
        else:
            raise CheckpointError(f"{where}: unsupported protobuf wire type {wire} (field {field})")
        yield field, value


def as_int64(value):
    """Varints carry int64 as two's complement in 64 bits (-1 arrives as 2**64 - 1)."""
    return value - (1 << 64) if value >= 1 << 63 else value


# TensorFlow's DataType enum (tensorflow/core/framework/types.proto) -> (name, numpy dtype of the stored bytes)
DTYPES = {1: ("float32", "<f4"), 2: ("float64", "<f8"), 3: ("int32", "<i4"), 9: ("int64", "<i8"),
          14: ("bfloat16", "<u2"), 19: ("float16", "<f2")}
NUMPY_DTYPES = dict(DTYPES.values())  # "float32" -> "<f4", ...
DTYPE_NAMES = {4: "uint8", 5: "int16", 6: "int8", 7: "string", 8: "complex64", 10: "bool", 17: "uint16",
               18: "complex128", 22: "uint32", 23: "uint64"}  # the ones skipped, named in the note


@dataclass
class TensorEntry:
    """One BundleEntryProto: where a tensor's bytes are and what they hold."""
    name: str
    dtype: str           # "float32", ..., or the unsupported type's name
    shape: tuple
    shard: int = 0       # field 3, shard_id
    offset: int = 0      # field 4
    size: int = 0        # field 5, bytes
    crc: int = 0         # field 6, masked CRC32C of the bytes
    slices: int = 0      # field 7, repeated: a partitioned variable lists its slices here


def parse_entry(name, buf, where):
    dtype_code, shape, entry = 0, (), TensorEntry(name, "", ())
    for field, value in proto_fields(buf, where):
        if field == 1:
            dtype_code = value
        elif field == 2:  # TensorShapeProto: repeated Dim dim = 2 (Dim: int64 size = 1)
            dims = [dict(proto_fields(dim, where)) for f, dim in proto_fields(value, where) if f == 2]
            shape = tuple(as_int64(dim.get(1, 0)) for dim in dims)  # a size of 0 is left out: the default
        elif field == 3:
            entry.shard = value
        elif field == 4:
            entry.offset = as_int64(value)
        elif field == 5:
            entry.size = as_int64(value)
        elif field == 6:
            entry.crc = value
        elif field == 7:
            entry.slices += 1
    entry.shape = shape
    entry.dtype = DTYPES[dtype_code][0] if dtype_code in DTYPES else DTYPE_NAMES.get(dtype_code, f"#{dtype_code}")
    return entry


# --- 3. The .index SSTable -------------------------------------------------------------------------------

FOOTER_SIZE = 48
TABLE_MAGIC = 0xDB4775248B80FB57


def read_block(data, handle_bytes, path, what):
    """Check a block's trailer (compression byte, masked CRC32C) and return its contents."""
    offset, pos = read_varint(handle_bytes, 0, f"{path}: {what} handle")
    size, _ = read_varint(handle_bytes, pos, f"{path}: {what} handle")
    end = len(data) - FOOTER_SIZE
    if offset + size + 5 > end:
        raise CheckpointError(f"{path}: truncated block: {what} at bytes [{offset}, {offset + size + 5}) "
                              f"runs past the {end} bytes before the footer")
    block = data[offset:offset + size]
    compression = data[offset + size]
    stored = int.from_bytes(data[offset + size + 1:offset + size + 5], "little")
    actual = mask_crc(crc32c(data[offset:offset + size + 1]))
    if stored != actual:
        raise CorruptFileError(path, f"CRC mismatch in {what} (bytes [{offset}, {offset + size})): stored "
                                     f"{stored:#010x}, computed {actual:#010x}; the file is corrupted")
    if compression != 0:
        raise CheckpointError(f"{path}: {what} uses compression type {compression}; tensor bundles are "
                              f"written uncompressed (0)")
    return block


def block_entries(block, path, what):
    """Yield (key, value), both bytes, from an SSTable block, undoing the prefix compression of keys.

    The block ends with num_restarts little-endian uint32 restart offsets and then num_restarts itself
    (uint32). Before them, entries follow one another: varints shared, unshared and value_length, then the
    unshared key bytes and the value. An entry's key is the previous key's first `shared` bytes plus its own
    unshared bytes; at a restart point shared is 0. A block too short for its restart count, more restarts
    than fit, an entry running past the entries, sharing more than the previous key has, or a restart point
    that shares, is a CheckpointError naming path and what.
    """
    if len(block) < 4:
        raise CheckpointError(f"{path}: {what} is {len(block)} bytes, too short for its restart count")
    num_restarts = int.from_bytes(block[-4:], "little")
    entries_end = len(block) - 4 * (num_restarts + 1)
    if entries_end < 0:
        raise CheckpointError(f"{path}: {what} claims {num_restarts} restart points, more than fit")
    restarts = set(struct.unpack_from(f"<{num_restarts}I", block, entries_end))
    key, pos, where = b"", 0, f"{path}: {what}"
    while pos < entries_end:
        start = pos
        shared, pos = read_varint(block, pos, where)
        unshared, pos = read_varint(block, pos, where)
        value_length, pos = read_varint(block, pos, where)
        if shared > len(key) or pos + unshared + value_length > entries_end:
            raise CheckpointError(f"{where}: entry at byte {start} runs past its block")
        if start in restarts and shared != 0:  # a restart point stores its key whole
            raise CheckpointError(f"{where}: restart point at byte {start} shares {shared} key bytes")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + value_length]
        pos += value_length


MAX_INDEX_BYTES = 256 << 20


def read_index(path):
    """Return (header fields, [(name bytes, BundleEntryProto bytes), ...]) from a .index file."""
    size = os.path.getsize(path)
    if size > MAX_INDEX_BYTES:  # OpenAI's largest index (igpt-l) is under a megabyte; this one is read whole
        raise CheckpointError(f"{path}: {size} bytes, larger than any TensorFlow index this reads "
                              f"({MAX_INDEX_BYTES >> 20} MB): not an index, or corrupt")
    data = Path(path).read_bytes()
    if len(data) < FOOTER_SIZE:
        raise CheckpointError(f"{path}: {len(data)} bytes, too short for a TensorFlow index "
                              f"(its footer alone is {FOOTER_SIZE})")
    footer = data[-FOOTER_SIZE:]
    magic = int.from_bytes(footer[-8:], "little")
    if magic != TABLE_MAGIC:
        raise CheckpointError(f"{path}: bad magic number {magic:#018x} (expected {TABLE_MAGIC:#018x}): "
                              f"not a TensorFlow checkpoint index, or truncated")
    # Footer: metaindex handle, then index handle (varints), then padding. Skip the first handle.
    _, pos = read_varint(footer, 0, f"{path}: footer")
    _, pos = read_varint(footer, pos, f"{path}: footer")
    index_block = read_block(data, footer[pos:40], path, "index block")
    header, entries, previous = None, [], None
    for number, (_, handle) in enumerate(block_entries(index_block, path, "index block")):
        what = f"data block {number}"
        for key, value in block_entries(read_block(data, handle, path, what), path, what):
            if previous is not None and key <= previous:
                raise CheckpointError(f"{path}: keys out of order ({previous!r} then {key!r})")
            previous = key
            if key == b"":  # the header entry sorts first
                header = dict(proto_fields(value, f"{path}: header"))
            else:
                entries.append((key, value))
    if header is None:
        raise CheckpointError(f"{path}: no header entry (key \"\"): not a TensorFlow V2 checkpoint")
    return header, entries


# --- 4. CheckpointReader ---------------------------------------------------------------------------------

class CheckpointReader:
    """A TensorFlow V2 checkpoint, opened by prefix ("dir/model.ckpt" for dir/model.ckpt.index).

    reader.entries  {name: TensorEntry} of the tensors it can read, known without reading any data
    reader.skipped  {name: reason} of the ones it cannot (strings, partitioned variables, other dtypes)
    reader.read(name, verify=False) -> numpy array (read-only; bfloat16 widened exactly to float32)
    """

    def __init__(self, prefix):
        self.prefix = str(prefix)
        index_path = self.prefix + ".index"
        header, raw_entries = read_index(index_path)
        self.num_shards = header.get(1, 1)
        if not 1 <= self.num_shards <= 1 << 16:
            raise CheckpointError(f"{index_path}: the header claims {self.num_shards} data shards")
        if header.get(2, 0) not in (0, 1):
            raise CheckpointError(f"{index_path}: unknown endianness {header.get(2)} in the header")
        self.byteorder = ">" if header.get(2, 0) == 1 else "<"
        self.entries, self.skipped = {}, {}
        for key, value in raw_entries:
            if key[:1] == b"\x00":  # a slice of a partitioned variable (an encoded key, not a name)
                continue
            try:
                name = key.decode("utf-8")
            except UnicodeDecodeError:
                raise CheckpointError(f"{index_path}: tensor name {key!r} is not UTF-8") from None
            entry = parse_entry(name, value, f"{index_path}: entry {name!r}")
            reason = self._unreadable(entry, index_path)
            if reason:
                self.skipped[name] = reason
            else:
                self.entries[name] = entry
        self.shard_paths = [f"{self.prefix}.data-{i:05d}-of-{self.num_shards:05d}" for i in range(self.num_shards)]
        for path in self.shard_paths:
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: data shard missing ({index_path} says there are {self.num_shards})")
        self._maps = {}

    def _unreadable(self, entry, index_path):
        """Why a tensor is skipped, or "" if it can be read; raise if its entry contradicts itself."""
        if entry.slices:
            return f"partitioned into {entry.slices} slices (not supported; OpenAI's releases have none)"
        if entry.dtype not in NUMPY_DTYPES:
            return f"dtype {entry.dtype} (not supported; model weights are floats)"
        if any(d < 0 for d in entry.shape):
            return f"shape {list(entry.shape)} has unknown dimensions"
        itemsize = np.dtype(NUMPY_DTYPES[entry.dtype]).itemsize
        expected = itemsize * math.prod(entry.shape)
        if entry.size != expected or entry.offset < 0 or not 0 <= entry.shard < self.num_shards:
            raise CheckpointError(f"{index_path}: entry {entry.name!r} is inconsistent: {entry.dtype} "
                                  f"{list(entry.shape)} needs {expected} bytes, entry says {entry.size} "
                                  f"at offset {entry.offset} of shard {entry.shard}/{self.num_shards}")
        return ""

    def _shard(self, index):
        """The data shard as a read-only memory map: bytes are paged in only when a tensor is read."""
        if index not in self._maps:
            with open(self.shard_paths[index], "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self._maps[index] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        return self._maps[index]

    def read(self, name, verify=False):
        """Read one tensor. verify: check its CRC32C (crc32c_fast, ~150 MB/s), so a corrupted shard raises."""
        if name not in self.entries:
            why = self.skipped.get(name, "no such tensor")
            raise KeyError(f"{name!r} cannot be read from {self.prefix}: {why}")
        entry = self.entries[name]
        path, data = self.shard_paths[entry.shard], self._shard(entry.shard)
        if entry.offset + entry.size > len(data):
            raise CorruptFileError(path, f"truncated: tensor {name!r} needs bytes [{entry.offset}, "
                                         f"{entry.offset + entry.size}) but the file has {len(data)} bytes")
        raw = data[entry.offset:entry.offset + entry.size]  # a copy, so no view pins the map open
        if verify and mask_crc(crc32c_fast(raw)) != entry.crc:  # the numpy lanes (appendix): tensors are GBs
            raise CorruptFileError(path, f"CRC mismatch in tensor {name!r} (bytes [{entry.offset}, "
                                         f"{entry.offset + entry.size})): the file is corrupted")
        stored = np.dtype(NUMPY_DTYPES[entry.dtype]).newbyteorder(self.byteorder)
        array = np.frombuffer(raw, stored).reshape(entry.shape)
        if entry.dtype == "bfloat16":  # bfloat16 is the top half of a float32: shift the bits back up
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array if self.byteorder == "<" else array.astype(array.dtype.newbyteorder("<"))

    def close(self):
        for data in self._maps.values():
            if isinstance(data, mmap.mmap):
                data.close()
        self._maps = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def find_checkpoint(src):
    """SRC is a checkpoint prefix, its .index file, or a folder holding one checkpoint -> the prefix."""
    src = Path(src)
    if src.is_dir():
        indexes = sorted(p for p in src.glob("*.index") if p.is_file())  # not a FIFO, which would block
        if len(indexes) == 1:
            return str(indexes[0])[:-len(".index")]
        state = src / "checkpoint"  # TF's pointer to the latest of several: model_checkpoint_path: "..."
        if indexes and state.is_file():
            with open(state, "rb") as f:
                text = f.read(1 << 16).decode("utf-8", errors="replace")
            match = re.search(r'^model_checkpoint_path:\s*"(.*)"', text, re.MULTILINE)
            if match:  # TF itself falls back on the base name when the folder has moved; only that is followed
                chosen = src / os.path.basename(match.group(1))
                if Path(str(chosen) + ".index") in indexes:
                    return str(chosen)
                raise CheckpointError(f"{state} points at {match.group(1)!r}, which is not one of this folder's "
                                      f"checkpoints ({', '.join(p.name for p in indexes)}); pass the prefix of one")
        if not indexes:
            raise CheckpointError(f"{src}: no *.index file in this folder (expected e.g. model.ckpt.index)")
        raise CheckpointError(f"{src}: several checkpoints ({', '.join(p.name for p in indexes)}); "
                              f"pass the prefix of one, e.g. {str(indexes[-1])[:-len('.index')]}")
    if Path(str(src) + ".index").is_file():
        return str(src)
    if src.suffix == ".index" and src.is_file():
        return str(src)[:-len(".index")]
    raise CheckpointError(f"{src}: not found (expected a checkpoint folder, or a prefix P with P.index beside it)")


# --- Shared by both mappings -----------------------------------------------------------------------------

OPTIMIZER_SLOTS = {"Adam", "Adam_1", "adam_m", "adam_v", "Momentum", "RMSProp", "RMSProp_1"}
OPTIMIZER_SCOPES = {"AdamWeightDecayOptimizer", "AdamWeightDecayOptimizer_1"}
COUNTERS = {"global_step", "_step", "beta1_power", "beta2_power"}


def is_training_state(name):
    """Optimiser slots (model/wte/Adam) and step counters: saved by training, not part of the model."""
    parts = name.split("/")
    return parts[-1] in OPTIMIZER_SLOTS | COUNTERS or any(p in OPTIMIZER_SCOPES for p in parts)


class Plan:
    """The output state dict as a list of (HF name, shape, function returning the array), built from the
    index alone so that every name and shape is checked before a byte is written."""

    def __init__(self, reader, family):
        self.reader, self.family, self.items, self.used = reader, family, [], set()

    def require(self, name, shape=None):
        entry = self.reader.entries.get(name)
        if entry is None:
            why = self.reader.skipped.get(name, "missing")
            raise CheckpointError(f"{self.reader.prefix}: {self.family} needs variable {name} ({why})")
        if shape is not None and entry.shape != tuple(shape):
            raise CheckpointError(f"{self.reader.prefix}: {name} has shape {list(entry.shape)}, "
                                  f"expected {list(shape)}")
        self.used.add(name)
        return entry

    def add(self, hf_name, shape, make):
        self.items.append((hf_name, tuple(shape), make))

    def unrecognised(self):
        names = set(self.reader.entries) | set(self.reader.skipped)
        return sorted(n for n in names if n not in self.used and not is_training_state(n))


def count_layers(reader):
    layers = {int(m.group(1)) for n in reader.entries if (m := re.match(r"model/h(\d+)/", n))}
    if layers != set(range(len(layers))):
        raise CheckpointError(f"{reader.prefix}: layer numbers {sorted(layers)} are not 0..{len(layers) - 1}")
    return len(layers)


# --- 5. GPT-2 mapping ------------------------------------------------------------------------------------
# openai/gpt-2 stores Conv1D weights as [1, nx, nf]; Hugging Face's Conv1D keeps (nx, nf): drop the 1.
# lm_head is tied to wte, so GPT2LMHeadModel saves no lm_head.weight and neither do we.

GPT2_LAYER = [  # (TF name under model/h{i}/, HF name under transformer.h.{i}., shape in units of n_embd)
    ("ln_1/g", "ln_1.weight", (1,)), ("ln_1/b", "ln_1.bias", (1,)),
    ("attn/c_attn/w", "attn.c_attn.weight", (1, 3)), ("attn/c_attn/b", "attn.c_attn.bias", (3,)),  # q, k, v
    ("attn/c_proj/w", "attn.c_proj.weight", (1, 1)), ("attn/c_proj/b", "attn.c_proj.bias", (1,)),
    ("ln_2/g", "ln_2.weight", (1,)), ("ln_2/b", "ln_2.bias", (1,)),
    ("mlp/c_fc/w", "mlp.c_fc.weight", (1, 4)), ("mlp/c_fc/b", "mlp.c_fc.bias", (4,)),
    ("mlp/c_proj/w", "mlp.c_proj.weight", (4, 1)), ("mlp/c_proj/b", "mlp.c_proj.bias", (1,)),
]


def gpt2_plan(reader, hparams_path, verify):
    if not hparams_path.is_file():
        raise CheckpointError(f"{hparams_path}: not found; GPT-2 needs it for n_head (it is beside "
                              f"model.ckpt.index in OpenAI's release)")
    try:
        hp = json.loads(hparams_path.read_text())
        n_vocab, n_ctx, n, n_head, n_layer = (int(hp[key]) for key in ("n_vocab", "n_ctx", "n_embd", "n_head",
                                                                        "n_layer"))
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{hparams_path}: expected JSON with n_vocab, n_ctx, n_embd, n_head, n_layer "
                              f"({error!r})") from None
    if n_head <= 0 or n % n_head:
        raise CheckpointError(f"{hparams_path}: n_head {n_head} does not divide n_embd {n}")
    if count_layers(reader) != n_layer:
        raise CheckpointError(f"{reader.prefix}: has {count_layers(reader)} layers, hparams.json says {n_layer}")
    plan = Plan(reader, "GPT-2")

    def take(tf_name, hf_name, shape):
        entry = plan.require(tf_name)
        if entry.shape not in (shape, (1, *shape)):  # the leading 1 of Conv1D weights is optional
            raise CheckpointError(f"{reader.prefix}: {tf_name} has shape {list(entry.shape)}, "
                                  f"expected {list(shape)}")
        plan.add(hf_name, shape, lambda: reader.read(tf_name, verify).reshape(shape).astype(np.float32))

    take("model/wte", "transformer.wte.weight", (n_vocab, n))  # (vocab, n_embd)
    take("model/wpe", "transformer.wpe.weight", (n_ctx, n))    # (positions, n_embd)
    for i in range(n_layer):
        for tf_name, hf_name, units in GPT2_LAYER:
            take(f"model/h{i}/{tf_name}", f"transformer.h.{i}.{hf_name}", tuple(u * n for u in units))
    take("model/ln_f/g", "transformer.ln_f.weight", (n,))
    take("model/ln_f/b", "transformer.ln_f.bias", (n,))
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": n_vocab, "n_positions": n_ctx, "n_embd": n, "n_layer": n_layer, "n_head": n_head,
        "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "initializer_range": 0.02,
        "scale_attn_weights": True, "use_cache": True, "tie_word_embeddings": True,
        "bos_token_id": n_vocab - 1, "eos_token_id": n_vocab - 1,  # <|endoftext|> is the last token
        "torch_dtype": "float32",
    }
    return plan, config


# --- 6. ImageGPT mapping ---------------------------------------------------------------------------------
# openai/image-gpt differs from GPT-2 in storage, not in architecture:
#   q_proj, k_proj, v_proj  [n_head, head_dim, n_embd]: output (head, e) from input f (einsum "bsf,hef->bhse")
#   c_proj                  [n_head, head_dim, n_embd]: input (head, e) to output f
#   sos                     the start-of-sequence embedding: Hugging Face makes it token n_vocab, wte's last row
#   wtet                    the untied output embedding: lm_head.weight
#   no biases anywhere (Hugging Face's Conv1D has them: zeros); layer norms have a gain g only.

def igpt_plan(reader, verify):
    plan = Plan(reader, "ImageGPT")
    wte = plan.require("model/wte")
    n_vocab, n = wte.shape
    n_ctx = plan.require("model/wpe").shape[0]
    n_head = plan.require("model/h0/attn/q_proj").shape[0]
    if n_head <= 0 or n % n_head:
        raise CheckpointError(f"{reader.prefix}: model/h0/attn/q_proj has {n_head} heads for n_embd {n}")
    n_layer = count_layers(reader)
    heads = (n_head, n // n_head, n)

    def read(name):
        return reader.read(name, verify).astype(np.float32)

    def zeros(size):  # Hugging Face's Conv1D has a bias; OpenAI's ImageGPT has none: a zero bias is the same
        return lambda: np.zeros(size, np.float32)


    plan.require("model/sos", (n,))
    plan.add("transformer.wte.weight", (n_vocab + 1, n),             # colours, then SOS as the last token
             lambda: np.concatenate([read("model/wte"), read("model/sos")[None, :]]))
    plan.require("model/wpe", (n_ctx, n))
    plan.add("transformer.wpe.weight", (n_ctx, n), lambda: read("model/wpe"))
    for i in range(n_layer):
        h, p = f"model/h{i}/", f"transformer.h.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "c_proj"):
            plan.require(h + "attn/" + proj, heads)
        # (n_head, head_dim, n_embd) -> (n_out, n_in) -> transposed to Conv1D's (n_in, n_out); q, k, v side by side
        plan.add(p + "attn.c_attn.weight", (n, 3 * n), lambda h=h: np.concatenate(
            [read(h + "attn/" + proj).reshape(n, n).T for proj in ("q_proj", "k_proj", "v_proj")], axis=1))
        plan.add(p + "attn.c_attn.bias", (3 * n,), zeros(3 * n))
        plan.add(p + "attn.c_proj.weight", (n, n), lambda h=h: read(h + "attn/c_proj").reshape(n, n))  # (in, out)
        plan.add(p + "attn.c_proj.bias", (n,), zeros(n))
        for tf_name, hf_name, shape in (("ln_1/g", "ln_1.weight", (n,)), ("ln_2/g", "ln_2.weight", (n,)),
                                        ("mlp/c_fc/w", "mlp.c_fc.weight", (n, 4 * n)),
                                        ("mlp/c_proj/w", "mlp.c_proj.weight", (4 * n, n))):
            plan.require(h + tf_name, shape)
            plan.add(p + hf_name, shape, lambda name=h + tf_name: read(name))
        plan.add(p + "mlp.c_fc.bias", (4 * n,), zeros(4 * n))
        plan.add(p + "mlp.c_proj.bias", (n,), zeros(n))
    plan.require("model/ln_f/g", (n,))
    plan.add("transformer.ln_f.weight", (n,), lambda: read("model/ln_f/g"))
    plan.require("model/wtet", (n_vocab, n))
    plan.add("lm_head.weight", (n_vocab, n), lambda: read("model/wtet"))
    config = {
        "architectures": ["ImageGPTForCausalImageModeling"], "model_type": "imagegpt",
        "vocab_size": n_vocab + 1, "n_positions": n_ctx, "n_embd": n, "n_layer": n_layer, "n_head": n_head,
        "n_inner": None, "activation_function": "quick_gelu", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "initializer_range": 0.02,
        "scale_attn_weights": True, "use_cache": True, "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    return plan, config


def make_plan(reader, verify=True):
    """Tell the family from the variable names and build its plan."""
    names = reader.entries
    if "model/h0/attn/c_attn/w" in names:
        return gpt2_plan(reader, Path(reader.prefix).parent / "hparams.json", verify)
    if "model/h0/attn/q_proj" in names or "model/wtet" in names:
        return igpt_plan(reader, verify)
    sample = ", ".join(sorted(names)[:5]) or "none"
    raise CheckpointError(f"{reader.prefix}: neither GPT-2 (model/h0/attn/c_attn/w) nor ImageGPT "
                          f"(model/h0/attn/q_proj) variables found; first names: {sample}")


# --- 7. Writing ------------------------------------------------------------------------------------------

def safetensors_header(entries, metadata: Optional[dict] = None) -> bytes:
    """The start of a .safetensors file whose tensors follow back to back in the order given: entries are
    (name, dtype code such as "F32", shape, size in bytes). Returns the header's length (8 bytes, unsigned
    little-endian) and the JSON header, padded with spaces so that the data starts 8-byte aligned."""
    header, offset = {}, 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, size in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def write_safetensors(path, plan):
    """model.safetensors from the plan: safetensors_header (the same as nanogpt2.py's), then each tensor's
    float32 bytes, made and written one at a time so that a 6 GB model never sits in memory whole."""
    entries = [(name, "F32", shape, 4 * math.prod(shape)) for name, shape, _ in plan.items]
    with open(path, "wb") as f:
        f.write(safetensors_header(entries, metadata={"format": "pt"}))
        for name, shape, make in plan.items:
            array = np.ascontiguousarray(make(), dtype="<f4")
            if array.shape != shape:  # the plan promised this shape in the header
                raise AssertionError(f"internal error: {name} came out {array.shape}, planned {shape}")
            f.write(array)  # its buffer, without a copy


def _process_alive(pid: int) -> bool:
    if not 0 < pid < 2 ** 31:  # no process has such an id (0 and -1 would signal whole process groups)
        return False
    if os.name == "nt":  # os.kill would end the process there, not probe it: assume alive, keep its folder
        return True
    try:
        os.kill(pid, 0)  # signal 0: no signal is sent, only the existence check
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (PermissionError): alive
        return True
    return True


def remove_stale_folders(out_dir):
    """Delete the `.OUT_DIR.tmp<PID>` folders that killed runs (kill -9, a power cut) left beside out_dir:
    those whose process no longer exists. A live process's folder is left alone: it may still be writing."""
    out_dir = Path(out_dir)
    for entry in out_dir.parent.iterdir():
        found = re.fullmatch(re.escape(f".{out_dir.name}.tmp") + r"(\d+)", entry.name)
        if found and entry.is_dir() and not _process_alive(int(found.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _fsync(path):
    """Have the system put path's bytes (a file's, or a folder's list of names) on the disk now, not when it
    likes: a rename survives a power cut only if the bytes renamed and the new name are both there. (Windows
    cannot open a folder to sync it; some network file systems cannot sync one: EINVAL.)"""
    if os.name == "nt" and os.path.isdir(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def write_atomically(out_dir, fill):
    """Build the folder under a temporary name beside out_dir (.OUT_DIR.tmp<PID>) and rename it at the end,
    so that a failed or interrupted run leaves no out_dir behind (and never a half-written one); its files and
    the folder are synced to the disk before the rename, and the parent folder after, so that a power cut does
    not leave one either. The folder and its files are made like any others, so the umask sets their modes
    (0755 and 0644 under umask 022)."""
    out_dir = Path(out_dir)
    made = next((p for p in reversed(out_dir.parents) if not p.exists()), None)  # the topmost folder made here
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_folders(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # this process's own, from an earlier call that was cut short
    tmp.mkdir()
    try:
        fill(tmp)
        for path in [*tmp.iterdir(), tmp]:
            _fsync(path)
        if out_dir.is_dir():
            out_dir.rmdir()  # only ever empty here: checked before any work
        os.replace(tmp, out_dir)
        _fsync(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made is not None:  # and the folders made on the way to out_dir: a failed run leaves nothing
            shutil.rmtree(made, ignore_errors=True)
        raise


def check_out_dir(out_dir):
    out_dir = Path(out_dir)
    if out_dir.is_symlink():  # the folder is renamed into place at the end: a link there cannot become one
        raise CheckpointError(f"{out_dir}: is a symbolic link; give the folder's real path, or a new name")
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise CheckpointError(f"{out_dir}: already exists and is not an empty folder; choose another OUT_DIR "
                              f"or remove it")


def convert(src, out_dir, verify=True, log=lambda message: print(message, file=sys.stderr)):
    """Convert the checkpoint at src into a Hugging Face folder out_dir. Returns the config written."""
    check_out_dir(out_dir)
    prefix = find_checkpoint(src)
    folder = Path(prefix).parent
    with CheckpointReader(prefix) as reader:
        plan, config = make_plan(reader, verify)  # every name and shape checked here, before writing
        for name, reason in sorted(reader.skipped.items()):
            log(f"skipped {name}: {reason}")
        training = [name for name in reader.entries if is_training_state(name)]
        if training:
            log(f"skipped {len(training)} optimiser slots and step counters (training state, not the model)")
        unknown = plan.unrecognised()
        if unknown:
            log(f"ignored {len(unknown)} variables that are not part of the model: {', '.join(unknown)}")
        extras = {"vocab.json": folder / "encoder.json", "merges.txt": folder / "vocab.bpe"}  # GPT-2's BPE
        if config["model_type"] == "imagegpt":
            extras = {"kmeans_centers.npy": folder / "kmeans_centers.npy"}  # the 512-colour palette

        def fill(tmp):
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            write_safetensors(tmp / "model.safetensors", plan)
            for name, source in extras.items():
                if source.is_file():
                    shutil.copyfile(source, tmp / name)

        write_atomically(out_dir, fill)
    parameters = sum(math.prod(shape) for _, shape, _ in plan.items)
    log(f"wrote {out_dir}: {plan.family}, {config['n_layer']} layers, {parameters:,} parameters"
        + "".join(f", {name}" for name, source in extras.items() if source.is_file()))
    return config


# --- 8. Downloading --------------------------------------------------------------------------------------

OPENAI_BASE_URL = "https://openaipublic.blob.core.windows.net"
GPT2_FILES = ["hparams.json", "encoder.json", "vocab.bpe"]
PALETTE = "image-gpt/color-clusters/kmeans_centers.npy"
RELEASES = {  # name -> (folder under the base URL, checkpoint prefix, other files under the base URL)
    "gpt2-124M": ("gpt-2/models/124M", "model.ckpt", ["gpt-2/models/124M/" + f for f in GPT2_FILES]),
    "gpt2-355M": ("gpt-2/models/355M", "model.ckpt", ["gpt-2/models/355M/" + f for f in GPT2_FILES]),
    "gpt2-774M": ("gpt-2/models/774M", "model.ckpt", ["gpt-2/models/774M/" + f for f in GPT2_FILES]),
    "gpt2-1558M": ("gpt-2/models/1558M", "model.ckpt", ["gpt-2/models/1558M/" + f for f in GPT2_FILES]),
    "igpt-s": ("image-gpt/checkpoints/igpt-s/1000000", "model.ckpt-1000000", [PALETTE]),  # 32 shards
    "igpt-m": ("image-gpt/checkpoints/igpt-m/1000000", "model.ckpt-1000000", [PALETTE]),  # 32 shards
    "igpt-l": ("image-gpt/checkpoints/igpt-l/1000000", "model.ckpt-1000000", [PALETTE]),  # 64 shards
}


def _progress(desc: str, done: int, total: Optional[int], start: float):
    rate = done / max(time.time() - start, 1e-6) / 1e6
    of = f" / {total / 1e6:.1f} MB ({100 * done / total:.0f}%)" if total else " MB"
    sys.stderr.write(f"\r{desc}: {done / 1e6:.1f}{of}, {rate:.1f} MB/s   ")
    sys.stderr.flush()


def _if_range_value(response) -> str:
    """What identifies this version of the file for an If-Range header: its ETag if strong (If-Range
    accepts no weak W/ ETag), else its Last-Modified date; "" when the server gives neither."""
    etag = response.headers.get("ETag") or ""
    return etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified") or ""



MAX_HEADER_BYTES = 100_000_000  # the format's own limit; a larger "length" means a corrupt file



# A download stops rather than leave less than this free on the disk: an endless or oversized body (a broken
# or hostile server) never fills it. And the most a downloaded JSON file may be: a config.json, an index or
# a palette is a few megabytes at most.
MIN_FREE_BYTES = 256 << 20



MAX_JSON_BYTES = 64 << 20


def download(url: str, dest: str, desc: Optional[str] = None, quiet: bool = False) -> str:
    """Fetch url to dest, resumably and atomically. Bytes go to dest + ".part", continued with an HTTP
    Range request when a previous try was cut off; only a complete file is renamed to dest, so a partial
    download never looks like a cached one. A resume also sends If-Range with the ETag (or Last-Modified)
    the .part was started under, kept in dest + ".part.if-range": if the file has changed on the server
    since, the server sends the whole new file (200) and the .part starts again from zero, so two versions
    are never spliced together (a .part with no such record starts again too).

    Complete means checked: the length against the server's Content-Length; the SHA-256 when the server
    gives it (the hub's ETag for large files); and the contents against their own format (see
    download_problem: a safetensors file as long as its header says, JSON that parses), which also catches
    a body with no length cut short, or an error page sent with status 200. A file that fails is deleted,
    so the next run fetches it afresh. A body longer than its length or its header promised stops, as does
    one that would leave less than MIN_FREE_BYTES on the disk. A connection cut mid-body is one
    CheckpointError (run again to resume). The folder is made only once the server answers with the file,
    so a missing file (404) leaves none behind. HTTP errors are raised as urllib.error.HTTPError: a caller
    may expect some (a 404 for an optional file)."""
    if os.path.exists(dest):
        return dest
    part, if_range_path = dest + ".part", dest + ".part.if-range"
    if_range = ""
    if os.path.exists(part) and os.path.exists(if_range_path):
        with open(if_range_path, encoding="utf-8") as f:
            if_range = f.read().strip()
    have = os.path.getsize(part) if if_range else 0  # a .part with no record of its version starts again
    request = urllib.request.Request(url, headers={"User-Agent": "nanogpt2"})
    if have:
        request.add_header("Range", f"bytes={have}-")
        request.add_header("If-Range", if_range)
    desc = desc or os.path.basename(dest)
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except http.client.HTTPException as e:  # no HTTP answer: a garbage status line, endless headers, ...
        raise CheckpointError(f"download of {url} failed: the server's answer is not valid HTTP "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:
            raise
        # 416: nothing at or after byte `have`. If the server's size (Content-Range: bytes */N) is `have`, the
        # .part is whole (a run killed just before the rename); if not, it is longer than the file: start over.
        size = re.search(r"/(\d+)$", e.headers.get("Content-Range", "") if e.headers else "")
        if size and int(size.group(1)) == have:
            return _finish_download(url, dest, sha256="")
        os.remove(part)
        return download(url, dest, desc, quiet)
    with response:
        if response.status == 206 and not have:
            raise CheckpointError(f"download of {url} failed: asked for the whole file, the server sent part of "
                                  "it (206 Partial Content)")
        if response.status == 206 and not (response.headers.get("Content-Range") or "").startswith(f"bytes {have}-"):
            os.remove(part)  # the server sent another range than the one asked for: splicing it would corrupt
            return download(url, dest, desc, quiet)
        if response.status != 206:  # from zero: a first try, a server that ignored Range, or a changed file
            have = 0
            os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
            with open(if_range_path, "w", encoding="utf-8") as f:
                f.write(_if_range_value(response))
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None and length.isdigit() else None
        free = shutil.disk_usage(os.path.dirname(dest) or ".").free
        if total is not None and total - have > free - MIN_FREE_BYTES:
            raise CheckpointError(f"download of {url} needs {(total - have) / 1e6:.0f} MB, but only {free / 1e6:.0f} MB "
                                  f"are free beside {dest}; free some space and run again")
        etag = (response.headers.get("X-Linked-Etag") or response.headers.get("ETag") or "").strip('"').lower()
        limit, promise = (total, "the server's Content-Length") if total is not None else (None, "")
        start, done, last_report = time.time(), have, 0.0
        try:
            with open(part, "ab" if have else "wb") as f:
                while True:
                    chunk = response.read(1 << 20)
                    if not chunk:
                        break
                    f.write(chunk)
                    done += len(chunk)
                    if limit is None:  # no length from the server: the file's own format may say it
                        f.flush()
                        limit, promise = promised_size(part, dest)
                    if limit is not None and (done > limit or limit < 0):
                        f.close()
                        os.remove(part)
                        os.remove(if_range_path)
                        raise CheckpointError(f"download of {url} " + (
                            f"sent more than the {limit} bytes {promise} promised" if limit >= 0 else
                            "is not a safetensors file (its header cannot be read)") +
                            "; stopped and deleted it (a broken or hostile server)")
                    if shutil.disk_usage(os.path.dirname(part) or ".").free < MIN_FREE_BYTES:
                        raise CheckpointError(f"download of {url} stopped at {done} bytes: less than "
                                              f"{MIN_FREE_BYTES >> 20} MB is left on the disk beside {dest}; "
                                              "free some space and run again to resume")
                    if not quiet and time.time() - last_report > 0.2:
                        _progress(f"downloading {desc}", done, total, start)
                        last_report = time.time()
        except (http.client.HTTPException, OSError) as e:  # a cut chunked body, a reset, a timeout, a full disk
            raise CheckpointError(f"download of {url} stopped at {done} bytes ({type(e).__name__}: {e}); "
                                  "run again to resume") from None
    if not quiet:
        _progress(f"downloading {desc}", done, total, start)
        sys.stderr.write("\n")
    if total is not None and done != total:
        raise CheckpointError(f"download of {url} stopped at {done} of {total} bytes; run again to resume")
    is_sha256 = len(etag) == 64 and all(c in "0123456789abcdef" for c in etag)
    return _finish_download(url, dest, sha256=etag if is_sha256 else "")


def _finish_download(url: str, dest: str, sha256: str) -> str:
    """Check dest + ".part" against the SHA-256 the server gave (if it gave one) and against its own format
    (download_problem), then rename it to dest; a file that fails either is deleted."""
    part, if_range_path = dest + ".part", dest + ".part.if-range"
    actual = file_sha256(part) if sha256 else ""
    problem = f"is corrupt: sha256 {actual}, expected {sha256}" if actual != sha256 else download_problem(part, dest)
    if problem:
        os.remove(part)
        os.remove(if_range_path)
        raise CheckpointError(f"download of {url} {problem}; deleted it: run again to download it afresh")
    os.replace(part, dest)
    os.remove(if_range_path)
    return dest



def promised_size(path: str, dest: str) -> Tuple[Optional[int], str]:
    """(the most bytes the file being downloaded into path may hold, what says so), from its own contents, for
    a body whose length the server did not give: a safetensors file's header gives the size of everything
    after it; a JSON file is at most MAX_JSON_BYTES. (None, "") while nothing bounds it yet."""
    if dest.endswith(".json"):
        return MAX_JSON_BYTES, f"the limit for a JSON file ({MAX_JSON_BYTES >> 20} MB)"
    if dest.endswith(".safetensors") and os.path.getsize(path) >= 8:
        size = _safetensors_size(path)
        if size is not None:
            return size, "its safetensors header"
    return None, ""



def _safetensors_size(path: str) -> Optional[int]:
    """The size a safetensors file's header says the whole file has (8 + header + the end of the last
    tensor); -1 when the header cannot be right; None while the header is not all there yet."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            return -1
        blob = f.read(n)
    if len(blob) < n:
        return None
    try:
        header = json.loads(blob.decode("utf-8"))
        ends = [info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        return -1
    return 8 + n + max((e for e in ends if isinstance(e, int)), default=0)



def download_problem(path: str, dest: str) -> str:
    """What is wrong with a downloaded file, judged by its own format; "" if nothing is. A .safetensors
    file must be exactly as long as its header says, a .json file must parse, a zip (a .bin saved by
    torch.save) must have its whole central directory: so a body cut short with no length to check it
    by, or a page of HTML sent with status 200, never enters the cache. Other files are not judged here."""
    size = os.path.getsize(path)
    if dest.endswith(".safetensors"):
        promised = _safetensors_size(path) if size >= 8 else None
        if promised != size:
            return f"is not a whole safetensors file ({size} bytes; its header says {promised})"
    elif dest.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                json.load(f)
        except (ValueError, RecursionError) as e:
            return f"is not valid JSON ({e})"
    elif dest.endswith(".bin"):
        with open(path, "rb") as f:
            if f.read(2) == b"PK" and not zipfile.is_zipfile(path):  # torch.save's zip, its end missing
                return "is a zip archive cut short (its central directory is missing)"
    return ""

# The downloader above is the one nanogpt2.py and imagegpt.py have, copied here unchanged so that this file
# stands alone (tests/test_copies.py checks that the copies agree). fetch() adapts it to this file's errors.


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def fetch(url, path):
    """download(url, path), with the server's and the network's errors as one-line CheckpointErrors."""
    try:
        download(url, str(path))
    except urllib.error.HTTPError as error:
        raise CheckpointError(f"{url}: HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise CheckpointError(f"{url}: {error.reason}") from None


def download_release(name, folder, base_url=OPENAI_BASE_URL):
    """Fetch one of OpenAI's releases into folder (files already there are kept) and return folder."""
    remote, prefix, others = RELEASES[name]
    folder = Path(folder)  # made by the first fetch that succeeds: a 404 leaves no empty folder
    base_url = base_url.rstrip("/")
    for other in others:
        fetch(f"{base_url}/{other}", folder / other.rsplit("/", 1)[-1])
    index = folder / f"{prefix}.index"
    fetch(f"{base_url}/{remote}/{prefix}.index", index)
    shards = read_index(index)[0].get(1, 1)  # the header says how many data shards (igpt-l: 64)
    for i in range(shards):
        shard = f"{prefix}.data-{i:05d}-of-{shards:05d}"
        fetch(f"{base_url}/{remote}/{shard}", folder / shard)
    return folder


# --- 9. Command line -------------------------------------------------------------------------------------

EXAMPLES = """examples:
  python convert_tf.py models/124M out/gpt2             # OpenAI's gpt-2 folder (hparams.json, model.ckpt.*)
  python nanogpt2.py sample --model out/gpt2
  python convert_tf.py --download gpt2-124M out/gpt2    # fetch the release first (kept in --download-dir)
  python convert_tf.py --download igpt-s out/igpt-s     # ImageGPT: 32 shards, plus kmeans_centers.npy
  python convert_tf.py --list models/124M               # names, dtypes and shapes; reads no tensor data

OUT_DIR receives config.json and model.safetensors (plus vocab.json and merges.txt for GPT-2, or
kmeans_centers.npy for ImageGPT, when found beside the checkpoint). It is written under a temporary name
and renamed at the end: a failed run leaves no OUT_DIR behind.
"""


def build_parser():
    parser = argparse.ArgumentParser(
        prog="convert_tf.py",
        usage="%(prog)s SRC OUT_DIR\n       %(prog)s --download NAME OUT_DIR\n       %(prog)s --list SRC",
        description="Convert OpenAI's original TensorFlow checkpoints of GPT-2 and ImageGPT into Hugging Face "
                    "folders that nanogpt2.py, imagegpt.py and transformers load. Needs only numpy: the "
                    "checkpoint format is read by hand.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", metavar="SRC OUT_DIR",
                        help="SRC: a checkpoint folder, or a prefix such as models/124M/model.ckpt; "
                             "OUT_DIR: the folder to create")
    parser.add_argument("--download", metavar="NAME", choices=sorted(RELEASES),
                        help="fetch an OpenAI release first (resumable) and use it as SRC: "
                             + ", ".join(RELEASES))
    parser.add_argument("--download-dir", metavar="DIR",
                        help="where --download keeps the files (default ~/.cache/nanogpt2/NAME)")
    parser.add_argument("--base-url", metavar="URL",
                        default=os.environ.get("NANOGPT2_OPENAI_BASE_URL", OPENAI_BASE_URL),
                        help="where the releases live (default $NANOGPT2_OPENAI_BASE_URL or %(default)s)")
    parser.add_argument("--list", action="store_true",
                        help="print every variable with its dtype and shape, then exit")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the CRC32C of tensor data (index blocks are always checked); "
                             "verifying costs ~8 s per GB")
    return parser


def list_variables(prefix):
    with CheckpointReader(prefix) as reader:
        width = max((len(name) for name in {**reader.entries, **reader.skipped}), default=4)
        print(f"{'name':<{width}}  {'dtype':<9} shape")
        for name, entry in sorted(reader.entries.items()):
            print(f"{name:<{width}}  {entry.dtype:<9} {list(entry.shape)}")
        for name, reason in sorted(reader.skipped.items()):
            print(f"{name:<{width}}  skipped: {reason}")
        total = sum(entry.size for entry in reader.entries.values())
        print(f"{len(reader.entries)} tensors, {total / 1e6:.1f} MB in {reader.num_shards} shard(s)"
              + (f"; {len(reader.skipped)} skipped" if reader.skipped else ""))


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    expected = ["SRC"] if args.list else ["SRC", "OUT_DIR"]
    if args.download:
        expected.remove("SRC")  # the downloaded release is SRC
    if len(args.paths) != len(expected):
        parser.error(f"expected {' '.join(expected) or 'no path'}, got {len(args.paths)} path(s): "
                     f"{' '.join(args.paths) or '(none)'}")
    try:
        if not args.list:
            check_out_dir(args.paths[-1])  # before a download of GBs, not after
        if args.download:
            cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "nanogpt2"
            src = download_release(args.download, args.download_dir or cache / args.download, args.base_url)
        else:
            src = args.paths.pop(0)
        if args.list:
            list_variables(find_checkpoint(src))
        else:
            convert(src, args.paths[-1], verify=not args.no_verify)
    except BrokenPipeError:  # the reader left early (`--list ... | head`): it has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit fails silently too
        sys.exit(0)
    except (CheckpointError, OSError) as error:  # bad input, not a bug: one line, no traceback
        if args.download and isinstance(error, CorruptFileError):  # a damaged download: fetch it again next time
            Path(error.path).unlink(missing_ok=True)
            error = f"{error}. Deleted it from the download cache: run again to fetch it afresh"
        print(f"convert_tf.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\nconvert_tf.py: interrupted (a rerun resumes downloads)", file=sys.stderr)
        sys.exit(130)


# --- Appendix: a fast CRC32C -----------------------------------------------------------------------------
# crc32c (section 1) takes one Python step per byte, ~5 MB/s: GPT-2 1558M's 6 GB of tensors would take 20
# minutes. crc32c_fast is the same checksum at ~150 MB/s on one core, and CheckpointReader.read uses it for
# tensor data; the .index blocks, KBs, keep the textbook loop. tests/test_convert_tf.py checks that they agree.

def _make_crc_table16():
    """CRC_TABLE for two bytes at once (65536 entries, 256 KB): half the steps in the numpy loop."""
    table = np.arange(1 << 16, dtype=np.uint32)
    for _ in range(16):
        table = (table >> 1) ^ np.where(table & 1, np.uint32(CRC_POLY), np.uint32(0))
    return table


CRC_TABLE16 = _make_crc_table16()


def _apply(op, x):
    """Apply a linear map on 32-bit registers, given as the images of the 32 single-bit values."""
    result, bit = 0, 0
    while x:
        if x & 1:
            result ^= op[bit]
        x >>= 1
        bit += 1
    return result


def _zeros_operator(count):
    """The map register -> register after `count` zero bytes (linear, since the table is), by squaring."""
    power = [CRC_TABLE[(1 << b) & 0xFF] ^ ((1 << b) >> 8) for b in range(32)]  # one zero byte
    result = [1 << b for b in range(32)]                                          # identity
    while count:
        if count & 1:
            result = [_apply(power, v) for v in result]
        power = [_apply(power, v) for v in power]
        count >>= 1
    return result


def _crc_lanes(rows):
    """CRC registers (started at 0) of every row of a (lanes, width) uint8 array, width even, all at once.

    numpy cannot speed up one byte-after-byte loop, but it can run 65536 of them side by side."""
    words = rows.view("<u2")  # (lanes, width / 2): two bytes per step, the first in the low bits
    registers = np.zeros(rows.shape[0], np.uint32)
    for start in range(0, words.shape[1], 256):
        columns = np.ascontiguousarray(words[:, start:start + 256].T)  # (256, lanes): word j of every lane
        for column in columns:
            registers = CRC_TABLE16[(registers ^ column) & 0xFFFF] ^ (registers >> 16)
    return registers


def crc32c_fast(data, max_lanes=65536):
    """crc32c(data), ~150 MB/s on one core (GPT-2 124M's 500 MB: ~4 s).

    The data is cut into a short head plus `lanes` equal rows. CRCs are linear, so
    crc(A + B) = zeros_operator(len(B))(register after A) ^ (register of B started at 0):
    the rows are checksummed side by side with numpy and then folded together one by one."""
    buf = np.frombuffer(data, np.uint8)
    lanes = min(max_lanes, buf.size // 1024)
    if lanes < 2:  # under 2 KB: the textbook loop is as quick
        return crc32c(buf.tobytes())
    width = buf.size // lanes // 2 * 2
    head = buf.size - lanes * width
    register = crc32c(buf[:head].tobytes()) ^ 0xFFFFFFFF  # the register after the head (undo the final flip)
    row_registers = _crc_lanes(buf[head:].reshape(lanes, width))
    # Fold the rows: acc = shift(acc, width) ^ row. Shifting is linear, so four 256-entry tables do it.
    op = _zeros_operator(width)
    tables = []
    for k in range(4):
        table = [0]
        for bit in range(8):
            table = table + [value ^ op[8 * k + bit] for value in table]
        tables.append(table)
    t0, t1, t2, t3 = tables
    acc = 0
    for row in row_registers.tolist():
        acc = t0[acc & 255] ^ t1[(acc >> 8) & 255] ^ t2[(acc >> 16) & 255] ^ t3[acc >> 24] ^ row
    return (_apply(_zeros_operator(buf.size - head), register) ^ acc) ^ 0xFFFFFFFF


if __name__ == "__main__":
    main()
