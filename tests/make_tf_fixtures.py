"""Write the tiny TensorFlow checkpoints that tests/test_convert_tf.py reads back without TensorFlow.

Run by hand, never by CI (it needs TensorFlow, 1.6 GB; a separate virtual environment keeps it away from the
project's numpy and torch):

    python -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu
    /tmp/tfenv/bin/python tests/make_tf_fixtures.py          # rewrites tests/fixtures/tf/

Every checkpoint is written by TensorFlow itself, then read back through TensorFlow's own reader
(tf.train.load_checkpoint); what that reader returns is stored beside it as the ground truth:

    expected.json   {name: {"dtype": "float32", "shape": [...]}} for every variable TF lists
    expected.npz    the values, keyed by name (bfloat16 stored as its raw uint16 bits)

Fixtures (each a few KB, the "many" index a few hundred):
    gpt2/   the openai/gpt-2 layout: hparams.json, model.ckpt.index, one data shard, tokenizer files
    igpt/   the openai/image-gpt layout: model.ckpt-1000.*, 4 data shards, Adam slots and global_step
            (written by a real tf.compat.v1 AdamOptimizer step), kmeans_centers.npy
    dtypes/ one variable per dtype (float32, float16, bfloat16, float64, int32, int64), a scalar, an empty
            tensor, a string and a partitioned variable (the last two are skipped by convert_tf.py)
    many/   thousands of variables with long names, so that the .index holds several data blocks
            (committed gzipped: 700 KB of index compresses to a few KB)
"""

import gzip
import json
import os
import shutil
import sys

import numpy as np
import tensorflow as tf

tf1 = tf.compat.v1
HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tf")
RNG = np.random.default_rng(1234)


# --- Ground truth: what TensorFlow's own reader sees ---

