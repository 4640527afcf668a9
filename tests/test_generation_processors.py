"""The logits processors behind generate()'s repetition_penalty, no_repeat_ngram_size, bad_words_ids and
min_length / min_new_tokens, in both files: each as a property, for any model, prompt and decoding (greedy,
sampling, beam search), and each function against a plain-Python statement of what it does. Then the bad
inputs generate() refuses before any work, and generation_config.json both ways with transformers.

    processors        repetition_penalty, no_repeat_ngram, ban_bad_words, forbid_eos: against loops over
                      Python lists (the oracle), for random scores and token rows (repeated ids, and ids the
                      head has no column for, such as ImageGPT's SOS)
    generation        no n-gram twice; no bad word; no eos before the minimum; each step's processed scores are
                      the full forward's logits through the oracle, with the tokens generated so far
    bad input         one ValueError or TypeError naming the argument and its value, before any forward
    files             generation_config.json written by save_pretrained is what transformers reads, and one
                      transformers writes sets our defaults (and gives its tokens)
"""

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import imagegpt
import nanogpt2
import test_imagegpt as igpt_props
import test_properties as gpt2_props
from helpers import examples

MODULES = {"nanogpt2": nanogpt2, "imagegpt": imagegpt}
STRATEGIES = {"greedy": {}, "sampling": dict(do_sample=True, top_k=0), "beams": dict(num_beams=3)}


def strategy_options(data, strategy, device):
    """generate()'s keywords for a decoding strategy; sampling draws from a generator seeded by the example, so
    that an example fails or passes whatever ran before (torch's global generator is not the test's)."""
    options = dict(STRATEGIES[strategy])
    if options.get("do_sample"):
        seed = data.draw(st.integers(0, 2**31 - 1), label="sampling seed")
        options["generator"] = torch.Generator(device=device).manual_seed(seed)
    return options


# --- helpers -----------------------------------------------------------------------------------------------


def draw_model(data, name, device):
    """A small model with sharpened weights (test_properties.py's and test_imagegpt.py's), either file."""
    module, props = (nanogpt2, gpt2_props) if name == "nanogpt2" else (imagegpt, igpt_props)
    head = nanogpt2.GPT2LMHeadModel if name == "nanogpt2" else imagegpt.ImageGPTForCausalImageModeling
    config = data.draw(props.configs(add_cross_attention=False), label="config")
    return props.build(head, config, device, data.draw(props.seeds, label="weights"))


def draw_prompts(data, model, device, max_batch=3, max_len=5):
    """(input_ids (B, T), attention_mask (B, T)): random tokens, left-padded, each ImageGPT row starting with SOS."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="prompt seed"))
    B, T = data.draw(st.integers(1, max_batch), label="B"), data.draw(st.integers(1, max_len), label="T")
    scored = model.lm_head.weight.size(0)
    ids = torch.randint(0, scored, (B, T), generator=g)
    mask = gpt2_props.random_left_padding_mask(g, (B, T)) if data.draw(st.booleans(), label="padded") \
        else torch.ones(B, T, dtype=torch.long)
    if isinstance(model, imagegpt.ImageGPTForCausalImageModeling):  # SOS first (after the padding)
        ids[torch.arange(B), (mask == 0).sum(-1)] = model.config.sos_token_id
    return ids.to(device), mask.to(device)


def penalised(score: float, penalty: float) -> float:
    return score * penalty if score < 0 else score / penalty


def oracle_repetition_penalty(ids, scores, penalty):
    out = scores.tolist()
    for b, row in enumerate(ids.tolist()):
        for token in set(row):
            if token < scores.size(-1):
                out[b][token] = penalised(out[b][token], penalty)
    return torch.tensor(out, dtype=scores.dtype)


def oracle_no_repeat_ngram(ids, scores, n):
    out = scores.tolist()
    for b, row in enumerate(ids.tolist()):
        start = row[len(row) - n + 1:] if n > 1 else []  # the n - 1 tokens the next n-gram starts with
        for i in range(len(row) - n + 1):
            if row[i:i + n - 1] == start and row[i + n - 1] < scores.size(-1):
                out[b][row[i + n - 1]] = -math.inf
    return torch.tensor(out, dtype=scores.dtype)


def oracle_bad_words(ids, scores, words):
    out = scores.tolist()
    for b, row in enumerate(ids.tolist()):
        for word in words:
            if len(word) <= len(row) and (len(word) == 1 or row[len(row) - len(word) + 1:] == word[:-1]):
                out[b][word[-1]] = -math.inf
    return torch.tensor(out, dtype=scores.dtype)


def oracle_forbid_eos(ids, scores, min_length, eos):
    out = scores.tolist()
    if ids.size(1) < min_length:
        for row in out:
            for token in eos:
                if token < scores.size(-1):
                    row[token] = -math.inf
    return torch.tensor(out, dtype=scores.dtype)


@st.composite
def token_rows(draw, max_vocab=12):
    """(ids (B, L), scores (B, V)): few distinct tokens, so that rows repeat tokens and n-grams; some ids >= V
    (tokens the head has no column for, as ImageGPT's SOS); scores of both signs and exact zeros."""
    V = draw(st.integers(2, max_vocab), label="V")
    B, L = draw(st.integers(1, 3), label="B"), draw(st.integers(1, 10), label="L")
    ids = torch.tensor(draw(st.lists(st.lists(st.integers(0, V + 1), min_size=L, max_size=L), min_size=B,
                                     max_size=B), label="ids"))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1), label="scores seed"))
    scores = torch.randn(B, V, generator=g) * 3
    scores[torch.rand(B, V, generator=g) < 0.1] = 0.0
    return ids, scores


