"""Training and evaluation (nanogpt2.py, Part III): the addition task, text data, the parts of the loop
(schedule, optimiser groups, gradient accumulation, exact resume, DDP), sliding-window perplexity, and the
errors a user meets. Models are tiny (1-2 layers, width 16-32) so the whole file runs in well under a
minute on 2 cores; the full default run is marked slow."""

import argparse
import csv
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import nanogpt2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16"]
TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog, {i * 7 % 13} times.\n" for i in range(60))


def train(tmp_path, *options, name="run"):
    out = tmp_path / name
    assert nanogpt2.main(["train", *TINY, "--out", str(out), *options]) == 0
    return out


def log_rows(out):
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def weights(out):
    return nanogpt2.load_safetensors(str(out / "model.safetensors"))


def text_file(tmp_path, text=TEXT, name="corpus.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- the addition task --------------------------------------------------------------------------------


def test_addition_problems_are_fixed_width_with_the_answer_reversed():
    task = nanogpt2.AdditionTask(2)
    tokens = task.encode(torch.tensor([7 * 100 + 39, 99 * 100 + 99]))
    assert [task.tokenizer.decode(row) for row in tokens] == ["07+39=640\n", "99+99=891\n"]
    assert nanogpt2.AdditionTask(3).tokenizer.decode(nanogpt2.AdditionTask(3).encode(torch.tensor([999_999]))[0]) \
        == "999+999=8991\n"
    x, y = task.examples(torch.tensor([7 * 100 + 39]))
    assert task.tokenizer.decode(x[0]) == "07+39=640"  # the inputs: all but the last token
    assert (y[0, :5] == -100).all()  # no loss on predicting "7+39=" (the operands are random)
    assert task.tokenizer.decode(y[0, 5:]) == "640\n"  # the answer digits and the end, predicted from "=" on


def test_held_out_problems_are_fixed_and_never_drawn_for_training():
    task, again = nanogpt2.AdditionTask(2), nanogpt2.AdditionTask(2)
    assert torch.equal(task.held_out, again.held_out)  # the same set every run, whatever the seed
    assert len(task.held_out.unique()) == 1000  # 10% of the 10,000 problems
    g = torch.Generator().manual_seed(0)
    drawn = torch.cat([task.sample(256, g) for _ in range(200)])  # 51,200 draws from the 9,000 others
    assert not torch.isin(drawn, task.held_out).any()
    assert len(drawn.unique()) > 8900  # and those are all drawn, not a few (expected: 9000 (1 - e^-5.7) = 8970)
    assert len(nanogpt2.AdditionTask(4).held_out) > 1990  # too many problems to list: ~2,000 random ones


# --- the loop's parts ---------------------------------------------------------------------------------


def test_schedule_warms_up_then_follows_a_cosine_down_to_a_tenth():
    lr = nanogpt2.learning_rate
    assert lr(0, 0.0, 1e-3, 10) == pytest.approx(1e-4)  # first warmup step: a tenth of the peak
    assert lr(9, 0.0, 1e-3, 10) == pytest.approx(1e-3)
    assert lr(500, 0.5, 1e-3, 10) == pytest.approx(0.55e-3)  # half way: between peak and floor
    assert lr(1000, 1.0, 1e-3, 10) == pytest.approx(1e-4)  # the end: a tenth of the peak
    after_warmup = [lr(s, s / 100, 1.0, 10) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:]))


def test_weight_decay_goes_to_matrices_only_and_each_parameter_once():
    model = nanogpt2.GPT2LMHeadModel(nanogpt2.GPT2Config(vocab_size=20, n_positions=8, n_embd=16, n_layer=2, n_head=2))
    decay, no_decay = nanogpt2.configure_optimizer(model, 1e-3, 0.1, "cpu").param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert any(p is model.transformer.wte.weight for p in decay["params"])  # the tied embedding/head, once
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_micro_batches_with_accumulation_equal_one_bigger_batch():
    """k micro-batches give the gradient of one batch k times larger, even when they hold different numbers
    of targets (the loss is normalised by the whole batch's count, not per micro-batch)."""
    torch.manual_seed(0)
    config = nanogpt2.GPT2Config(vocab_size=20, n_positions=8, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                                 embd_pdrop=0.0, attn_pdrop=0.0)
    model = nanogpt2.GPT2LMHeadModel(config)
    x = torch.randint(0, 20, (8, 8))
    y = torch.randint(0, 20, (8, 8))
    y[torch.rand(8, 8) < 0.5] = -100  # uneven: each micro-batch holds a different number of targets
    updates = []
    for micro_batches in ([(x, y)], [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)]):
        copy = nanogpt2.GPT2LMHeadModel(config)
        copy.load_state_dict(model.state_dict())
        sgd = torch.optim.SGD(copy.parameters(), lr=1.0)  # the update is minus the gradient itself
        loss, norm = nanogpt2.train_step(copy, sgd, micro_batches, 1.0, 0.0, nanogpt2.Run())  # cpu, float32
        updates.append((loss, norm, torch.cat([(p - q).flatten() for p, q in zip(copy.parameters(), model.parameters())])))
    (loss_one, norm_one, one), (loss_four, norm_four, four) = updates
    assert loss_one == pytest.approx(loss_four, rel=1e-6) and norm_one == pytest.approx(norm_four, rel=1e-5)
    torch.testing.assert_close(four, one, rtol=0, atol=1e-6)  # fp32: the same sums in another order


