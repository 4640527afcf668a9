"""bench.py: how fast nanogpt2.py and imagegpt.py are, next to Hugging Face transformers, on this machine.

    python tests/bench.py                      # everything, CPU, one thread (a few minutes)
    python tests/bench.py --quick              # smaller runs, fewer repetitions (about a minute)
    python tests/bench.py --only decode,load   # a subset: limits, decode, forward, train, load, imagegpt, tokenizer,
                                               # train-gpu
    python tests/bench.py --compile            # also ours' generate(..., compile=True) (decode, imagegpt)
    python tests/bench.py --device cuda        # the same on a GPU, and GPT-2 124M training at T=1024 (train-gpu)
    python tests/bench.py --only train-gpu     # on a CPU: a tiny smoke run of the train-gpu code

Speed is measured here, never in a timed test: timings depend on the machine and on whatever else runs on
it. To keep the comparison fair on a busy machine, ours and the reference run interleaved in one process
(ours, theirs, ours, theirs, ...), with the same weights, and the table reports medians and their ratio
(reference time / our time: above 1 means we are faster). Loading runs each try in a fresh subprocess, so
that peak memory (RSS) is the load's own.

Each speed is also put next to what the machine can do at best, measured first:
  - memory read bandwidth (torch.sum over a tensor much larger than the caches), which bounds decoding:
    every new token reads every weight once;
  - matrix multiply throughput (fp32 GEMM, GFLOP/s), which bounds the forward pass and training.
train-gpu instead reports model FLOPs utilisation (MFU): the FLOPs a training step needs, per second, as a
share of the GPU's peak bf16 throughput from its data sheet (--peak-tflops).
The tokenizer section times nanogpt2.py's written-out BPE encoder against tiktoken (Rust) on English text, and
train_bpe learning 2,000 merges from 10 MB of text (the targets: at least 1 MB/s, at most 60 s).
"""

import argparse
import dataclasses
import gc
import json
import os
import resource
import statistics
import pathlib
import subprocess
import sys
import sysconfig
import tempfile
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# The tokenizer rows need tiktoken's GPT-2 files, which it downloads on first use; the suite ships the same
# files (checked by their sha256), so an offline machine runs the bench too. A cache you set wins.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(ROOT, "tests", "fixtures", "tiktoken"))

import imagegpt  # noqa: E402
import nanogpt2  # noqa: E402

try:
    import transformers
except ImportError:  # the table then shows our figures only
    transformers = None

SECTIONS = ("limits", "decode", "forward", "train", "load", "imagegpt", "tokenizer", "train-gpu")


def default_sections(device_type: str):
    """Every section, except train-gpu on a CPU: GPT-2 124M at T=1024 is a GPU workload (--only train-gpu
    runs a tiny smoke version on a CPU, to exercise the code)."""
    return [s for s in SECTIONS if s != "train-gpu" or device_type == "cuda"]


# --- Timing ---------------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(ours, theirs, reps: int, device):
    """Median seconds of ours() and theirs(), run alternately after one warm-up each, so that a slow spell
    of the machine hits both alike. Which goes first swaps every repetition, so that neither always runs
    right after the other (in the allocator's and the caches' state the other left). theirs may be None
    (transformers not installed)."""
    return first_and_median(ours, theirs, reps, device)[2:]


def first_and_median(ours, theirs, reps: int, device):
    """interleaved(), also returning the seconds of the warm-up calls: (first ours, first theirs, median
    ours, median theirs). A compiled function compiles on its first call, which is worth knowing but is not
    its speed."""
    first_ours = timed(ours, device)
    first_theirs = timed(theirs, device) if theirs is not None else None
    t_ours, t_theirs = [], []
    for rep in range(reps):
        if rep % 2 == 1 and theirs is not None:
            t_theirs.append(timed(theirs, device))
        t_ours.append(timed(ours, device))
        if rep % 2 == 0 and theirs is not None:
            t_theirs.append(timed(theirs, device))
    return first_ours, first_theirs, statistics.median(t_ours), (statistics.median(t_theirs) if t_theirs else None)


# --- The machine's limits -------------------------------------------------------------------------------