# --- each processor against its plain statement ----------------------------------------------------------


@pytest.mark.parametrize("name", MODULES)
@examples(50)
@given(case=token_rows(), penalty=st.floats(0.1, 5.0))
def test_repetition_penalty_moves_each_token_of_the_row_once(name, case, penalty):
    """Every token of a row, however often it occurs, has its score divided by the penalty if positive,
    multiplied if negative; the others keep theirs. So the result depends on the set of tokens alone: the row
    shuffled and with its tokens repeated gives the same."""
    ids, scores = case
    module = MODULES[name]
    got = module.repetition_penalty(ids, scores, penalty)
    torch.testing.assert_close(got, oracle_repetition_penalty(ids, scores, penalty), rtol=1e-6, atol=0)
    shuffled = torch.cat([ids, ids.flip(1)], dim=1)[:, torch.randperm(2 * ids.size(1))]
    torch.testing.assert_close(module.repetition_penalty(shuffled, scores, penalty), got, rtol=0, atol=0,
                               msg="the scores for the row shuffled, each token repeated")
    assert torch.equal(scores, case[1]), "the input scores were modified"


@pytest.mark.parametrize("name", MODULES)
@examples(50)
@given(case=token_rows(max_vocab=5), n=st.integers(1, 4))
def test_no_repeat_ngram_forbids_exactly_the_tokens_that_repeat_an_ngram(name, case, n):
    ids, scores = case
    got = MODULES[name].no_repeat_ngram(ids, scores, n)
    torch.testing.assert_close(got, oracle_no_repeat_ngram(ids, scores, n), rtol=0, atol=0,
                               msg="no_repeat_ngram's scores (-inf: forbidden)")


@pytest.mark.parametrize("name", MODULES)
@examples(50)
@given(case=token_rows(max_vocab=5), data=st.data())
def test_bad_words_forbid_the_tokens_that_would_complete_a_word(name, case, data):
    ids, scores = case
    V = scores.size(-1)
    words = data.draw(st.lists(st.lists(st.integers(0, V - 1), min_size=1, max_size=4), min_size=1, max_size=4),
                      label="bad words")
    got = MODULES[name].ban_bad_words(ids, scores, words)
    torch.testing.assert_close(got, oracle_bad_words(ids, scores, words), rtol=0, atol=0,
                               msg="ban_bad_words' scores (-inf: forbidden)")