def test_training_lowers_the_loss_and_logs_every_step(tmp_path):
    out = train(tmp_path, "--digits", "1", "--n-layer", "2", "--n-embd", "32", "--batch-size", "64", "--lr", "3e-3",
                "--warmup", "5", "--max-steps", "40", "--eval-every", "20")
    rows = log_rows(out)
    assert [int(r["step"]) for r in rows] == list(range(1, 41))
    assert [r["step"] for r in rows if r["val_loss"]] == ["20", "40"]
    first, last = (np.mean([float(r["loss"]) for r in part]) for part in (rows[:5], rows[-5:]))
    assert first > 2.3  # at first the model guesses among 13 tokens: about ln 13 = 2.56
    assert last < 1.5, f"loss went from {first:.3f} to {last:.3f} in 40 steps"
    assert (out / "config.json").exists() and (out / "training_state.pt").exists()
    model = nanogpt2.GPT2LMHeadModel.from_pretrained(str(out))
    assert model.config.extra["char_vocab"] == nanogpt2.ADDITION_VOCAB and model.config.extra["addition_digits"] == 1


def test_resume_continues_bitwise_exactly_with_dropout_on(tmp_path):
    options = ["--digits", "2", "--batch-size", "16", "--max-steps", "8", "--dropout", "0.1", "--eval-every", "3",
               "--warmup", "2"]
    whole = train(tmp_path, *options, name="whole")
    halves = train(tmp_path, *options, "--stop-at", "4", name="halves")
    assert nanogpt2.main(["train", "--resume", str(halves)]) == 0
    a, b = weights(whole), weights(halves)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from an uninterrupted run"
    state_a, state_b = (torch.load(out / "training_state.pt", weights_only=True) for out in (whole, halves))
    assert state_a["step"] == state_b["step"] == 8
    moments = [(s["optimizer"]["state"][0]["exp_avg"], s["optimizer"]["state"][0]["exp_avg_sq"]) for s in (state_a, state_b)]
    assert all(torch.equal(x, y) for x, y in zip(*moments))
    assert [r["loss"] for r in log_rows(whole)] == [r["loss"] for r in log_rows(halves)]