def measure_limits(device, quick: bool) -> dict:
    """Memory read bandwidth (GB/s) and fp32 matmul throughput (GFLOP/s) at the current thread count."""
    n = (1 << 26) if quick else (1 << 28)  # 256 MB or 1 GB of fp32: far beyond any cache
    x = torch.ones(n, device=device)
    x.sum()
    seconds = min(timed(lambda: x.sum(), device) for _ in range(5))
    bandwidth = 4 * n / seconds / 1e9
    del x
    m = 1024 if quick or device.type == "cpu" else 8192
    a, b = torch.randn(m, m, device=device), torch.randn(m, m, device=device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # true fp32, as the models run
    a @ b
    seconds = min(timed(lambda: a @ b, device) for _ in range(5))
    return {"bandwidth_gbs": bandwidth, "gflops": 2 * m ** 3 / seconds / 1e9}


# --- The models: the same random weights in ours and the reference --------------------------------------


def gpt2_pair(device, **config):
    """(ours, reference) GPT2LMHeadModel of GPT-2 124M's shape, holding the same random weights. Keyword
    arguments change the config of both (n_layer=2, resid_pdrop=0.0, ...)."""
    torch.manual_seed(0)
    ours = nanogpt2.GPT2LMHeadModel(nanogpt2.GPT2Config(**config))
    theirs = None
    if transformers is not None:
        theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(attn_implementation="sdpa", **config))
        theirs.load_state_dict(ours.state_dict(), strict=False)  # strict=False: the reference keeps attn.bias
        theirs.generation_config.eos_token_id = None  # random weights: never stop early, in either model
        theirs.generation_config.pad_token_id = 50256
        theirs.to(device)
    return ours.to(device), theirs


def imagegpt_pair(device):
    """(ours, reference) ImageGPTForCausalImageModeling of imagegpt-small's shape, same random weights."""
    torch.manual_seed(0)
    ours = imagegpt.ImageGPTForCausalImageModeling(imagegpt.ImageGPTConfig.from_preset("imagegpt-small"))
    theirs = None
    if transformers is not None:
        cfg = ours.config
        theirs = transformers.ImageGPTForCausalImageModeling(transformers.ImageGPTConfig(
            vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
            n_head=cfg.n_head))
        theirs.load_state_dict(ours.state_dict(), strict=False)
        theirs.generation_config.eos_token_id = None
        theirs.generation_config.pad_token_id = 0
        theirs.to(device)
    return ours.to(device), theirs


def cast(pair, dtype):
    """Both models of a pair in dtype (--dtype: the inference sections' precision)."""
    return tuple(model if model is None else model.to(dtype) for model in pair)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # a tied matrix is listed once


def best_decode_step(model, batch: int, limits) -> float:
    """The fastest one decoding step can be: every weight read once from memory (which bounds batch 1), or
    every token's matmuls at full GEMM speed (which bounds larger batches), whichever takes longer."""
    read = weight_bytes(model) / (limits["bandwidth_gbs"] * 1e9)
    compute = 2 * matmul_params(model) * batch / (limits["gflops"] * 1e9)
    return max(read, compute)


def matmul_params(model) -> int:
    """Parameters that take part in matmuls for every token: all but the position embeddings and the
    token embedding lookup (the tied LM head counts, as the logits' matmul)."""
    return sum(p.numel() for name, p in model.named_parameters() if "wpe" not in name)


# --- The benchmarks -------------------------------------------------------------------------------------