@pytest.mark.parametrize("name", MODULES)
@examples(50)
@given(case=token_rows(), data=st.data())
def test_forbid_eos_until_the_minimum_length(name, case, data):
    ids, scores = case
    eos = tuple(data.draw(st.lists(st.integers(0, scores.size(-1) + 1), min_size=1, max_size=3), label="eos"))
    min_length = max(0, ids.size(1) + data.draw(st.integers(-3, 3), label="min_length - L"))  # near the edge
    got = MODULES[name].forbid_eos(ids, scores, min_length, eos)
    torch.testing.assert_close(got, oracle_forbid_eos(ids, scores, min_length, eos), rtol=0, atol=0,
                               msg="forbid_eos' scores (-inf: forbidden)")


# --- generation ------------------------------------------------------------------------------------------


def ngrams_end_to_end(row, n, T):
    """(i, j): positions where the n-gram ending at generated position j (>= T) already ended at i < j."""
    seen = {}
    for end in range(n - 1, len(row)):
        gram = tuple(row[end - n + 1:end + 1])
        if gram in seen and end >= T:
            return seen[gram], end
        seen.setdefault(gram, end)
    return None


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("strategy", STRATEGIES)
@examples(20)
@given(data=st.data())
def test_with_no_repeat_ngram_size_no_ngram_occurs_twice(name, strategy, device, data):
    """For any model and prompt: no n-gram that ends in a generated token occurs earlier in the row (prompt and
    padding included, as the reference counts them)."""
    model = draw_model(data, name, device)
    ids, mask = draw_prompts(data, model, device)
    n = data.draw(st.integers(1, 3), label="n")
    new = min(8, model.lm_head.weight.size(0) - ids.size(1) - 1)  # n = 1 runs out of tokens after V of them
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, no_repeat_ngram_size=n, stop_at_eos=False,
                         **strategy_options(data, strategy, device))
    for b, row in enumerate(out.tolist()):
        repeat = ngrams_end_to_end(row, n, ids.size(1))
        assert repeat is None, f"row {b} {row}: the {n}-gram ending at {repeat[1]} already ended at {repeat[0]}"


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("which", ["min_new_tokens", "min_length"])
@examples(20)
@given(data=st.data())
def test_with_a_minimum_length_eos_never_comes_before_it(name, strategy, which, device, data):
    """For any model and prompt: with min_new_tokens=m (or min_length=T + m), no row holds an eos token among
    its first m new tokens. eos is the token greedy decoding would emit first in row 0, so that without the
    minimum it would end that row at once."""
    model = draw_model(data, name, device)
    ids, mask = draw_prompts(data, model, device)
    T = ids.size(1)
    first = int(model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=1, stop_at_eos=False)[0, -1])
    eos = [first] + data.draw(st.lists(st.integers(0, model.lm_head.weight.size(0) - 1), max_size=1), label="eos")
    m = data.draw(st.integers(1, 6), label="m")
    minimum = dict(min_new_tokens=m) if which == "min_new_tokens" else dict(min_length=T + m)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=eos[0],
                         **minimum, **strategy_options(data, strategy, device))
    for b, row in enumerate(out[:, T:].tolist()):
        early = [t for t in row[:m] if t in eos]
        assert not early, f"row {b} {row}: eos {eos} among its first {m} new tokens"
    if strategy == "greedy" and ids.size(0) == 1:
        assert out.size(1) >= T + m  # and without the minimum, row 0 would have ended after one token


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("strategy", STRATEGIES)
@examples(20)
@given(data=st.data())
def test_with_bad_words_no_bad_word_is_ever_completed(name, strategy, device, data):
    """For any model and prompt: no bad word ends in a generated token. The words are drawn from what the
    model generates without them, so that the ban has work to do. (As the reference, a word is checked only once
    the row is at least as long as the word: with exactly len(word) - 1 tokens it can still be completed.)"""
    model = draw_model(data, name, device)
    ids, mask = draw_prompts(data, model, device)
    T = ids.size(1)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=6, stop_at_eos=False,
                          **strategy_options(data, strategy, device))
    row = free[0].tolist()
    starts = data.draw(st.lists(st.integers(max(0, T - 2), len(row) - 1), min_size=1, max_size=3), label="starts")
    words = [row[s:s + data.draw(st.integers(1, 3), label="word length")] for s in starts]
    words = [w for w in words if max(w) < model.lm_head.weight.size(0)] or [[row[-1]]]  # (not ImageGPT's SOS)
    eos = model.generation_config.eos_token_id  # the reference never bans eos alone as a bad word
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, stop_at_eos=False, bad_words_ids=words,
                         **strategy_options(data, strategy, device))
    for b, tokens in enumerate(out.tolist()):
        for word in (w for w in words if w != [eos]):
            for end in range(max(T, len(word)), len(tokens)):
                assert tokens[end - len(word) + 1:end + 1] != word, f"row {b} {tokens} completes {word} at {end}"


