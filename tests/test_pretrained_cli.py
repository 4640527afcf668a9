"""The command line (`python nanogpt2.py sample ...`) end to end, on small checkpoints saved by the tests.

What the command prints is held against generate() run in this process on the same checkpoint: the
prompt, then the decoded new tokens, stopping at <|endoftext|> (which is not printed). The end-to-end
runs are real subprocesses (exit status, stdout, stderr); the checks of argument handling and of edge
cases call nanogpt2.main() in-process, which is the same code without the cost of starting Python.

Two checkpoints: `realistic` (random weights of trained size, so greedy text varies from token to token)
and `steered`, whose weights are set by hand so that greedy decoding follows a fixed map from the last
token to the next, whatever came before: "Hello" -> <|endoftext|>, " world" -> " is" -> " is" ...,
"!" -> the lone byte 0xE2 -> 0xE2 ... (half a UTF-8 character, over and over).
"""

import os
import re
import subprocess
import sys

import pytest
import torch

import nanogpt2

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(n_layer=2, n_embd=32, n_head=2, n_positions=128, vocab_size=50257)  # the real vocabulary
PROMPT = "Hello world, this is GPT-2!"
EOT = nanogpt2.EOT_TOKEN


def cli_env(tmp_path):
    """The environment of a command-line run: the tokenizer cache conftest found, a hub that is never
    reached (a closed port on 127.0.0.1), so a test can never download anything, and one CPU thread per
    run, since several run at once."""
    return {**os.environ, "PYTHONIOENCODING": "utf-8", "NANOGPT2_HUB_URL": "http://127.0.0.1:9",
            "NANOGPT2_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


def run_cli(tmp_path, *arg_lists):
    """Run `python nanogpt2.py ARGS` once per argument list, all at the same time; their CompletedProcesses."""
    procs = [subprocess.Popen([sys.executable, "nanogpt2.py", *args], cwd=REPO_ROOT, env=cli_env(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8")
             for args in arg_lists]
    results = []
    for proc, args in zip(procs, arg_lists):
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append(subprocess.CompletedProcess(args, proc.returncode, stdout, stderr))
    return results


def sample_args(model_dir, device, *extra):
    return ["sample", "--model", str(model_dir), "--device", device.type, "--dtype", "float32", *extra]


def continuation(model, prompt, device, **options):
    """The new tokens generate() gives for one prompt, up to (not including) <|endoftext|>, decoded."""
    ids = torch.tensor([nanogpt2.encode(prompt) or [EOT]], device=device)
    new = model.to(device).generate(ids, **options)[0, ids.size(1):].tolist()
    return nanogpt2.decode(new[: new.index(EOT)] if EOT in new else new)


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    """(directory, model): random weights of the size a trained GPT-2 has (std 0.2, layer norms 1 +- 0.2)."""
    model = nanogpt2.GPT2LMHeadModel(nanogpt2.GPT2Config(**SMALL)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            centre = 1.0 if "ln_" in name and name.endswith("weight") else 0.0
            p.copy_(centre + 0.2 * torch.randn(p.shape, generator=g))
    directory = tmp_path_factory.mktemp("realistic")
    model.save_pretrained(directory)
    return directory, model


def steered_model(**config):
    """Blocks that add nothing and no position embeddings: the logits are ln_f(wte[last token]) @ wte.T, so
    the next token depends only on the last one. Pairs of rows of wte, along directions of mean zero (so
    that ln_f keeps them), set the map: a source row at half the length of its target's points at it."""
    model = nanogpt2.GPT2LMHeadModel(nanogpt2.GPT2Config(**{**SMALL, "n_layer": 1, **config})).eval()
    lone_e2 = next(i for i in range(256) if nanogpt2.get_tokenizer().decode_single_token_bytes(i) == b"\xe2")
    with torch.no_grad():
        for name, p in model.transformer.h.named_parameters():
            if "c_proj" in name:
                p.zero_()  # attention and MLP outputs are zero: every block passes its input through
        model.transformer.wpe.weight.zero_()
        model.transformer.ln_f.weight.fill_(1.0), model.transformer.ln_f.bias.zero_()
        wte = model.transformer.wte.weight
        for axis, (source, target) in enumerate([(nanogpt2.encode("Hello")[-1], EOT),
                                                 (nanogpt2.encode(" world")[-1], nanogpt2.encode(" is")[-1]),
                                                 (nanogpt2.encode("!")[-1], lone_e2)]):
            direction = torch.zeros(SMALL["n_embd"])
            direction[2 * axis], direction[2 * axis + 1] = 1.0, -1.0
            wte[source], wte[target] = 5 * direction, 10 * direction
    return model


@pytest.fixture(scope="module")
def steered(tmp_path_factory):
    directory = tmp_path_factory.mktemp("steered")
    model = steered_model()
    model.save_pretrained(directory)
    return directory, model


def test_steered_model_follows_its_token_map(steered, device):
    """The premise of the edge-case tests below."""
    _, model = steered
    assert continuation(model, "Hello", device, max_new_tokens=5) == ""
    assert continuation(model, "Hello world", device, max_new_tokens=3) == " is is is"
    assert continuation(model, "Hi!", device, max_new_tokens=3) == "\ufffd" * 3


# --- end to end ---------------------------------------------------------------------------------------

SEEDED = ["--temperature", "1.0", "--top-k", "50", "--max-new-tokens", "16", "--seed", "1234"]
BATCH_PROMPTS = ["Once upon a time", PROMPT]  # different lengths: the batch is left-padded


def end_to_end_commands(directory, missing, device):
    greedy = sample_args(directory, device, "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "24")
    return {
        "greedy": greedy,
        "greedy again": greedy,
        "seeded": sample_args(directory, device, "--prompt", PROMPT, *SEEDED),
        "batch": sample_args(directory, device, "--prompt", BATCH_PROMPTS[0], "--prompt", BATCH_PROMPTS[1],
                             "--num-samples", "2", "--temperature", "0", "--max-new-tokens", "12"),
        "missing model": sample_args(missing, device, "--prompt", "Hello"),
    }


@pytest.fixture(scope="module")
def runs(realistic, tmp_path_factory):
    """Every end-to-end run the tests below check, on every device there is, started all at once (they are
    independent, and starting Python and torch is most of their cost): {(device type, name): result}."""
    tmp = tmp_path_factory.mktemp("cli")
    devices = [torch.device("cpu")] + [torch.device("cuda")] * torch.cuda.is_available()
    commands = {(device.type, name): args for device in devices
                for name, args in end_to_end_commands(realistic[0], tmp / "no-such-checkpoint", device).items()}
    return dict(zip(commands, run_cli(tmp, *commands.values())))


def test_greedy_output_is_deterministic_and_equals_generate(realistic, runs, device):
    first, second = runs[device.type, "greedy"], runs[device.type, "greedy again"]
    assert first.returncode == 0, first.stderr
    expected = PROMPT + continuation(realistic[1], PROMPT, device, max_new_tokens=24) + "\n"
    assert len(expected) > len(PROMPT) + 24  # the premise: the continuation is real text, not nothing
    assert first.stdout == expected
    assert second.stdout == first.stdout  # a second process, the same text


def test_sampling_with_a_seed_gives_identical_output_twice(realistic, runs, device, capsys):
    run = runs[device.type, "seeded"]
    assert run.returncode == 0, run.stderr
    assert nanogpt2.main(run.args) == 0  # the same command again, in this process
    assert capsys.readouterr().out == run.stdout
    sampled = {seed: continuation(realistic[1], PROMPT, device, max_new_tokens=16, do_sample=True, temperature=1.0,
                                  top_k=50, generator=torch.Generator(device=device).manual_seed(seed))
               for seed in (1234, 4321)}
    assert run.stdout == PROMPT + sampled[1234] + "\n"
    assert sampled[4321] != sampled[1234]  # and the seed matters


def test_several_prompts_and_samples_print_in_the_batch_format(realistic, runs, device):
    run = runs[device.type, "batch"]
    assert run.returncode == 0, run.stderr
    assert run.stderr == "generating 4 samples in one batch...\n"
    alone = [prompt + continuation(realistic[1], prompt, device, max_new_tokens=12) for prompt in BATCH_PROMPTS]
    expected = "".join(f"--- sample {s} of prompt {p} ---\n{alone[p - 1]}\n"
                       for p in (1, 2) for s in (1, 2))  # each as generated alone: padding changes nothing
    assert run.stdout == expected


def test_missing_model_path_is_a_one_line_error_with_exit_status_2(runs, device):
    run = runs[device.type, "missing model"]
    assert run.returncode == 2
    assert run.stdout == ""
    assert "Traceback" not in run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nanogpt2.py: error:") and "no-such-checkpoint" in lines[0]


# --- in process: help, argument errors, edge cases ---------------------------------------------------

def test_help_exits_0_and_names_the_sample_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        nanogpt2.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage: nanogpt2.py" in out and "sample" in out


def test_sample_help_exits_0_and_describes_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        nanogpt2.main(["sample", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model", "--prompt", "--prompt-file", "--max-new-tokens", "--temperature", "--top-k",
                   "--top-p", "--num-samples", "--seed", "--device", "--dtype", "--compile", "--num-return-sequences",
                   "--num-beams", "--repetition-penalty", "--no-repeat-ngram-size", "--min-new-tokens"):
        assert option in out, option


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
    (["--max-new-tokens", "200"], "exceeds the model's 128 positions"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "--prompt-file /nonexistent/prompt.txt: no such file"),
    (["--repetition-penalty", "0"], r"--repetition-penalty must be > 0 \(1 is none\), got 0.0"),
    (["--min-new-tokens", "5", "--max-new-tokens", "3"], "--min-new-tokens 5 must be at most --max-new-tokens 3"),
    (["--num-beams", "2", "--num-return-sequences", "3"], "--num-return-sequences 3 must be at most --num-beams 2"),
])
def test_a_users_mistake_is_a_one_line_error_with_exit_status_2(steered, device, capsys, extra, message):
    assert nanogpt2.main(sample_args(steered[0], device, "--prompt", "Hello", *extra)) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nanogpt2.py: error:")
    assert re.search(message, lines[0]), lines[0]


def seeded(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


CLI_OPTIONS = {  # the reference's options on the command line: (flags, the same as generate()'s keywords)
    "beams": (["--temperature", "0", "--num-beams", "4", "--num-return-sequences", "2", "--max-new-tokens", "10"],
              dict(num_beams=4, num_return_sequences=2, max_new_tokens=10)),
    "penalties": (["--temperature", "0", "--repetition-penalty", "1.3", "--no-repeat-ngram-size", "2",
                   "--max-new-tokens", "12"], dict(repetition_penalty=1.3, no_repeat_ngram_size=2, max_new_tokens=12)),
    "beam_sampling": (["--temperature", "0.9", "--top-k", "20", "--num-beams", "3", "--seed", "7",
                       "--max-new-tokens", "8"],
                      dict(do_sample=True, temperature=0.9, top_k=20, num_beams=3, max_new_tokens=8, seed=7)),
    "samples": (["--temperature", "1.0", "--top-k", "0", "--num-return-sequences", "3", "--seed", "3",
                 "--no-repeat-ngram-size", "1", "--max-new-tokens", "6"],
                dict(do_sample=True, top_k=0, num_return_sequences=3, no_repeat_ngram_size=1, max_new_tokens=6,
                     seed=3)),
}


@pytest.mark.parametrize("case", CLI_OPTIONS)
def test_the_references_options_print_what_generate_gives(realistic, device, capsys, case):
    """--num-beams, --num-return-sequences, --repetition-penalty, --no-repeat-ngram-size (and sampling with a
    seed): the text printed is generate()'s with the same options, each sequence as the batch format prints it
    (one sequence alone is streamed)."""
    directory, model = realistic
    flags, options = CLI_OPTIONS[case]
    options = dict(options)
    if "seed" in options:
        options["generator"] = seeded(device, options.pop("seed"))
    ids = torch.tensor([nanogpt2.encode(PROMPT)], device=device)
    tokens = model.to(device).generate(ids, **options)
    texts = []
    for row in tokens[:, ids.size(1):].tolist():
        texts.append(PROMPT + nanogpt2.decode(row[: row.index(EOT)] if EOT in row else row))
    if len(texts) == 1:
        expected = texts[0] + "\n"
    else:
        expected = "".join(f"--- sample {i + 1} of prompt 1 ---\n{text}\n" for i, text in enumerate(texts))
    assert len(set(texts)) == len(texts)  # the premise: distinct sequences, so the order is tested too
    assert nanogpt2.main(sample_args(directory, device, "--prompt", PROMPT, *flags)) == 0
    assert capsys.readouterr().out == expected


def test_min_new_tokens_holds_endoftext_back(steered, device, capsys):
    """The steered model ends "Hello" at once (test_output_stops_at_endoftext_without_printing_it); with
    --min-new-tokens 3 it writes at least three tokens first, as generate(min_new_tokens=3) does."""
    _, model = steered
    args = sample_args(steered[0], device, "--prompt", "Hello", "--temperature", "0", "--max-new-tokens", "5",
                       "--min-new-tokens", "3")
    assert nanogpt2.main(args) == 0
    expected = continuation(model, "Hello", device, max_new_tokens=5, min_new_tokens=3)
    assert len(nanogpt2.encode(expected)) >= 3
    assert capsys.readouterr().out == "Hello" + expected + "\n"


def test_output_stops_at_endoftext_without_printing_it(steered, device, capsys):
    assert nanogpt2.main(sample_args(steered[0], device, "--prompt", "Hello", "--temperature", "0")) == 0
    assert capsys.readouterr().out == "Hello\n"


def test_a_prompt_file_is_continued_like_the_same_prompt(steered, tmp_path, device, capsys):
    (tmp_path / "prompt.txt").write_text("Hello world", encoding="utf-8")
    args = sample_args(steered[0], device, "--prompt-file", str(tmp_path / "prompt.txt"), "--temperature", "0",
                       "--max-new-tokens", "2")
    assert nanogpt2.main(args) == 0
    assert capsys.readouterr().out == "Hello world is is\n"


def test_batch_output_drops_endoftext_and_what_follows_it(steered, device, capsys):
    args = sample_args(steered[0], device, "--prompt", "Hello", "--prompt", " world", "--temperature", "0",
                       "--max-new-tokens", "3")
    assert nanogpt2.main(args) == 0
    assert capsys.readouterr().out == ("--- sample 1 of prompt 1 ---\nHello\n"
                                       "--- sample 1 of prompt 2 ---\n world is is is\n")


def test_batch_output_drops_padding_after_endoftext_whatever_the_pad_token(tmp_path, device, capsys):
    steered_model(pad_token_id=0).save_pretrained(tmp_path)
    args = sample_args(tmp_path, device, "--prompt", "Hello", "--prompt", " world", "--temperature", "0",
                       "--max-new-tokens", "3")
    assert nanogpt2.main(args) == 0
    assert capsys.readouterr().out == ("--- sample 1 of prompt 1 ---\nHello\n"
                                       "--- sample 1 of prompt 2 ---\n world is is is\n")


def test_streamed_output_equals_decode_even_when_it_ends_mid_character(steered, device, capsys):
    _, model = steered
    args = sample_args(steered[0], device, "--prompt", "Hi!", "--temperature", "0", "--max-new-tokens", "3")
    assert nanogpt2.main(args) == 0
    assert capsys.readouterr().out == "Hi!" + continuation(model, "Hi!", device, max_new_tokens=3) + "\n"


def test_an_unreadable_checkpoint_is_a_one_line_error(steered, tmp_path, device, capsys):
    (tmp_path / "config.json").write_bytes((steered[0] / "config.json").read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert nanogpt2.main(sample_args(tmp_path, device, "--prompt", "Hello")) == 2
    assert capsys.readouterr().err.startswith("nanogpt2.py: error:")


def test_a_character_level_model_samples_with_its_own_vocabulary(tmp_path, device, capsys):
    # A model trained by `train` on characters keeps its vocabulary in config.json; sample must encode the
    # prompt and decode the answer with it (GPT-2's BPE would give other ids, or fail), stop at its own
    # end token, and fit its short context without being told --max-new-tokens.
    chars = nanogpt2.ADDITION_VOCAB
    eos = chars.index("\n")
    config = nanogpt2.GPT2Config(vocab_size=len(chars), n_positions=10, n_embd=16, n_layer=1, n_head=2,
                                 bos_token_id=eos, eos_token_id=eos, extra={"char_vocab": chars})
    torch.manual_seed(0)
    nanogpt2.GPT2LMHeadModel(config).save_pretrained(tmp_path / "adder")
    model = nanogpt2.GPT2LMHeadModel.from_pretrained(tmp_path / "adder", device=device)
    ids = torch.tensor([[chars.index(c) for c in "12+34="]], device=device)
    new = model.generate(ids, max_new_tokens=4)[0, 6:].tolist()
    expected = "".join(chars[t] for t in (new[:new.index(eos)] if eos in new else new))
    status = nanogpt2.main(["sample", "--model", str(tmp_path / "adder"), "--prompt", "12+34=",
                            "--temperature", "0", "--device", str(device)])
    assert status == 0
    assert capsys.readouterr().out == "12+34=" + expected + "\n"


def save_tiny_adder(directory):
    """A one-layer character-level model of the adder's vocabulary, saved: enough for the command line's paths."""
    chars = nanogpt2.ADDITION_VOCAB
    eos = chars.index("\n")
    config = nanogpt2.GPT2Config(vocab_size=len(chars), n_positions=12, n_embd=16, n_layer=1, n_head=2,
                                 bos_token_id=eos, eos_token_id=eos, extra={"char_vocab": chars})
    torch.manual_seed(1)
    nanogpt2.GPT2LMHeadModel(config).save_pretrained(directory)


def test_sample_compile_streams_the_same_text(tmp_path, capsys, monkeypatch):
    # --compile reaches generate(compile=True): the decoding step runs with fixed shapes (here uncompiled, to
    # keep the suite fast; tests/test_compiled_decoding.py compiles it) and the streamed text is unchanged.
    save_tiny_adder(tmp_path / "adder")
    steps = []
    monkeypatch.setattr(nanogpt2, "compiled_decode_step",
                        lambda model: lambda *args: steps.append(1) or nanogpt2.decode_one_token(*args))
    args = ["sample", "--model", str(tmp_path / "adder"), "--prompt", "12+34=", "--temperature", "0",
            "--device", "cpu", "--max-new-tokens", "5"]
    assert nanogpt2.main(args) == 0
    plain = capsys.readouterr()
    assert not steps
    assert nanogpt2.main(args + ["--compile"]) == 0
    compiled = capsys.readouterr()
    assert steps, "--compile must decode through the compiled step"
    assert compiled.out == plain.out
    assert "compiling the decoding step" in compiled.err


def test_sample_into_a_closed_pipe_stops_quietly(tmp_path, capsys, monkeypatch):
    # `python nanogpt2.py sample ... | head -c 1`: once head exits, writes to stdout fail with BrokenPipeError.
    # That is the reader's choice, not an error: exit status 0, no message, no traceback at exit.
    save_tiny_adder(tmp_path / "adder")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte
    stdout = open(write_end, "w", encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", stdout)
    status = nanogpt2.main(["sample", "--model", str(tmp_path / "adder"), "--prompt", "12+34=", "--temperature", "0",
                            "--device", "cpu", "--max-new-tokens", "5"])
    stdout.write("more")
    stdout.flush()  # what the interpreter's exit does: it must not fail either
    monkeypatch.undo()
    assert status == 0
    assert capsys.readouterr().err == ""
