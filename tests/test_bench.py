"""bench.py's plumbing (not its timings): which sections run, the compile=True rows, and the train-gpu section's
code path, run here as its tiny CPU smoke version."""

import time

import torch

import bench


def test_train_gpu_is_in_the_defaults_on_cuda_only():
    assert bench.default_sections("cpu") == ["limits", "decode", "forward", "train", "load", "imagegpt", "tokenizer"]
    assert bench.default_sections("cuda")[-1] == "train-gpu"
    args, only = bench.parse_args([])
    assert only == bench.default_sections("cpu") and not args.compile


def test_compile_flag_and_train_gpu_options_parse():
    args, only = bench.parse_args(["--compile", "--only", "decode,train-gpu", "--train-batch", "8",
                                   "--peak-tflops", "312"])
    assert args.compile and only == ["decode", "train-gpu"]
    assert args.train_batch == 8 and args.peak_tflops == 312.0


def test_compiled_rows_keep_the_first_call_out_of_the_median():
    calls = []

    def ours():  # "compiles" on its first call: 0.2 s, then 0.01 s
        time.sleep(0.2 if not calls else 0.01)
        calls.append("ours")

    rows = bench.compiled_rows("decode", ours, lambda: time.sleep(0.01), 2, torch.device("cpu"), None, "")
    steady, first = rows
    assert steady["name"] == "decode, compile=True" and "compile=True" in first["name"]
    assert calls == ["ours"] * 4  # the first call (its own row), one more warm-up, then 2 timed ones
    assert first["ours"] >= 0.2 > steady["ours"]
    assert first["theirs"] is not None and steady["theirs"] is not None


def test_train_gpu_smoke_run_on_cpu(capsys):
    limits = {"gflops": 10.0}  # a made-up peak: the smoke run's MFU only has to be computed, not meaningful
    rows = bench.bench_train_gpu(torch.device("cpu"), 1, None, None, limits)
    torch._dynamo.reset()  # the compiled losses hold the models; let them go
    out = capsys.readouterr().out
    assert "tokens/s" in out and "MFU" in out and "measured fp32 GEMM" in out
    step = rows[0]
    assert "compiled" in step["name"] and step["ours"] > 0 and step["best_of"] == "MFU"
    assert 0 < step["fraction"]


def test_tokenizer_section_times_both_encoders_and_a_small_training(capsys):
    rows = bench.bench_tokenizer(1, english_bytes=20_000, train_bytes=100_000, merges=20)
    out = capsys.readouterr().out
    assert "written out" in out and "MB/s, tiktoken" in out and "learnt 20 merges from 0.1 MB" in out
    encode, train = rows
    assert "vs tiktoken" in encode["name"] and encode["ours"] > 0 and encode["theirs"] > 0
    assert "train_bpe, 20 merges" in train["name"] and train["ours"] > 0 and train["theirs"] is None
    assert bench.parse_args(["--only", "tokenizer"])[1] == ["tokenizer"]