@pytest.mark.parametrize("name", MODULES)
@examples(20)
@given(data=st.data())
def test_each_steps_scores_are_the_logits_through_the_processors_with_the_tokens_so_far(name, device, data):
    """generate(output_scores=True) with every processor of the four: each step's scores equal one full forward's
    logits over the final sequence (no cache), at the position before the step's token, put through the
    oracles in the reference's order with that row's tokens up to there, prompt and padding included."""
    model = draw_model(data, name, device)
    ids, mask = draw_prompts(data, model, device)
    T, new = ids.size(1), 6
    scored = model.lm_head.weight.size(0)
    penalty = data.draw(st.floats(0.5, 3.0), label="penalty")
    n = data.draw(st.integers(2, 3), label="n")
    words = data.draw(st.lists(st.lists(st.integers(0, scored - 1), min_size=1, max_size=2), min_size=1,
                               max_size=3), label="bad words")
    eos = data.draw(st.integers(0, scored - 1), label="eos")
    m = data.draw(st.integers(0, new), label="min_new_tokens")
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, repetition_penalty=penalty,
                         no_repeat_ngram_size=n, bad_words_ids=words, eos_token_id=eos, min_new_tokens=m,
                         stop_at_eos=False, output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences
    full_mask = torch.cat([mask, torch.ones(mask.size(0), new, dtype=mask.dtype, device=device)], dim=1)
    positions = gpt2_props.positions_from_mask(full_mask)
    with torch.no_grad():
        logits = model(tokens, attention_mask=full_mask, position_ids=positions).logits.float()
    words = [w for w in words if w != [eos]]  # the reference never bans eos itself as a bad word
    for step, scores in enumerate(out.scores):
        so_far = tokens[:, :T + step].cpu()
        expected = logits[:, T + step - 1].cpu()
        expected = oracle_repetition_penalty(so_far, expected, penalty)
        expected = oracle_no_repeat_ngram(so_far, expected, n)
        expected = oracle_bad_words(so_far, expected, words)
        expected = oracle_forbid_eos(so_far, expected, T + m, (eos,))
        torch.testing.assert_close(scores.cpu(), expected, atol=1e-4, rtol=1e-4, msg=lambda e: f"step {step}: {e}")


# --- bad input: one clear error, before any work -----------------------------------------------------------


def no_work_allowed(model):
    """The token embedding lookup fails loudly: an error raised only after work began shows as this one."""
    def hook(module, args):
        raise AssertionError("the forward pass started: the bad input was not caught before any work")
    return model.transformer.wte.register_forward_pre_hook(hook)