def test_two_gloo_processes_under_torchrun_match_one_process(tmp_path):
    """torchrun --nproc_per_node 2 on CPU (gloo, 127.0.0.1 only): each process takes half of every batch;
    DDP's gradients then equal those of one process with the whole batch."""
    options = [*TINY, "--digits", "2", "--max-steps", "4", "--warmup", "1", "--eval-every", "2", "--device", "cpu"]
    one = tmp_path / "one"
    assert nanogpt2.main(["train", *options, "--batch-size", "16", "--out", str(one)]) == 0
    with socket.socket() as s:  # a free port on the loopback interface
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(port),
               os.path.join(ROOT, "nanogpt2.py"), "train", *options, "--batch-size", "8", "--out", str(two)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processes 2" in result.stdout and result.stdout.count("saved to") == 1  # only the first process speaks
    a, b = weights(one), weights(two)
    for key in a:  # fp32: the two halves' gradients are summed in another order
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=key)
    for column in ("loss", "grad_norm"):  # AdamW would hide a gradient off by a constant factor; the norm does not
        assert [float(r[column]) for r in log_rows(two)] == pytest.approx([float(r[column]) for r in log_rows(one)],
                                                                          rel=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_trains(tmp_path, device, dtype):
    out = train(tmp_path, "--digits", "1", "--batch-size", "32", "--max-steps", "6", "--dtype", dtype,
                "--device", str(device), "--lr", "3e-3", "--warmup", "1")
    losses = [float(r["loss"]) for r in log_rows(out)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert weights(out)["transformer.h.0.attn.c_attn.weight"].dtype == torch.float32  # master weights stay fp32


def test_loss_curve_png_only_when_matplotlib_is_importable(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    out = train(tmp_path, "--digits", "1", "--batch-size", "8", "--max-steps", "2")
    assert not (out / "loss.png").exists() and (out / "log.csv").exists()


# --- text data ----------------------------------------------------------------------------------------


def test_text_file_at_character_level_trains_and_saves_its_vocabulary(tmp_path, capsys):
    path = text_file(tmp_path)
    out = train(tmp_path, "--data", str(path), "--tokenizer", "char", "--block-size", "16", "--batch-size", "8",
                "--max-steps", "6", "--eval-every", "3")
    chars = "".join(sorted(set(TEXT)))
    model = nanogpt2.GPT2LMHeadModel.from_pretrained(str(out))
    assert model.config.extra["char_vocab"] == chars and model.config.vocab_size == len(chars)
    tokens = np.fromfile(out / "tokens.bin", dtype=np.uint16)
    assert tokens.tolist() == [chars.index(c) for c in TEXT]  # the memory-mapped file holds the whole text
    data = nanogpt2.TextData(str(out / "tokens.bin"), "uint16", 16, 0.1, "corpus")
    assert data.n_val == len(TEXT) // 10 and data.n_train + data.n_val == len(TEXT)
    x, y = data.examples(torch.tensor([0, 5]))
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.shape == (2, 16)  # targets are the inputs shifted by one
    assert "sample (temperature 0.8):" in capsys.readouterr().out


CHAR_RUN = ["--tokenizer", "char", "--block-size", "16", "--batch-size", "8", "--eval-every", "2"]


@pytest.mark.parametrize("damage", ['{"source": {"path": "/data/cor', "[]", '{"source": {}, "char_vocab": null, '
                                    '"dtype": "float64", "tokens": 3}', "\udcff".encode("utf-8", "surrogatepass")])
def test_a_damaged_tokens_json_is_named_and_made_again_from_the_data(tmp_path, capsys, damage):
    out = train(tmp_path, "--data", str(text_file(tmp_path)), *CHAR_RUN, "--max-steps", "2")
    capsys.readouterr()
    (out / "tokens.json").write_bytes(damage if isinstance(damage, bytes) else damage.encode())
    assert nanogpt2.main(["train", "--resume", str(out), "--max-steps", "3"]) == 0
    captured = capsys.readouterr()
    assert f"note: {out / 'tokens.json'} is damaged" in captured.err and "tokenising --data again" in captured.err
    assert json.loads((out / "tokens.json").read_text())["tokens"] == len(TEXT)  # whole again


def test_a_run_stopped_while_writing_tokens_json_leaves_the_old_one_whole(tmp_path, monkeypatch):
    corpus = text_file(tmp_path)
    out = train(tmp_path, "--data", str(corpus), *CHAR_RUN, "--max-steps", "1")
    old = (out / "tokens.json").read_bytes()
    corpus.write_text(TEXT + "one more line\n", encoding="utf-8")  # a changed file is tokenised again

    class Killed(BaseException):
        pass

    real_replace = os.replace

    def killed_before_tokens_json_is_in_place(src, dst):  # tokens.json's new bytes are written, not yet renamed
        if str(dst).endswith("tokens.json"):
            raise Killed
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_tokens_json_is_in_place)
    with pytest.raises(Killed):
        nanogpt2.main(["train", *TINY, "--data", str(corpus), *CHAR_RUN, "--max-steps", "1", "--overwrite", "--out",
                       str(out)])
    assert (out / "tokens.json").read_bytes() == old  # never half of one
    monkeypatch.undo()
    train(tmp_path, "--data", str(corpus), *CHAR_RUN, "--max-steps", "1", "--overwrite")  # tokenised again
    assert json.loads((out / "tokens.json").read_text())["tokens"] == len(TEXT) + len("one more line\n")


def test_bpe_tokens_of_a_file_read_in_pieces_equal_those_of_the_whole_text(tmp_path):
    text = ("Hello  world!\n\n\n   indented\tline\n" * 3 + "naïve café 😀 <|endoftext|> done.  \n\n" + "x" * 50) * 4
    path = text_file(tmp_path, text)
    pieces = list(nanogpt2.read_text_pieces(str(path), piece_chars=7))  # cuts land everywhere
    assert "".join(pieces) == text and len(pieces) > 10
    dest = str(tmp_path / "tokens.bin")
    count = nanogpt2.tokenize_file(str(path), nanogpt2.BPETokenizer(), dest, piece_chars=7)
    assert np.fromfile(dest, dtype=np.uint16).tolist() == nanogpt2.encode(text) and count == len(nanogpt2.encode(text))


def test_text_file_with_gpt2_bpe_trains(tmp_path):
    out = train(tmp_path, "--data", str(text_file(tmp_path)), "--block-size", "16", "--batch-size", "4",
                "--max-steps", "3", "--eval-every", "0")
    assert nanogpt2.GPT2Config.from_json_file(out / "config.json").vocab_size == 50257
    assert "char_vocab" not in nanogpt2.GPT2Config.from_json_file(out / "config.json").extra
    assert np.fromfile(out / "tokens.bin", dtype=np.uint16).tolist() == nanogpt2.encode(TEXT)


def test_init_fine_tunes_the_given_weights(tmp_path):
    chars = "".join(sorted(set(TEXT)))
    config = nanogpt2.GPT2Config(vocab_size=len(chars), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                 extra={"char_vocab": chars})
    pretrained = nanogpt2.GPT2LMHeadModel(config)
    pretrained.save_pretrained(str(tmp_path / "pretrained"))
    out = train(tmp_path, "--data", str(text_file(tmp_path)), "--init", str(tmp_path / "pretrained"),
                "--block-size", "16", "--batch-size", "4", "--max-steps", "2", "--lr", "1e-9", "--warmup", "0")
    tuned = weights(out)
    for name, tensor in pretrained.state_dict().items():
        if name in tuned:  # a step of 1e-9 leaves the pretrained weights all but unchanged
            torch.testing.assert_close(tuned[name], tensor, rtol=0, atol=1e-7)


# --- eval -----------------------------------------------------------------------------------------------


def hand_sliding_window_nll(model, tokens, context, stride):
    """The Hugging Face perplexity guide's loop, one window at a time, each token scored once."""
    total, count, scored_up_to = 0.0, 0, 0
    for begin in range(0, len(tokens), stride):
        end = min(begin + context, len(tokens))
        logprobs = torch.log_softmax(model(torch.tensor(tokens[begin:end])[None]).logits[0].double(), dim=-1)
        for t in range(max(scored_up_to, begin + 1), end):  # not scored before, and with context
            total -= logprobs[t - begin - 1, tokens[t]].item()
            count += 1
        scored_up_to = end
        if end == len(tokens):
            break
    return total, count


@pytest.mark.parametrize("context, stride", [(16, 5), (16, 16), (7, 1), (32, 9)])
def test_eval_perplexity_matches_a_hand_computed_sliding_window(tmp_path, capsys, context, stride):
    chars = "".join(sorted(set(TEXT)))
    torch.manual_seed(0)
    model = nanogpt2.GPT2LMHeadModel(nanogpt2.GPT2Config(vocab_size=len(chars), n_positions=32, n_embd=16,
                                                         n_layer=2, n_head=2, extra={"char_vocab": chars})).eval()
    model.save_pretrained(str(tmp_path / "model"))
    text = TEXT[:120]
    tokens = [chars.index(c) for c in text]
    expected_total, expected_count = hand_sliding_window_nll(model, tokens, context, stride)
    total, count = nanogpt2.sliding_window_loss(model, np.array(tokens), context, stride, batch_size=3)
    assert count == expected_count and (stride == context or count == len(tokens) - 1)
    assert total == pytest.approx(expected_total, rel=1e-5)  # fp32 logits against a float64 sum
    path = text_file(tmp_path, text)
    assert nanogpt2.main(["eval", "--model", str(tmp_path / "model"), "--data", str(path), "--context",
                          str(context), "--stride", str(stride)]) == 0
    printed = float(re.search(r"perplexity ([\d.]+)", capsys.readouterr().out).group(1))
    assert printed == pytest.approx(math.exp(expected_total / expected_count), rel=1e-3)  # printed to 3 decimals


def test_eval_of_an_addition_model_reports_held_out_accuracy(tmp_path, capsys):
    out = train(tmp_path, "--digits", "1", "--batch-size", "8", "--max-steps", "2")
    capsys.readouterr()
    assert nanogpt2.main(["eval", "--model", str(out)]) == 0
    assert re.search(r"held-out exact match: [\d.]+% \(\d+ of 10 problems", capsys.readouterr().out)


# --- errors ---------------------------------------------------------------------------------------------


def run_error(capsys, argv):
    assert nanogpt2.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanogpt2.py: error: ") and err.count("\n") == 1  # one line, no traceback
    return err


def test_bad_data_files_give_clear_errors(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert "--data " + str(missing) + ": no such file" in run_error(capsys, ["train", "--data", str(missing)])
    assert not os.path.exists(os.path.join("out", "nope"))  # checked before any directory is made
    empty = text_file(tmp_path, "", "empty.txt")
    assert "is empty" in run_error(capsys, ["train", "--data", str(empty), "--out", str(tmp_path / "o")])
    short = text_file(tmp_path, "just a few words\n" * 3, "short.txt")
    err = run_error(capsys, ["train", "--data", str(short), "--tokenizer", "char", "--out", str(tmp_path / "o")])
    assert "holds 51 tokens: 46 for training and 5 for validation" in err and "--block-size 256 needs 257" in err
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes("café\n".encode("latin-1") * 100)
    assert "is not UTF-8 text" in run_error(capsys, ["train", "--data", str(not_utf8), "--out", str(tmp_path / "o")])
    assert "no such file" in run_error(capsys, ["eval", "--model", str(tmp_path), "--data", str(missing)])


@pytest.mark.parametrize("options, message", [
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--dropout", "1"], "--dropout is a probability in [0, 1), got 1.0"),
    (["--tokenizer", "char"], "--tokenizer is an option of --data"),
    (["--resume", "/nonexistent/run"], "no training_state.pt there"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--val-fraction", "1"],
     "CUDA is not available" if not torch.cuda.is_available() else "--val-fraction must be in (0, 1)"),
])
def test_bad_options_give_clear_errors(tmp_path, capsys, options, message):
    assert message in run_error(capsys, ["train", "--out", str(tmp_path / "o"), *options])


def test_digits_with_a_text_file_is_refused(tmp_path, capsys):
    err = run_error(capsys, ["train", "--data", str(text_file(tmp_path)), "--digits", "3"])
    assert "--digits is an option of the addition task" in err


def test_init_without_data_must_be_an_addition_model(tmp_path, capsys):
    chars = "".join(sorted(set(TEXT)))
    nanogpt2.GPT2LMHeadModel(nanogpt2.GPT2Config(vocab_size=len(chars), n_positions=16, n_embd=16, n_layer=1,
                                                 n_head=2, extra={"char_vocab": chars})).save_pretrained(str(tmp_path / "m"))
    err = run_error(capsys, ["train", "--init", str(tmp_path / "m"), "--out", str(tmp_path / "o")])
    assert "is not an addition model of 10 positions or more; to fine-tune it, give a text file with --data" in err


def test_unknown_option_exits_2_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        nanogpt2.main(["train", "--bogus", "1"])
    assert exit_.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_eval_stride_longer_than_context_is_refused(tmp_path, capsys):
    chars = "".join(sorted(set(TEXT)))
    nanogpt2.GPT2LMHeadModel(nanogpt2.GPT2Config(vocab_size=len(chars), n_positions=16, n_embd=16, n_layer=1,
                                                 n_head=2, extra={"char_vocab": chars})).save_pretrained(str(tmp_path / "m"))
    path = str(text_file(tmp_path))
    assert "--stride 20 is longer than --context 16" in run_error(
        capsys, ["eval", "--model", str(tmp_path / "m"), "--data", path, "--stride", "20"])
    assert "--context 64 is longer than the model's 16 positions" in run_error(
        capsys, ["eval", "--model", str(tmp_path / "m"), "--data", path, "--context", "64"])


# --- the default run ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_run_learns_two_digit_addition_within_five_minutes(tmp_path):
    args = nanogpt2.build_parser().parse_args(["train", "--out", str(tmp_path / "add")])
    start = time.time()
    summary = nanogpt2.train_command(args)
    assert summary["accuracy"] >= 0.99
    assert time.time() - start < 300


# --- never losing work: the run folder, the log, Ctrl-C, damaged checkpoints ----------------------------


def start_training(out, *options):
    """`nanogpt2.py train` of a tiny adder as its own process, with steps enough to outlast the test."""
    command = [sys.executable, os.path.join(ROOT, "nanogpt2.py"), "train", *TINY, "--digits", "1", "--batch-size",
               "8", "--max-steps", "100000", "--time-budget", "0", "--eval-every", "0", "--save-every", "5",
               "--out", str(out), *options]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def wait_for_log_rows(out, process, count, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "log.csv").exists() and len(log_rows(out)) >= count:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"no {count} log rows in {timeout} s")


def test_a_run_killed_outright_keeps_its_log_and_resume_continues_it_without_a_gap(tmp_path):
    out = tmp_path / "run"
    process = start_training(out)
    wait_for_log_rows(out, process, 13)
    process.kill()  # SIGKILL: no handler runs, nothing is flushed on the way out
    process.wait()
    steps = [int(r["step"]) for r in log_rows(out)]
    assert steps[:13] == list(range(1, 14))  # every line reached the file as it was written
    saved = torch.load(out / "training_state.pt", weights_only=True)["step"]
    assert saved >= 10 and saved % 5 == 0
    # The stale lock of the killed process is taken over; the rows after the checkpoint are dropped and redone.
    assert nanogpt2.main(["train", "--resume", str(out), "--max-steps", str(saved + 6)]) == 0
    assert [int(r["step"]) for r in log_rows(out)] == list(range(1, saved + 7))
    assert not (out / ".lock").exists()


def test_ctrl_c_saves_a_checkpoint_at_the_last_step_and_prints_how_to_resume(tmp_path):
    out = tmp_path / "run"
    process = start_training(out, "--save-every", "0")  # no checkpoint but the one Ctrl-C writes
    wait_for_log_rows(out, process, 3)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    step = torch.load(out / "training_state.pt", weights_only=True)["step"]
    assert int(log_rows(out)[-1]["step"]) == step >= 3  # the step under way finished, then it was saved
    assert f"saved a checkpoint at step {step}" in stdout
    assert f"python nanogpt2.py train --resume {out}" in stdout
    assert nanogpt2.main(["train", "--resume", str(out), "--max-steps", str(step + 2)]) == 0
    assert [int(r["step"]) for r in log_rows(out)] == list(range(1, step + 3))


def test_training_again_into_a_run_folder_is_refused_and_overwrite_replaces_it(tmp_path, capsys):
    out = train(tmp_path, "--digits", "1", "--batch-size", "8", "--max-steps", "3")
    before = (out / "model.safetensors").read_bytes()
    err = run_error(capsys, ["train", *TINY, "--digits", "1", "--max-steps", "2", "--out", str(out)])
    assert f"--out {out} already holds a run" in err and f"--resume {out}" in err and "--overwrite" in err
    assert (out / "model.safetensors").read_bytes() == before and len(log_rows(out)) == 3  # untouched
    train(tmp_path, "--digits", "1", "--batch-size", "8", "--max-steps", "2", "--seed", "1", "--overwrite")
    assert len(log_rows(out)) == 2 and (out / "model.safetensors").read_bytes() != before
    assert torch.load(out / "training_state.pt", weights_only=True)["step"] == 2


def test_a_folder_in_use_by_a_live_process_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{live.pid}\n")
        err = run_error(capsys, ["train", *TINY, "--digits", "1", "--max-steps", "2", "--out", str(out)])
        assert f"process {live.pid} is training there" in err
        assert not (out / "log.csv").exists() and (out / ".lock").read_text() == f"{live.pid}\n"
    finally:
        live.kill()
        live.wait()  # now a dead process's lock: taken over
    train(tmp_path, "--digits", "1", "--batch-size", "8", "--max-steps", "2")
    assert len(log_rows(out)) == 2 and not (out / ".lock").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "truncate, no checksum"])