def bench_decode(device, reps, new_tokens, limits, compile=False, dtype=torch.float32):
    """Greedy decoding at batch 1 and 8, ours with generate()'s default step and with Part I's plain one;
    with compile, also ours' generate(..., compile=True) against the reference's usual (eager) generate."""
    ours, theirs = cast(gpt2_pair(device), dtype)
    ours.eval()
    rows = []
    for batch in (1, 8):
        prompt = torch.randint(0, 50257, (batch, 16), generator=torch.Generator().manual_seed(batch)).to(device)
        mask = torch.ones_like(prompt)
        run_ours = lambda: ours.generate(prompt, max_new_tokens=new_tokens, attention_mask=mask, stop_at_eos=False)
        run_theirs = None if theirs is None else lambda: theirs.generate(
            prompt, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        with torch.no_grad():
            t_ours, t_theirs = interleaved(run_ours, run_theirs, reps, device)
        best = best_decode_step(ours, batch, limits) * new_tokens if limits else None
        name = f"decode greedy, batch {batch}, {new_tokens} tokens"
        rows.append(row(name, t_ours, t_theirs, best, "of roofline"))
        with torch.no_grad():  # the same, with Part I's decode_step: what the fast head is worth
            t_plain, t_theirs = interleaved(plain_head(ours, prompt, mask, new_tokens), run_theirs, reps, device)
        rows.append(row(f"{name}, lm_head (Part I's step)", t_plain, t_theirs, best, "of roofline"))
        if compile:
            run_compiled = lambda: ours.generate(prompt, max_new_tokens=new_tokens, attention_mask=mask,
                                                 stop_at_eos=False, compile=True)
            rows += compiled_rows(name, run_compiled, run_theirs, reps, device, best, "of roofline")
    return rows


def plain_head(model, prompt, mask, new_tokens):
    """Greedy decoding as Part I writes it, decode_step with lm_head, instead of generate()'s default step,
    Part II's fast_decode_step, whose head is (W @ h^T)^T: the row beside the default one says what that buys."""
    prompt, mask, options = nanogpt2.prepare_generation(model, input_ids=prompt, attention_mask=mask,
                                                        max_new_tokens=new_tokens, stop_at_eos=False)
    options = dataclasses.replace(options, step=nanogpt2.decode_step)
    return lambda: nanogpt2._sample(model, prompt, mask, options)


def compiled_rows(name, run_ours, run_theirs, reps, device, best, best_of):
    """Two rows for ours' generate(..., compile=True) next to the reference's eager generate: the median of
    later calls, and the first call alone, which compiles the decoding step (about a minute on a CPU). The
    median starts after one more untimed call each, as interleaved() does: with mode="reduce-overhead" the
    CUDA graphs are recorded on a call after the one that compiles."""
    with torch.no_grad():
        first_ours = timed(run_ours, device)
        first_theirs = timed(run_theirs, device) if run_theirs is not None else None
        t_ours, t_theirs = interleaved(run_ours, run_theirs, reps, device)
    return [row(f"{name}, compile=True", t_ours, t_theirs, best, best_of),
            row(f"{name}, compile=True: first call (compiles)", first_ours, first_theirs)]


def bench_forward(device, reps, shape, limits, dtype=torch.float32):
    ours, theirs = cast(gpt2_pair(device), dtype)
    ours.eval()
    B, T = shape
    x = torch.randint(0, 50257, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    run_theirs = None if theirs is None else (lambda: theirs.eval()(x))
    with torch.no_grad():
        t_ours, t_theirs = interleaved(lambda: ours(x), run_theirs, reps, device)
    flops = 2 * matmul_params(ours) * B * T  # the attention scores add a few per cent more; not counted
    best = flops / (limits["gflops"] * 1e9) if limits else None
    return [row(f"forward {B} x {T}", t_ours, t_theirs, best, "of GEMM")]


def bench_train(device, reps, shape, limits):
    """One AdamW step on a (B, T) batch, each model trained as its own code trains it: ours through
    nanogpt2.configure_optimizer and the loss train_step computes; the reference with torch.optim.AdamW
    (as its Trainer) and its own labels= loss."""
    ours, theirs = gpt2_pair(device)
    B, T = shape
    x = torch.randint(0, 50257, (B, T + 1), generator=torch.Generator().manual_seed(0)).to(device)
    ours.train()
    opt_ours = nanogpt2.configure_optimizer(ours, 1e-4, 0.1, device.type)

    def step_ours():
        logits = ours(x[:, :-1]).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    step_theirs = None
    if theirs is not None:
        theirs.train()
        opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4, weight_decay=0.1)

        def step_theirs():
            theirs(x[:, :-1], labels=x[:, :-1]).loss.backward()
            opt_theirs.step()
            opt_theirs.zero_grad(set_to_none=True)

    t_ours, t_theirs = interleaved(step_ours, step_theirs, reps, device)
    best = 3 * 2 * matmul_params(ours) * B * T / (limits["gflops"] * 1e9) if limits else None  # fwd + 2x bwd
    return [row(f"training step {B} x {T}, AdamW", t_ours, t_theirs, best, "of GEMM")]


def bench_train_gpu(device, reps, batch, peak_tflops, limits):
    """GPT-2 124M trained the way a GPU trains it fast: T=1024, bf16 autocast, fused AdamW (through
    nanogpt2.configure_optimizer, for both models), flash attention through SDPA, and torch.compile over
    forward and loss. Ours runs with SDPA limited to the flash kernel, so that a fall back to a slower kernel
    fails loudly instead of lowering the figure. The reference gets SDPA's own choice: compiled, transformers
    4.46 passes an explicit causal mask (is_causal only outside tracing), which the flash kernel does not take
    on a GPU, so it runs the memory-efficient kernel. Reports tokens/s and MFU: the FLOPs a step needs (PaLM's appendix B, as nanoGPT's estimate_mfu:
    6 per matmul parameter per token, forward and backward, plus 12 * n_layer * n_embd * T for the
    attention scores) per second, over the peak. Dropout is 0, as when pretraining GPT-2 (nanoGPT, llm.c).
    On a CPU a tiny smoke version (2 layers, T=64, fp32, dynamo without inductor's minute of code generation)
    runs the same code in seconds; its MFU is against the measured fp32 GEMM and means little."""
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if device.type == "cuda":
        what, config, T, dtype, backend, steps = "GPT-2 124M", no_dropout, 1024, torch.bfloat16, "inductor", 10
        peak, peak_is = 989e12, "H100/H200 SXM dense bf16, the default"
        batch = batch or 16
    else:
        config = dict(no_dropout, n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=1024)
        what, T, dtype, backend, steps = "tiny smoke model", 64, torch.float32, "eager", 2
        peak, peak_is = limits["gflops"] * 1e9, "this CPU's measured fp32 GEMM"
        batch = batch or 2
    if peak_tflops:
        peak, peak_is = peak_tflops * 1e12, "--peak-tflops"
    print(f"train-gpu: MFU against a peak of {peak / 1e12:.4g} TFLOP/s ({peak_is})", flush=True)
    ours, theirs = gpt2_pair(device, **config)
    tokens = torch.randint(0, ours.config.vocab_size, (batch, T + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)

    def compiled_loss(model):
        """forward and loss, compiled as one graph: the (B, T, V) logits never round-trip through memory."""
        def loss(x, y):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = model(x).logits  # (B, T, V)
            return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        return torch.compile(loss, backend=backend)

    def training_steps(model, attention_kernels):
        """A function that runs `steps` optimiser steps of model on the batch (x, y), SDPA limited to
        attention_kernels."""
        model.train()
        loss_of = compiled_loss(model)
        optimizer = nanogpt2.configure_optimizer(model, 6e-4, 0.1, device.type)
        def run():
            for _ in range(steps):
                with sdpa_kernel(attention_kernels):
                    loss_of(x, y).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return run

    any_kernel = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                  SDPBackend.MATH]
    first_ours, first_theirs, t_ours, t_theirs = first_and_median(
        training_steps(ours, [SDPBackend.FLASH_ATTENTION]),
        None if theirs is None else training_steps(theirs, any_kernel), reps, device)
    flops_per_token = 6 * matmul_params(ours) + 12 * ours.config.n_layer * ours.config.n_embd * T
    step_flops = flops_per_token * batch * T
    for who, seconds in (("ours", t_ours), ("transformers", t_theirs)):
        if seconds is not None:
            print(f"  train-gpu {who}: {batch * T * steps / seconds:,.0f} tokens/s, "
                  f"MFU {100 * step_flops * steps / seconds / peak:.1f}%", flush=True)
    name = f"train-gpu {what}, {batch} x {T}, {'bf16' if dtype == torch.bfloat16 else 'fp32'}, compiled"
    per_step = lambda seconds: seconds / steps if seconds is not None else None
    return [row(f"{name}: step", per_step(t_ours), per_step(t_theirs), step_flops / peak, "MFU"),
            row(f"{name}: first {steps} steps (compile)", first_ours, first_theirs)]


def bench_imagegpt(device, reps, new_tokens, limits, compile=False, dtype=torch.float32):
    """Sampling 8 images' first pixels; with compile, also ours' generate(..., compile=True)."""
    ours, theirs = cast(imagegpt_pair(device), dtype)
    ours.eval()
    batch = 8
    sos = torch.full((batch, 1), ours.config.sos_token_id, dtype=torch.long, device=device)
    run_ours = lambda: ours.generate(sos, max_new_tokens=new_tokens, do_sample=True, top_k=40)
    run_theirs = None if theirs is None else lambda: theirs.generate(
        sos, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, top_k=40)
    with torch.no_grad():
        t_ours, t_theirs = interleaved(run_ours, run_theirs, reps, device)
    best = best_decode_step(ours, batch, limits) * new_tokens if limits else None
    name = f"imagegpt-small sampling, batch {batch}, {new_tokens} px"
    rows = [row(name, t_ours, t_theirs, best, "of roofline")]
    if compile:
        run_compiled = lambda: ours.generate(sos, max_new_tokens=new_tokens, do_sample=True, top_k=40, compile=True)
        rows += compiled_rows(name, run_compiled, run_theirs, reps, device, best, "of roofline")
    return rows


# --- The tokenizer: the written-out BPE against tiktoken, and BPE training ---------------------------------


def english_text() -> str:
    """English prose every Python has: the reference manual's topics that help() shows (pydoc_data.topics; 0.47 MB
    in Python 3.11), or this repository's README.md where a Python was installed without them."""
    try:
        from pydoc_data.topics import topics
        return "".join(topics[key] for key in sorted(topics))
    except ImportError:
        return (pathlib.Path(ROOT) / "README.md").read_text(encoding="utf-8")


def library_text(n_bytes: int) -> str:
    """The first n_bytes of the standard library's own .py files (sorted paths; no tests, no site-packages):
    code, comments and docstrings, the same on every machine with the same Python."""
    parts, total = [], 0
    for path in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if {"site-packages", "test", "tests", "idlelib"} & set(path.parts):
            continue
        try:
            raw = path.read_bytes()
            raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(raw)
        total += len(raw)
        if total >= n_bytes:
            break
    return b"".join(parts)[:n_bytes].decode("utf-8", errors="ignore")  # (a character cut at the end is dropped)


def bench_tokenizer(reps, english_bytes=None, train_bytes=10_000_000, merges=2000):
    """Encoding English text with nanogpt2.py's written-out BPE (get_tokenizer("python"), its cache of pieces
    emptied before every run: each run starts cold) against tiktoken's Rust (one thread: tiktoken's encode is
    single-threaded), and train_bpe learning `merges` merges from train_bytes of the standard library's source
    (one run, timed whole: reading the file, counting its pieces, the merges). Prints MB/s."""
    cpu = torch.device("cpu")
    text = english_text()
    if english_bytes is not None:
        text = text.encode("utf-8")[:english_bytes].decode("utf-8", errors="ignore")
    ours, theirs = nanogpt2.get_tokenizer("python"), nanogpt2.get_tokenizer()
    assert ours.encode(text, disallowed_special=()) == theirs.encode(text, disallowed_special=())

    def encode_ours():
        ours.cache.clear()
        ours.encode(text, disallowed_special=())

    t_ours, t_theirs = interleaved(encode_ours, lambda: theirs.encode(text, disallowed_special=()), reps, cpu)
    mb = len(text.encode("utf-8")) / 1e6
    print(f"  tokenizer: encoding {mb:.2f} MB of English: written out {mb / t_ours:.2f} MB/s, tiktoken "
          f"{mb / t_theirs:.2f} MB/s", flush=True)
    rows = [row(f"tokenizer: encode {mb:.2f} MB of English (vs tiktoken)", t_ours, t_theirs)]
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "library.txt"
        path.write_text(library_text(train_bytes), encoding="utf-8")
        start = time.perf_counter()
        bpe = nanogpt2.train_bpe(path, 257 + merges)
        seconds = time.perf_counter() - start
    print(f"  tokenizer: train_bpe learnt {len(bpe.merges):,} merges from {train_bytes / 1e6:.1f} MB in "
          f"{seconds:.1f} s (the target: 60 s for 2,000 merges on 10 MB)", flush=True)
    rows.append(row(f"tokenizer: train_bpe, {merges:,} merges on {train_bytes / 1e6:g} MB (no reference)", seconds,
                    None))
    return rows


# --- Loading, in fresh processes ------------------------------------------------------------------------

# Run as `python -c LOAD_SCRIPT which directory device`: imports first (not timed, not counted), then one
# from_pretrained, timed; prints the seconds, the RSS before the load and the peak RSS (both in MB).
LOAD_SCRIPT = """
import json, resource, sys, time  # Linux only: /proc
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})
which, directory, device = sys.argv[1:4]
if which == "ours":
    import nanogpt2
    load = lambda: nanogpt2.GPT2LMHeadModel.from_pretrained(directory, device=device)
else:
    import transformers
    load = lambda: transformers.GPT2LMHeadModel.from_pretrained(directory).to(device)
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6
before = rss_mb()
start = time.perf_counter()
model = load()
if device == "cuda":
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
def peak_mb():  # VmHWM: this process's peak RSS (ru_maxrss would include the parent's, from before exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1e3  # kB -> MB
peak = peak_mb()
with torch.no_grad():  # a memory-mapped weight takes memory when first read: count it, with one forward
    model(torch.zeros(1, 1, dtype=torch.long, device=device))
print(json.dumps({{"seconds": seconds, "before_mb": before, "peak_mb": peak, "used_mb": peak_mb()}}))
"""


def load_once(which, directory, device) -> dict:
    script = LOAD_SCRIPT.format(root=ROOT, threads=torch.get_num_threads())
    out = subprocess.run([sys.executable, "-c", script, which, directory, device.type],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_load(device, reps):
    """from_pretrained of a GPT-2 124M folder (model.safetensors as transformers writes it), each try in a
    fresh process: the time of the call, and the peak RSS it adds above the process after its imports,
    then again after one forward pass (a memory-mapped weight takes memory only once it is read)."""
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        ours, theirs = gpt2_pair(torch.device("cpu"))
        if theirs is not None:
            theirs.save_pretrained(directory)  # the reference's own file layout
        else:
            nanogpt2.save_pretrained(ours, directory)
        del ours, theirs
        gc.collect()
        results = {"ours": [], "theirs": []}
        for _ in range(reps):
            results["ours"].append(load_once("ours", directory, device))
            if transformers is not None:
                results["theirs"].append(load_once("theirs", directory, device))
    keys = ("seconds", "before_mb", "peak_mb", "used_mb")
    med = {k: {m: statistics.median(r[m] for r in v) for m in keys} if v else None for k, v in results.items()}
    o, t = med["ours"], med["theirs"]
    rows.append(row("load 124M safetensors", o["seconds"], t and t["seconds"]))
    added = lambda m, key: m[key] - m["before_mb"]
    rows.append(row("load 124M: peak RSS added by the load", added(o, "peak_mb"), t and added(t, "peak_mb"), unit="MB"))
    rows.append(row("load 124M: ... and by a first forward", added(o, "used_mb"), t and added(t, "used_mb"), unit="MB"))
    rows.append(row("load 124M: peak RSS of the process", o["used_mb"], t and t["used_mb"], unit="MB"))
    return rows


# --- The table ------------------------------------------------------------------------------------------


def row(name, ours, theirs, best=None, best_of="", unit="s"):
    """One line of the table. For times, ratio = theirs / ours (above 1: we are faster); for memory the
    same ratio reads "they use this many times our memory"."""
    return {"name": name, "ours": ours, "theirs": theirs, "unit": unit,
            "ratio": (theirs / ours) if theirs is not None and ours else None,
            "fraction": (best / ours) if best is not None and ours else None, "best_of": best_of}


def progress(rows):
    """Each section's figures as soon as they are measured (the full run takes minutes); the table follows."""
    for r in rows:
        print(f"  {r['name']}: ours {r['ours']:.3f}, transformers {r['theirs'] if r['theirs'] is None else round(r['theirs'], 3)}",
              flush=True)
    return rows


def print_table(rows, header):
    width = max([46] + [len(r["name"]) for r in rows])  # the compile=True rows have longer names
    print(header)
    print(f"{'':{width}} {'ours':>10} {'transformers':>13} {'speed-up':>9}  {'of the limit':>16}")
    for r in rows:
        fmt = (lambda v: f"{v:9.3f} s") if r["unit"] == "s" else (lambda v: f"{v:7.0f} MB")
        theirs = fmt(r["theirs"]) if r["theirs"] is not None else "-"
        ratio = f"{r['ratio']:8.2f}x" if r["ratio"] is not None else "-"
        frac = f"{100 * r['fraction']:5.1f}% {r['best_of']}" if r["fraction"] is not None else ""
        print(f"{r['name']:{width}} {fmt(r['ours']):>10} {theirs:>13} {ratio:>9}  {frac}")
    print("speed-up = transformers / ours (above 1: ours is faster, or for memory, uses less); "
          "'of the limit' = the fastest the machine allows / our time\n"
          "(roofline: every weight read once per step at full bandwidth, or the matmuls at full GEMM speed)")
    if any(r["name"].startswith("tokenizer") for r in rows):
        print("tokenizer rows: the reference column is tiktoken (Rust), not transformers")
    if any(r["best_of"] == "MFU" for r in rows):
        print("MFU: a training step's FLOPs (per token: 6 per matmul parameter, plus 12 * n_layer * n_embd * T for "
              "attention) per second, over the peak printed with the train-gpu section")


def parse_args(argv=None):
    """(the parsed options, the list of sections to run)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None,
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all; train-gpu only with "
                             f"--device cuda)")
    parser.add_argument("--quick", action="store_true", help="smaller runs, fewer repetitions")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions of each (default 3, quick 2)")
    parser.add_argument("--compile", action="store_true",
                        help="decode and imagegpt also time ours' generate(..., compile=True), and its first call "
                             "(which compiles), next to transformers' eager generate")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="decode, forward and imagegpt: both models' precision (default float32; train and "
                             "train-gpu keep their own: fp32, and bf16 autocast)")
    parser.add_argument("--train-batch", type=int, default=None,
                        help="train-gpu: sequences of 1024 tokens per step (default 16; 2 in the CPU smoke run)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="train-gpu: the peak that MFU divides by (default 989, H100/H200 dense bf16; on a "
                             "CPU the measured fp32 GEMM)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if args.only is None:
        only = default_sections(torch.device(args.device).type)
    else:
        only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    return args, only


def main(argv=None):
    args, only = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    reps = args.reps or (2 if args.quick else 3)
    new_tokens = 16 if args.quick else 64
    shape = (1, 128) if args.quick else (4, 256)
    header = (f"nanogpt2 bench: {device}, {args.threads} thread(s), {args.dtype}, torch {torch.__version__}, transformers "
              f"{transformers.__version__ if transformers else 'not installed'}, medians of {reps}, "
              f"load average {os.getloadavg()[0]:.2f} at start")

    limits = None
    rows = []
    print(header, flush=True)
    if "limits" in only or any(s in only for s in ("decode", "forward", "train", "imagegpt", "train-gpu")):
        limits = measure_limits(device, args.quick)
        print(f"limits: memory read {limits['bandwidth_gbs']:.1f} GB/s, fp32 GEMM {limits['gflops']:.1f} GFLOP/s",
              flush=True)
    if "train-gpu" in only:  # first: the headline GPU figure, before the compile=True rows' compiles
        rows += progress(bench_train_gpu(device, reps, args.train_batch, args.peak_tflops, limits))
    if "decode" in only:
        rows += progress(bench_decode(device, reps, new_tokens, limits, args.compile, dtype))
    if "forward" in only:
        rows += progress(bench_forward(device, reps, shape, limits, dtype))
    if "train" in only:
        rows += progress(bench_train(device, reps, shape, limits))
    if "imagegpt" in only:
        rows += progress(bench_imagegpt(device, reps, 2 * new_tokens, limits, args.compile, dtype))
    if "load" in only:
        rows += progress(bench_load(device, reps))
    if "tokenizer" in only:
        rows += progress(bench_tokenizer(reps, 50_000 if args.quick else None, 1_000_000 if args.quick else 10_000_000,
                                         200 if args.quick else 2000))
    print_table(rows, header + f", load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