BAD = [  # (generate's keywords, the error, its message); the prompt is 3 tokens, n_positions 16, max_new_tokens 2
    # unless the keywords say otherwise (the default max_length 20 is too long for n_positions 16)
    (dict(repetition_penalty=0.0), ValueError, r"repetition_penalty must be > 0 and finite, got 0.0"),
    (dict(repetition_penalty=-1.2), ValueError, r"repetition_penalty must be > 0 and finite, got -1.2"),
    (dict(repetition_penalty=math.nan), ValueError, r"repetition_penalty must be > 0 and finite, got nan"),
    (dict(no_repeat_ngram_size=-1), ValueError, r"no_repeat_ngram_size must be a non-negative integer, got -1"),
    (dict(no_repeat_ngram_size=2.5), ValueError, r"no_repeat_ngram_size must be a non-negative integer, got 2.5"),
    (dict(num_beams=2, num_return_sequences=3), ValueError,
     r"num_return_sequences \(3\) must be at most num_beams \(2\)"),
    (dict(num_return_sequences=2), ValueError, r"num_return_sequences=2 with greedy decoding"),
    (dict(num_return_sequences=0, do_sample=True), ValueError, r"num_return_sequences must be a positive integer"),
    (dict(max_new_tokens=4, min_new_tokens=5), ValueError,
     r"min_new_tokens=5 \(\+ 3 prompt\) asks for 8 tokens, more than the maximum 7"),
    (dict(max_length=6, min_length=7), ValueError, r"min_length=7 asks for 7 tokens, more than the maximum 6"),
    (dict(max_length=3), ValueError, r"max_length=3 counts the prompt, which is already 3 tokens"),
    (dict(max_length=2), ValueError, r"max_length=2 counts the prompt"),
    (dict(max_length=18), ValueError, r"max_length \(18, the prompt included\) = 18 exceeds n_positions \+ 1 = 17"),
    (dict(max_new_tokens=None), ValueError, r"max_length \(20, the prompt included\) = 20 exceeds n_positions \+ 1"),
    (dict(max_length=0), ValueError, r"max_length must be a positive integer, got 0"),
    (dict(min_length=-1), ValueError, r"min_length must be a non-negative integer, got -1"),
    (dict(min_new_tokens=-2), ValueError, r"min_new_tokens must be a non-negative integer, got -2"),
    (dict(early_stopping="sometimes", num_beams=2), ValueError,
     r"early_stopping must be True, False or \"never\", got 'sometimes'"),
    (dict(do_sample="yes"), ValueError, r"do_sample must be True or False, got 'yes'"),
    (dict(bad_words_ids=[1, 2]), ValueError, r"bad_words_ids must be None or a non-empty list of non-empty lists"),
    (dict(bad_words_ids=[[]]), ValueError, r"bad_words_ids must be"),
    (dict(bad_words_ids=[[1, 99]]), ValueError, r"bad_words_ids must be .* token ids in \[0, \d+\), got \[\[1, 99\]\]"),
    (dict(eos_token_id=-1), ValueError, r"eos_token_id must be None, a token id or a non-empty list"),
    (dict(eos_token_id=[]), ValueError, r"eos_token_id must be"),
    (dict(pad_token_id=1.5), ValueError, r"pad_token_id must be None or a token id \(an integer >= 0\), got 1.5"),
    (dict(do_sample=True, top_k=-1), ValueError, r"top_k must be a non-negative integer, got -1"),
    (dict(num_beams=2, length_penalty=math.inf), ValueError, r"length_penalty must be a finite number, got inf"),
    (dict(num_beams=2, on_token=print), ValueError, r"on_token streams one token per row.*num_beams=1"),
    (dict(max_new_tokens=2, bogus=1), TypeError, r"generate\(\) got an unexpected keyword argument 'bogus'"),
    (dict(max_new_tokens=2, typical_p=0.9), TypeError, r"generate\(\) does not implement the reference's typical_p"),
    (dict(generation_config={"max_length": 5}), TypeError, r"generation_config must be a GenerationConfig, got dict"),
    (dict(num_beams=2, compile=True), ValueError, r"not beam search"),
]


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("kwargs, error, message", BAD, ids=[m[:40] for _, _, m in BAD])
def test_bad_generate_arguments_are_one_clear_error_before_any_work(name, kwargs, error, message, device):
    model = tiny(name, device)
    no_work_allowed(model)
    prompt = torch.tensor([[1, 2, 3]] if name == "nanogpt2" else [[8, 1, 2]], device=device)
    if "max_length" not in kwargs:  # else the default max_length=20 is too long for n_positions=16
        kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(error, match=message):
        model.generate(prompt, **kwargs)