def test_a_damaged_training_state_gives_one_clear_line(tmp_path, capsys, damage):
    out = train(tmp_path, "--digits", "1", "--batch-size", "8", "--max-steps", "2")
    path = out / "training_state.pt"
    data = bytearray(path.read_bytes())
    if damage == "flip a byte":  # inside a tensor's bytes: torch.load alone would not notice
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    if damage.endswith("no checksum"):
        (out / "training_state.pt.sha256").unlink()
    err = run_error(capsys, ["train", "--resume", str(out)])
    assert f"{path} is damaged" in err


@pytest.mark.parametrize("module", ["nanogpt2", "imagegpt"])
@pytest.mark.parametrize("killed", ["before the state's rename", "after the state's rename"])
def test_a_run_killed_between_the_state_and_its_checksum_leaves_a_good_checkpoint(tmp_path, monkeypatch, module,
                                                                                   killed):
    # training_state.pt and its .sha256 cannot be renamed at once. A kill between the two renames must leave
    # a state its .sha256 accepts (the old one, or the new one), never a good checkpoint reported as damaged.
    import imagegpt
    save, read = {"nanogpt2": (nanogpt2.save_training_state, nanogpt2.read_training_state),
                  "imagegpt": (imagegpt.save_training_state, imagegpt.read_training_state)}[module]
    state = lambda step: {"step": step, "elapsed": 0.0, "args": {}, "config": {}, "model": {"w": torch.full((4,), step)},
                          "optimizer": {}, "data_rng": torch.zeros(1), "rng": torch.zeros(1)}
    path = str(tmp_path / "training_state.pt")
    save(path, state(1))
    real_replace, renames = os.replace, []

    def replace_then_die(src, dst):  # os.replace, with a kill at the chosen moment of the second save
        renames.append(dst)
        state_renamed = dst == path
        if state_renamed and killed == "before the state's rename":
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)
        if state_renamed and killed == "after the state's rename":
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        save(path, state(2))
    monkeypatch.undo()
    assert renames[-2:] == [path + ".sha256", path]  # the checksum went first; the kill came at the state
    assert read(path)["step"] == (1 if killed == "before the state's rename" else 2)
    save(path, state(3))  # the next save leaves one digest again
    assert len(open(path + ".sha256").read().splitlines()) == 1 and read(path)["step"] == 3