def write_expected(prefix, packed=False):
    """Read the checkpoint back with TensorFlow and store names, dtypes, shapes and values beside it.

    packed: store one float32 array "packed", every value flattened and concatenated in name order,
    instead of one array per name (a zip entry per name would cost ~1 MB for thousands of names)."""
    reader = tf.train.load_checkpoint(prefix)
    dtypes = reader.get_variable_to_dtype_map()
    shapes = reader.get_variable_to_shape_map()
    manifest, arrays = {}, {}
    for name in sorted(shapes):
        dtype = dtypes[name].name  # "float32", "bfloat16", "string", ...
        manifest[name] = {"dtype": dtype, "shape": list(shapes[name])}
        if dtype == "string":
            continue
        value = np.asarray(reader.get_tensor(name))
        arrays[name] = value.view(np.uint16) if dtype == "bfloat16" else value
    if packed:
        arrays = {"packed": np.concatenate([arrays[name].reshape(-1) for name in sorted(arrays)])}
    folder = os.path.dirname(prefix)
    with open(os.path.join(folder, "expected.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    np.savez(os.path.join(folder, "expected.npz"), **arrays)


def fresh(folder):
    path = os.path.join(HERE, folder)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def normal(*shape, std=0.3):
    return (RNG.standard_normal(shape) * std).astype(np.float32)


# --- openai/gpt-2: one shard, hparams.json, Conv1D weights of shape [1, nx, nf] ---

def make_gpt2():
    folder = fresh("gpt2")
    hp = {"n_vocab": 50, "n_ctx": 20, "n_embd": 24, "n_head": 3, "n_layer": 2}  # head_dim 8: no size repeats
    n, v = hp["n_embd"], hp["n_vocab"]
    graph = tf.Graph()
    with graph.as_default():
        def var(name, value):
            tf1.get_variable(name, initializer=value)

        with tf1.variable_scope("model"):
            var("wpe", normal(hp["n_ctx"], n, std=0.1))
            var("wte", normal(v, n))
            for layer in range(hp["n_layer"]):
                with tf1.variable_scope(f"h{layer}"):
                    for ln in ("ln_1", "ln_2"):
                        with tf1.variable_scope(ln):
                            var("g", 1 + normal(n, std=0.1))
                            var("b", normal(n, std=0.1))
                    for scope, nx, nf in (("attn/c_attn", n, 3 * n), ("attn/c_proj", n, n),
                                          ("mlp/c_fc", n, 4 * n), ("mlp/c_proj", 4 * n, n)):
                        with tf1.variable_scope(scope):
                            var("w", normal(1, nx, nf))
                            var("b", normal(nf, std=0.1))
            with tf1.variable_scope("ln_f"):
                var("g", 1 + normal(n, std=0.1))
                var("b", normal(n, std=0.1))
        saver = tf1.train.Saver(save_relative_paths=True)
        with tf1.Session() as session:
            session.run(tf1.global_variables_initializer())
            prefix = saver.save(session, os.path.join(folder, "model.ckpt"), write_meta_graph=False)
    with open(os.path.join(folder, "hparams.json"), "w") as f:
        json.dump(hp, f, indent=2)
    # Tokenizer files in OpenAI's names; convert_tf.py copies them as vocab.json and merges.txt.
    with open(os.path.join(folder, "encoder.json"), "w") as f:
        json.dump({chr(ord("a") + i) if i < 26 else f"t{i}": i for i in range(v)}, f)
    with open(os.path.join(folder, "vocab.bpe"), "w") as f:
        f.write("#version: 0.2\nt 1\n")
    write_expected(prefix)


# --- openai/image-gpt: 4 shards, q/k/v/c_proj of [n_head, head_dim, n_embd], no biases, Adam slots ---

def make_igpt():
    folder = fresh("igpt")
    # 12 colours, 3x3 images, n_embd 8, 2 heads of 4: all sizes distinct, so a swapped axis cannot hide.
    # head_dim is a perfect square on purpose: transformers 4.46.3 truncates sqrt(head_dim) to an int in
    # ImageGPT's attention (torch_float returns int(x); huggingface/transformers#47376), so with head_dim 8
    # its logits would measure that bug rather than this conversion.
    n_vocab, n_ctx, n, n_head, n_layer = 12, 9, 8, 2, 2
    shards = 4
    graph = tf.Graph()
    with graph.as_default():
        made = []

        def var(name, value):
            # Round-robin over 4 CPU devices: a sharded Saver writes one data file per device.
            with tf.device(f"/cpu:{len(made) % shards}"):
                made.append(tf1.get_variable(name, initializer=value))

        with tf1.variable_scope("model"):
            var("wpe", normal(n_ctx, n, std=0.1))
            var("wte", normal(n_vocab, n))
            var("wtet", normal(n_vocab, n))
            var("sos", normal(n))
            for layer in range(n_layer):
                with tf1.variable_scope(f"h{layer}"):
                    for ln in ("ln_1", "ln_2"):
                        with tf1.variable_scope(ln):
                            var("g", 1 + normal(n, std=0.1))
                    with tf1.variable_scope("attn"):
                        for proj in ("k_proj", "q_proj", "v_proj", "c_proj"):
                            var(proj, normal(n_head, n // n_head, n))
                    with tf1.variable_scope("mlp"):
                        with tf1.variable_scope("c_fc"):
                            var("w", normal(n, 4 * n))
                        with tf1.variable_scope("c_proj"):
                            var("w", normal(4 * n, n))
            with tf1.variable_scope("ln_f"):
                var("g", 1 + normal(n, std=0.1))
        # One real Adam step, so that the checkpoint holds what a training run leaves: slots
        # (".../Adam", ".../Adam_1"), beta1_power, beta2_power and global_step.
        loss = tf.add_n([tf.reduce_sum(tf.square(v)) for v in made])
        step = tf1.train.get_or_create_global_step()
        train = tf1.train.AdamOptimizer(1e-2).minimize(loss, global_step=step)
        saver = tf1.train.Saver(sharded=True, save_relative_paths=True)
        config = tf1.ConfigProto(device_count={"CPU": shards})
        with tf1.Session(config=config) as session:
            session.run(tf1.global_variables_initializer())
            session.run(train)
            prefix = saver.save(session, os.path.join(folder, "model.ckpt"), global_step=1000,
                                write_meta_graph=False)
    np.save(os.path.join(folder, "kmeans_centers.npy"), RNG.uniform(-1, 1, (n_vocab, 3)).astype(np.float32))
    write_expected(prefix)


# --- Every dtype, edge shapes, a string and a partitioned variable (written with the SaveV2 op) ---

def save_v2(prefix, entries):
    """TensorFlow's raw save op: one call, one data shard, any names and slice specs.

    entries: (name, numpy value, TF dtype or None, slice spec) tuples."""
    with tf.Graph().as_default(), tf1.Session() as session:
        names, values, slices = [], [], []
        for name, value, dtype, slice_spec in entries:
            names.append(name)
            values.append(tf.constant(value, dtype=dtype))
            slices.append(slice_spec)
        session.run(tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=slices,
                                      tensors=values))


def make_dtypes():
    folder = fresh("dtypes")
    prefix = os.path.join(folder, "model.ckpt")
    whole = normal(4, 3)
    save_v2(prefix, [
        ("f32", normal(3, 4), None, ""),
        ("f16", normal(5, 2).astype(np.float16), None, ""),
        ("bf16", normal(2, 3, 4), tf.bfloat16, ""),
        ("f64", RNG.standard_normal((7,)), None, ""),
        ("i32", RNG.integers(-2**31, 2**31, (2, 5), dtype=np.int64).astype(np.int32), None, ""),
        ("i64", RNG.integers(-2**62, 2**62, (4,), dtype=np.int64), None, ""),
        ("scalar", np.float32(3.25), None, ""),
        ("empty", np.zeros((0, 3), np.float32), None, ""),
        ("text", np.array([b"hello", b"tensor bundle"]), tf.string, ""),
        # Two slices of one [4, 3] variable: TF records a full-tensor entry listing the slices, plus one
        # entry per slice under an encoded key.
        ("part", whole[:2], None, "4 3 0,2:-"),
        ("part", whole[2:], None, "4 3 2,2:-"),
    ])
    write_expected(prefix)


# --- Thousands of variables: an index of several blocks ---

def make_many():
    """4000 variables whose names share little at the front and much at the back.

    TensorFlow's index blocks hold 256 KiB and a key stores only what it does not share with the key
    before it, so 160-character names that differ from the sixth character on fill three blocks (~700 KB).
    The same names compress to a few KB with gzip, so this fixture is committed gzipped."""
    folder = fresh("many")
    prefix = os.path.join(folder, "model.ckpt")
    entries = [(f"v{i:05d}/{'long_scope_name/' * 10}w{i}", normal(1 + i % 3), None, "") for i in range(4000)]
    save_v2(prefix, entries)
    write_expected(prefix, packed=True)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        with open(path, "rb") as src, open(path + ".gz", "wb") as raw, \
                gzip.GzipFile("", "wb", fileobj=raw, mtime=0) as dst:  # no name or time: same bytes each run
            shutil.copyfileobj(src, dst)
        os.remove(path)


def main():
    tf1.disable_eager_execution()  # graph mode and a Session, as OpenAI's releases were written
    make_gpt2()
    make_igpt()
    make_dtypes()
    make_many()
    for root, _, files in sorted(os.walk(HERE)):
        for name in sorted(files):
            path = os.path.join(root, name)
            print(f"{os.path.getsize(path):8d}  {os.path.relpath(path, HERE)}", file=sys.stderr)


if __name__ == "__main__":
    main()