def tiny(name, device, **overrides):
    if name == "nanogpt2":
        config = nanogpt2.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=11, n_positions=16,
                                     bos_token_id=0, eos_token_id=0, **overrides)
        return gpt2_props.build(nanogpt2.GPT2LMHeadModel, config, device, 0)
    config = imagegpt.ImageGPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=9, n_positions=16, **overrides)
    model = igpt_props.build(imagegpt.ImageGPTForCausalImageModeling, config, device, 0)
    model.generation_config.max_length = 20  # the reference's default, for the length errors above
    return model


@pytest.mark.parametrize("name", MODULES)
def test_a_generation_config_file_with_an_option_not_implemented_is_refused(name, tmp_path, device):
    """generation_config.json may set the reference's other decoding options (typical_p, ...): decoding without
    them would give other tokens than the reference, so generate() refuses, naming it; at its neutral value it
    is harmless. A field of the wrong type is refused when the folder loads, naming the file."""
    model = tiny(name, torch.device("cpu"))
    model.save_pretrained(tmp_path)
    path = tmp_path / "generation_config.json"
    written = json.loads(path.read_text())
    cls = type(model)
    for value, refused in ((1.0, False), (0.9, True)):
        path.write_text(json.dumps({**written, "typical_p": value, "transformers_version": "4.46.3"}))
        loaded = cls.from_pretrained(tmp_path, device=device)
        prompt = torch.tensor([[1, 2, 3]] if name == "nanogpt2" else [[8, 1, 2]], device=device)
        if refused:
            with pytest.raises(ValueError, match=r"sets typical_p=0.9, which this generate\(\) does not implement"):
                loaded.generate(prompt, max_new_tokens=2)
        else:
            assert loaded.generate(prompt, max_new_tokens=2).shape == (1, 5)
            assert loaded.generation_config.extra["transformers_version"] == "4.46.3"
    path.write_text(json.dumps({**written, "num_beams": "four"}))
    with pytest.raises(nanogpt2.CheckpointError if name == "nanogpt2" else imagegpt.CheckpointError,
                       match=r"generation_config.json: num_beams must be a positive integer, got 'four'"):
        cls.from_pretrained(tmp_path)


# --- generation_config.json and transformers ----------------------------------------------------------------



@pytest.mark.parametrize("name", MODULES)
def test_generation_config_json_goes_both_ways_with_transformers(name, tmp_path, device):
    """save_pretrained writes generation_config.json with the reference's names: transformers reads the same
    defaults (ImageGPT's: start from SOS, complete the image). A file transformers writes (do_sample, num_beams,
    no_repeat_ngram_size, max_new_tokens, ...) sets ours, and generate() without arguments then gives
    transformers' tokens."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    model = tiny(name, torch.device("cpu"))
    model.generation_config = type(model.generation_config).from_model_config(
        model.config, **({} if name == "nanogpt2" else dict(bos_token_id=8, max_length=17)))
    model.save_pretrained(tmp_path / "ours")
    theirs = transformers.GenerationConfig.from_pretrained(tmp_path / "ours")
    for field, value in model.generation_config.to_dict().items():
        assert getattr(theirs, field) == value, field
    hf_class = transformers.GPT2LMHeadModel if name == "nanogpt2" else transformers.ImageGPTForCausalImageModeling
    hf = hf_class.from_pretrained(tmp_path / "ours").eval()
    assert hf.generation_config.max_length == model.generation_config.max_length
    hf.generation_config = transformers.GenerationConfig(
        **{**model.generation_config.to_dict(), "num_beams": 3, "no_repeat_ngram_size": 2, "max_new_tokens": 7,
           "length_penalty": 0.8, "num_return_sequences": 2})
    hf.save_pretrained(tmp_path / "theirs")
    ours = type(model).from_pretrained(tmp_path / "theirs", device=device)
    assert (ours.generation_config.num_beams, ours.generation_config.num_return_sequences) == (3, 2)
    prompt = torch.tensor([[1, 2, 3]] if name == "nanogpt2" else [[8, 1, 2]])
    with torch.no_grad():
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt))
    assert torch.equal(ours.generate(prompt.to(device)).cpu(), expected)