def test_resume_with_a_larger_budget_trains_a_finished_run_further(tmp_path):
    out = train(tmp_path, "--digits", "1", "--batch-size", "8", "--max-steps", "4")
    assert nanogpt2.main(["train", "--resume", str(out)]) == 0  # nothing left to do: the same 4 steps
    assert torch.load(out / "training_state.pt", weights_only=True)["step"] == 4
    assert nanogpt2.main(["train", "--resume", str(out), "--max-steps", "7"]) == 0
    assert torch.load(out / "training_state.pt", weights_only=True)["step"] == 7
    assert [int(r["step"]) for r in log_rows(out)] == list(range(1, 8))
    cut = train(tmp_path, "--digits", "1", "--batch-size", "8", "--max-steps", "100000", "--time-budget", "0.5",
                name="cut")  # cut by its time budget
    steps = torch.load(cut / "training_state.pt", weights_only=True)["step"]
    assert nanogpt2.main(["train", "--resume", str(cut), "--time-budget", "1.5"]) == 0
    assert torch.load(cut / "training_state.pt", weights_only=True)["step"] > steps


def test_the_adder_stops_once_it_reaches_the_target_accuracy(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(nanogpt2.AdditionTask, "accuracy", lambda self, model: (0.995, None, None))
    monkeypatch.setattr(nanogpt2.AdditionTask, "report", lambda self, model, say: 0.995)
    train(tmp_path, "--digits", "1", "--batch-size", "8", "--max-steps", "50", "--eval-every", "5")
    printed = capsys.readouterr().out
    assert "held-out exact match 99.5%" in printed and "step 5 of 50" in printed
    assert "reached --target-accuracy 0.99" in printed


def blow_up_at(module, monkeypatch, step, before=lambda: None):
    """module.train_step as it is, but at the given step every weight is NaN first (as after an update too large):
    the real loss and gradient of that step come out NaN. before() runs just before, e.g. to look at the folder."""
    real, calls = module.train_step, []

    def step_with_nan_weights(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            before()
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(module, "train_step", step_with_nan_weights)


def test_a_run_that_turns_to_nan_stops_and_keeps_the_last_good_checkpoint_byte_for_byte(tmp_path, capsys,
                                                                                         monkeypatch):
    out, on_disk = tmp_path / "run", {}

    def remember_the_folder():  # after step 6: the checkpoint of step 5 and 6 rows of log
        on_disk.update({p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"})

    blow_up_at(nanogpt2, monkeypatch, 7, remember_the_folder)
    err = run_error(capsys, ["train", *TINY, "--digits", "1", "--batch-size", "8", "--max-steps", "20", "--eval-every",
                             "5", "--lr", "0.002", "--out", str(out)])
    assert f"training diverged at step 7 (loss nan, gradient norm nan): the last good checkpoint, step 5, is kept " \
           f"in {out}; lower --lr (its peak is 0.002)" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == on_disk  # nothing saved over it, no temporary left
    assert "training_state.pt" in on_disk and torch.load(out / "training_state.pt", weights_only=True)["step"] == 5
    monkeypatch.undo()
    assert nanogpt2.main(["train", "--resume", str(out), "--max-steps", "7"]) == 0  # the kept checkpoint resumes
    assert [int(r["step"]) for r in log_rows(out)] == list(range(1, 8))


def test_a_run_that_turns_to_nan_before_any_checkpoint_says_nothing_was_saved(tmp_path, capsys, monkeypatch):
    blow_up_at(nanogpt2, monkeypatch, 2)
    out = tmp_path / "run"
    err = run_error(capsys, ["train", *TINY, "--digits", "1", "--batch-size", "8", "--max-steps", "20", "--eval-every",
                             "5", "--out", str(out)])
    assert f"training diverged at step 2 (loss nan, gradient norm nan): no checkpoint was saved in {out} before " \
           "it" in err
    assert not (out / "training_state.pt").exists() and not (out / "model.safetensors").exists()


def test_a_huge_learning_rate_diverges_and_the_run_says_where(tmp_path):
    """No monkeypatching: --lr 1e30 blows the weights up, and the command stops with one line, status 2."""
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "nanogpt2.py"), "train", *TINY, "--digits", "1",
                             "--batch-size", "8", "--max-steps", "20", "--lr", "1e30", "--out", str(out)],
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert re.match(r"nanogpt2.py: error: training diverged at step \d+ \(loss nan", result.stderr), result.stderr
    assert not (out / "training_state.pt").exists()


ONE_PROCESS_SEES_NAN = """
import sys
import torch.distributed as dist
sys.path.insert(0, {root!r})
import nanogpt2
dist.init_process_group("gloo")
run = nanogpt2.Run(rank=dist.get_rank(), world_size=dist.get_world_size())
loss = float("nan") if run.rank == 1 else 2.5  # the second process alone sees a NaN
print(f"process {{run.rank}} stops: {{nanogpt2.training_diverged(loss, 1.0, run)}}", flush=True)
dist.destroy_process_group()
"""


def test_under_torchrun_one_process_seeing_nan_stops_every_process(tmp_path):
    """A process that stopped alone would leave the others waiting for it at their next all-reduce."""
    script = tmp_path / "agree.py"
    script.write_text(ONE_PROCESS_SEES_NAN.format(root=ROOT))
    with socket.socket() as s:  # a free port on the loopback interface
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(port), str(script)]
    result = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo"),
                            capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    # (the two processes print to one pipe, so their lines may interleave: look for each, not for lines)
    assert "process 0 stops: True" in result.stdout and "process 1 stops: True" in result.stdout, result.stdout
    assert "False" not in result.stdout, result.stdout


def test_only_a_non_finite_loss_or_gradient_norm_is_divergence_and_fp16_may_overflow_its_gradient():
    fp32, fp16 = nanogpt2.Run(), nanogpt2.Run(dtype=torch.float16)  # fp16: a GradScaler, which skips such steps
    assert not nanogpt2.training_diverged(2.5, 1e6, fp32)
    assert nanogpt2.training_diverged(float("nan"), 1.0, fp32) and nanogpt2.training_diverged(float("inf"), 1.0, fp16)
    assert nanogpt2.training_diverged(2.5, float("inf"), fp32) and nanogpt2.training_diverged(2.5, float("nan"), fp32)
    assert not nanogpt2.training_diverged(2.5, float("inf"), fp16)


def test_a_run_that_fails_before_training_leaves_no_folder_behind(tmp_path, capsys):
    chars = "".join(sorted(set(TEXT)))
    nanogpt2.GPT2LMHeadModel(nanogpt2.GPT2Config(vocab_size=len(chars), n_positions=16, n_embd=16, n_layer=1,
                                                 n_head=2, extra={"char_vocab": chars})).save_pretrained(str(tmp_path / "m"))
    run_error(capsys, ["train", "--init", str(tmp_path / "m"), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    run_error(capsys, ["train", "--init", str(tmp_path / "m"), "--out", str(tmp_path / "a" / "b" / "c")])
    assert not (tmp_path / "a").exists()  # nor the folders made on the way to it


@pytest.mark.parametrize("environment", [dict(RANK="1"), dict(WORLD_SIZE="0"), dict(WORLD_SIZE="abc"),
                                         dict(WORLD_SIZE="2", RANK="2"), dict(LOCAL_RANK="-1")])
def test_torchrun_variables_that_cannot_be_right_are_one_line(tmp_path, capsys, monkeypatch, environment):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    err = run_error(capsys, ["train", *TINY, "--max-steps", "1", "--out", str(tmp_path / "o")])
    assert "torchrun sets these (0 <= RANK < WORLD_SIZE); unset them" in err
    assert not (tmp_path / "o").exists()


def test_a_model_of_few_positions_still_gets_its_sample_after_training(tmp_path, capsys):
    out = train(tmp_path, "--data", str(text_file(tmp_path)), "--tokenizer", "char", "--block-size", "4",
                "--max-steps", "2")
    assert "max_new_tokens" not in capsys.readouterr().err
    assert (out / "model.safetensors").exists()


def test_a_small_model_on_a_cpu_trains_on_one_thread_unless_told_otherwise(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    small = nanogpt2.GPT2LMHeadModel(nanogpt2.GPT2Config(vocab_size=13, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    cpu = torch.device("cpu")
    nanogpt2.set_cpu_threads(argparse.Namespace(threads=None), small, cpu)
    nanogpt2.set_cpu_threads(argparse.Namespace(threads=3), small, cpu)  # --threads wins
    assert calls == [1, 3]
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's own setting is left to torch
    nanogpt2.set_cpu_threads(argparse.Namespace(threads=None), small, cpu)
    monkeypatch.setattr(nanogpt2, "ONE_THREAD_BELOW", 100)  # a model "too big" for one thread: torch decides
    monkeypatch.delenv("OMP_NUM_THREADS")
    nanogpt2.set_cpu_threads(argparse.Namespace(threads=None), small, cpu)
    assert calls == [1, 3]
