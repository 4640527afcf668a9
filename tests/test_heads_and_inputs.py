"""Tests of what goes into and comes out of nanogpt2.py's models.

    heads               each head's loss equals the same loss computed by hand, token by token
    sampling filters    top-k and top-p keep exactly the tokens they should; sampling never leaves them
    generation          batched left-padded generation equals one prompt at a time; greedy with the cache
                        picks the argmax of a full forward; eos stops a row; seeds reproduce
    bad inputs          each gives a clear error (the name, the numbers) before any work
    config              validation, and the config.json round trip
"""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import assume, example, given
from hypothesis import strategies as st

import nanogpt2
from nanogpt2 import (
    Conv1D,
    GPT2Config,
    GPT2DoubleHeadsModel,
    GPT2ForQuestionAnswering,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    GPT2Model,
)
from helpers import examples, first_difference

# The hand computations below sum in another order than PyTorch's fused losses: fp32 rounding only.
FP32_TOL = 1e-5


# --- helpers ---------------------------------------------------------------------------------------


def tiny_config(**overrides):
    """Two layers, width 16, vocabulary 64, dropout off; eos/bos inside the small vocabulary."""
    kwargs = dict(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0, summary_first_dropout=0.0, classifier_dropout=0.0, bos_token_id=63,
                  eos_token_id=63)
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


@st.composite
def configs(draw, **fixed):
    n_head = draw(st.sampled_from([1, 2, 4]))
    kwargs = dict(vocab_size=draw(st.integers(50, 100)), n_embd=draw(st.sampled_from([8, 16, 32])),
                  n_layer=draw(st.integers(1, 3)), n_head=n_head)
    kwargs.update(fixed)
    return tiny_config(**kwargs)


seeds = st.integers(0, 2**31 - 1)


def sharpen(model, seed):
    """Re-draw the weights much larger than GPT-2's N(0, 0.02) init, so that logits differ by whole units:
    a loss or a sampled token that is wrong then shows, and greedy argmaxes have no near-ties. Matrices get
    std 1/sqrt(fan_in) (activations of unit scale), embeddings std 1, biases and layer norms visible offsets
    (as in test_properties.py, where the choice is explained)."""
    g = torch.Generator().manual_seed(seed)
    done = set()  # tied weights are drawn once

    def normal(p, std, mean=0.0):
        if id(p) not in done:
            done.add(id(p))
            p.copy_(mean + std * torch.randn(p.shape, generator=g))

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                normal(module.weight, 1.0)
            elif isinstance(module, (Conv1D, nn.Linear)):
                fan_in = module.weight.shape[0] if isinstance(module, Conv1D) else module.weight.shape[1]
                normal(module.weight, 1.0 / math.sqrt(fan_in))
                if module.bias is not None:
                    normal(module.bias, 0.2)
            elif isinstance(module, nn.LayerNorm):
                normal(module.weight, 0.2, mean=1.0)
                normal(module.bias, 0.2)
    return model


def build(model_class, config, device, seed=0):
    return sharpen(model_class(config), seed).to(device).eval()


def random_ids(g, vocab_size, shape):
    return torch.randint(0, vocab_size, tuple(shape), generator=g)


def assert_close(actual, expected, tol, why):
    """|actual - expected| <= tol * max(1, |expected|), elementwise maximum: a tolerance relative to scale."""
    actual = torch.as_tensor(actual).detach().float().cpu()
    expected = torch.as_tensor(expected).detach().float().cpu()
    assert actual.shape == expected.shape, \
        f"{why}: shapes differ: got {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale, \
        f"{why}: max difference {err:.3g} > {tol:g} x scale {scale:.3g}" + \
        first_difference(actual, expected, tol * scale)


def nll(logits, target):
    """-log softmax(logits)[target] for one row of logits: log-sum-exp minus the target's logit, in float64."""
    logits = logits.double()
    return (torch.logsumexp(logits, 0) - logits[int(target)]).item()


# --- each head's loss, by hand -----------------------------------------------------------------------


@examples(20)
@given(config=configs(), seed=seeds)
def test_lm_loss_equals_hand_computation(device, config, seed):
    """Position t predicts token t + 1; labels of -100 are skipped; the loss is the mean over the rest."""
    model = build(GPT2LMHeadModel, config, device, seed)
    g = torch.Generator().manual_seed(seed)
    ids = random_ids(g, config.vocab_size, (2, 7))
    labels = ids.clone()
    labels[torch.rand(2, 7, generator=g) < 0.3] = -100
    labels[0, 1] = ids[0, 1]  # at least one counted label
    out = model(ids.to(device), labels=labels.to(device))

    terms = [nll(out.logits[b, t], labels[b, t + 1]) for b in range(2) for t in range(6) if labels[b, t + 1] != -100]
    assert_close(out.loss, sum(terms) / len(terms), FP32_TOL, "mean next-token cross-entropy")


@examples(10)
@given(config=configs(), seed=seeds)
def test_double_heads_losses_equal_hand_computation(device, config, seed):
    """mc_logits[b, c] is the summary layer applied to choice c's hidden state at mc_token_ids[b, c]; mc_loss is
    the cross-entropy over choices; the LM loss runs over every choice's tokens."""
    model = build(GPT2DoubleHeadsModel, config, device, seed)
    g = torch.Generator().manual_seed(seed)
    B, n_choices, T = 2, 3, 5
    ids = random_ids(g, config.vocab_size, (B, n_choices, T))
    mc_token_ids = torch.randint(0, T, (B, n_choices), generator=g)
    mc_labels = torch.randint(0, n_choices, (B,), generator=g)
    out = model(ids.to(device), mc_token_ids=mc_token_ids.to(device), labels=ids.to(device),
                mc_labels=mc_labels.to(device), output_hidden_states=True)

    hidden = out.hidden_states[-1]  # (B, n_choices, T, C), after ln_f
    summary = model.multiple_choice_head.summary  # Linear(C, 1)
    for b in range(B):
        for c in range(n_choices):
            expected = hidden[b, c, mc_token_ids[b, c]] @ summary.weight[0] + summary.bias[0]
            assert_close(out.mc_logits[b, c], expected, FP32_TOL, f"mc_logits[{b}, {c}]")
    mc_terms = [nll(out.mc_logits[b], mc_labels[b]) for b in range(B)]
    assert_close(out.mc_loss, sum(mc_terms) / B, FP32_TOL, "multiple-choice cross-entropy")
    lm_terms = [nll(out.logits[b, c, t], ids[b, c, t + 1])
                for b in range(B) for c in range(n_choices) for t in range(T - 1)]
    assert_close(out.loss, sum(lm_terms) / len(lm_terms), FP32_TOL, "LM loss over all choices")


@pytest.mark.parametrize("problem_type", ["single_label_classification", "regression", "multi_label_classification"])
@pytest.mark.parametrize("explicit", [False, True], ids=["inferred", "explicit"])
def test_sequence_classification_loss_equals_hand_computation(device, problem_type, explicit):
    """Logits are read at the last real token: the one before the first pad token (the last one if a row has
    no padding). Without problem_type it is inferred: 1 label = regression, integer labels = single-label,
    float labels = multi-label."""
    num_labels = 1 if problem_type == "regression" else 3
    pad = 0
    config = tiny_config(num_labels=num_labels, pad_token_id=pad, problem_type=problem_type if explicit else None)
    model = build(GPT2ForSequenceClassification, config, device, seed=1)
    g = torch.Generator().manual_seed(1)
    ids = random_ids(g, config.vocab_size - 1, (3, 6)) + 1  # no pad token among the real tokens
    ids[0, 4:] = pad  # right-padded: last real token at 3
    ids[2, 2:] = pad  # last real token at 1; row 1 has no padding: last token at 5
    last = [3, 5, 1]
    if problem_type == "single_label_classification":
        labels = torch.tensor([2, 0, 1])
    elif problem_type == "regression":
        labels = torch.tensor([0.5, -1.0, 2.0])
    else:
        labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    out = model(ids.to(device), labels=labels.to(device), output_hidden_states=True)

    per_token = out.hidden_states[-1] @ model.score.weight.T  # (B, T, num_labels)
    pooled = torch.stack([per_token[b, last[b]] for b in range(3)])
    assert_close(out.logits, pooled, FP32_TOL, "logits at the last real token")
    if problem_type == "single_label_classification":
        expected = sum(nll(pooled[b], labels[b]) for b in range(3)) / 3
    elif problem_type == "regression":
        expected = sum((pooled[b, 0].item() - labels[b].item()) ** 2 for b in range(3)) / 3
    else:
        p = torch.sigmoid(pooled.double().cpu())
        expected = -(labels * p.log() + (1 - labels) * (1 - p).log()).mean().item()
    assert_close(out.loss, expected, FP32_TOL, problem_type)


@examples(10)
@given(config=configs(num_labels=4), seed=seeds)
def test_token_classification_loss_equals_hand_computation(device, config, seed):
    model = build(GPT2ForTokenClassification, config, device, seed)
    g = torch.Generator().manual_seed(seed)
    ids = random_ids(g, config.vocab_size, (2, 6))
    labels = torch.randint(0, 4, (2, 6), generator=g)
    labels[torch.rand(2, 6, generator=g) < 0.3] = -100  # no label for these tokens
    labels[1, 2] = 3
    out = model(ids.to(device), labels=labels.to(device))
    terms = [nll(out.logits[b, t], labels[b, t]) for b in range(2) for t in range(6) if labels[b, t] != -100]
    assert_close(out.loss, sum(terms) / len(terms), FP32_TOL, "mean cross-entropy over labelled tokens")


@examples(10)
@given(config=configs(), seed=seeds)
def test_question_answering_loss_equals_hand_computation(device, config, seed):
    """The mean of the start and end cross-entropies over tokens; positions past the end (the answer was cut
    off) are ignored."""
    model = build(GPT2ForQuestionAnswering, config, device, seed)
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 6
    ids = random_ids(g, config.vocab_size, (B, T))
    start = torch.tensor([0, 3, 9, 5])  # 9 is past the end: ignored
    end = torch.tensor([2, 5, 7, 40])  # 7 and 40 too
    out = model(ids.to(device), start_positions=start.to(device), end_positions=end.to(device))

    def mean_nll(logits, positions):
        terms = [nll(logits[b], positions[b]) for b in range(B) if positions[b] < T]
        return sum(terms) / len(terms)

    expected = (mean_nll(out.start_logits, start) + mean_nll(out.end_logits, end)) / 2
    assert_close(out.loss, expected, FP32_TOL, "(start + end) / 2")


# --- sampling filters --------------------------------------------------------------------------------

# One to three rows of 2-30 logits, with ties (whole numbers) and -inf (already filtered out), at least one finite.
logit_values = st.one_of(st.integers(-5, 5).map(float), st.floats(-10, 10, width=32), st.just(-math.inf))
logit_rows = st.integers(2, 30).flatmap(lambda V: st.lists(
    st.lists(logit_values, min_size=V, max_size=V).filter(lambda row: max(row) > -math.inf), min_size=1, max_size=3))


@examples(25)
@given(rows=logit_rows, k=st.integers(1, 40))
def test_top_k_filter_keeps_exactly_the_k_largest(device, rows, k):
    logits = torch.tensor(rows, device=device)
    kept = nanogpt2.top_k_filter(logits, k)
    for row, out in zip(rows, kept.tolist()):
        kth_largest = sorted(row, reverse=True)[min(k, len(row)) - 1]
        # The k largest keep their value (ties with the k-th all kept); every other logit becomes -inf.
        expected = [value if value >= kth_largest else -math.inf for value in row]
        assert out == expected, f"top_k_filter({row}, k={k}) gave {out}, expected {expected}"


@examples(25)
@given(rows=logit_rows, p=st.floats(0.01, 1.0))
@example(rows=[[0.0, 1.0]], p=0.5)  # the likelier token alone holds 0.73 >= p: the other must go
def test_top_p_filter_keeps_the_smallest_nucleus(device, rows, p):
    """A token is kept exactly when the tokens more likely than it hold less than p of the probability: the
    smallest set of most likely tokens whose mass reaches p. (Checked with a 1e-6 margin on the masses:
    fp32 cumulative sums round.)"""
    logits = torch.tensor(rows, device=device)
    kept = nanogpt2.top_p_filter(logits, p)
    for row, out in zip(logits.double().cpu(), kept.cpu()):
        probs = row.softmax(-1)
        for i in range(len(row)):
            above = probs[probs > probs[i]].sum().item()  # mass of strictly more likely tokens
            at_least = probs[probs >= probs[i]].sum().item() - probs[i].item()  # ... and its equals but itself
            if out[i] == -math.inf:
                assert at_least >= p - 1e-6, f"token {i} removed, p={p}"
            else:
                assert out[i] == row[i] and above < p + 1e-6, f"token {i} kept, p={p}"
        assert (out[probs == probs.max()] > -math.inf).any(), "a most likely token is always kept"


@examples(20)
@given(config=configs(), seed=seeds, data=st.data())
def test_sampling_never_picks_a_token_outside_top_k_or_top_p(device, config, seed, data):
    """Every sampled token is among the top_k logits, then inside the top_p nucleus of what is left, at the
    temperature used. The logits are recomputed by one full forward (no cache) over the result, and the
    sets are taken with a 1e-4 margin for the fp32 difference between the cached and full computations."""
    model = build(GPT2LMHeadModel, config, device, seed)
    top_k = data.draw(st.one_of(st.none(), st.integers(1, 5)), label="top_k")
    top_p = data.draw(st.one_of(st.none(), st.floats(0.05, 0.9)), label="top_p")
    temperature = data.draw(st.floats(0.5, 3.0), label="temperature")  # hot: tokens outside are likely picks
    prompt = random_ids(torch.Generator().manual_seed(seed), config.vocab_size, (3, 3)).to(device)
    tokens = model.generate(prompt, max_new_tokens=6, do_sample=True, temperature=temperature, top_k=top_k,
                            top_p=top_p, stop_at_eos=False, generator=torch.Generator(device).manual_seed(seed))
    logits = model(tokens).logits.double() / temperature  # (B, T + 6, V)
    for b in range(3):
        for t in range(3, tokens.size(1)):
            row, token = logits[b, t - 1], tokens[b, t]
            allowed = torch.ones_like(row, dtype=torch.bool)
            if top_k is not None:
                allowed &= row >= row.topk(top_k).values[-1] - 1e-4
            if top_p is not None:
                probs = row.masked_fill(~allowed, -math.inf).softmax(-1)  # top_p applies after top_k
                more_likely = probs[None, :] > probs[:, None] + 1e-4  # (V, V): token j clearly above token i
                allowed &= (more_likely * probs[None, :]).sum(-1) < top_p + 1e-4  # mass above i is under p
            assert allowed[token], f"row {b} step {t}: sampled {int(token)} outside top_k={top_k} top_p={top_p}"


# --- generation --------------------------------------------------------------------------------------


def left_pad(prompts, pad):
    """Prompts of different lengths -> (ids (B, T), attention_mask (B, T)), padding on the left."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    return ids, mask


prompt_lists = st.lists(st.lists(st.integers(0, 49), min_size=1, max_size=6), min_size=2, max_size=3)


@examples(20)
@given(config=configs(), seed=seeds, prompts=prompt_lists, num_beams=st.sampled_from([1, 1, 2, 3]))
def test_batched_left_padded_generation_equals_one_prompt_at_a_time(device, config, seed, prompts, num_beams):
    """Greedy (num_beams=1) and beam search: padding and batching change nothing a prompt generates."""
    model = build(GPT2LMHeadModel, config, device, seed)
    pad = seed % config.vocab_size  # any token: the mask hides it
    ids, mask = left_pad(prompts, pad)
    batched = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=5, num_beams=num_beams,
                             stop_at_eos=False)
    assert batched.shape == (len(prompts), ids.size(1) + 5)
    for b, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt], device=device), max_new_tokens=5, num_beams=num_beams,
                               stop_at_eos=False)
        assert batched[b, ids.size(1):].tolist() == alone[0, len(prompt):].tolist(), f"prompt {b}: {prompt}"


@pytest.mark.parametrize("num_beams", [1, 2])
def test_a_right_padded_batch_is_refused_and_the_same_prompts_left_padded_match_each_alone(device, num_beams):
    """A right-padded row would be continued from its padding: a silently different answer, so it is refused
    before any work. Padded on the left, the same prompts give what each gives alone."""
    model = GPT2LMHeadModel(tiny_config()).to(device)
    prompts = [[5, 6, 7, 8], [9, 10]]
    right_ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]], device=device)
    right_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], device=device)
    hook = no_work_allowed(model)
    with pytest.raises(ValueError, match=r"attention_mask row 1 has padding \(0\) at column 2.*pad on the left"):
        model.generate(right_ids, attention_mask=right_mask, max_new_tokens=4, num_beams=num_beams)
    hook.remove()
    ids, mask = left_pad(prompts, pad=0)
    batched = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=4, num_beams=num_beams,
                             stop_at_eos=False)
    for b, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt], device=device), max_new_tokens=4, num_beams=num_beams,
                               stop_at_eos=False)
        assert batched[b, 4:].tolist() == alone[0, len(prompt):].tolist(), f"prompt {b}: {prompt}"


@examples(15)
@given(config=configs(), seed=seeds, prompts=prompt_lists)
def test_greedy_generation_with_the_cache_picks_the_argmax_of_a_full_forward(device, config, seed, prompts):
    model = build(GPT2LMHeadModel, config, device, seed)
    ids, mask = left_pad(prompts, pad=0)
    tokens = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=6, stop_at_eos=False)
    full_mask = torch.cat([mask, torch.ones(len(prompts), 6, dtype=torch.long)], dim=1).to(device)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(tokens, attention_mask=full_mask, position_ids=positions).logits  # one pass, no cache
    T = ids.size(1)
    assert torch.equal(tokens[:, :T], ids.to(device))
    assert torch.equal(tokens[:, T:], logits[:, T - 1 : -1].argmax(-1))


def textbook_beam_search(model, prompt, num_beams, steps):
    """Beam search without a cache and without eos: every step re-runs each beam's whole sequence and keeps
    the num_beams highest sums of log-probabilities (in float64). Returns (best continuation, the smallest
    gap between a kept and a dropped score, or between the best and second-best at the end)."""
    scores, beams = torch.zeros(1, dtype=torch.float64), torch.tensor([prompt])
    smallest_gap = math.inf
    for _ in range(steps):
        logprobs = model(beams.to(model.lm_head.weight.device)).logits[:, -1].double().log_softmax(-1).cpu()
        candidates = (scores[:, None] + logprobs).view(-1)  # (beams x V,): beam i, token t at i * V + t
        top = candidates.topk(min(num_beams + 1, candidates.numel()))
        smallest_gap = min(smallest_gap, (top.values[num_beams - 1] - top.values[num_beams]).item())
        keep = top.indices[:num_beams]
        V = logprobs.size(-1)
        beams = torch.cat([beams[keep // V], (keep % V)[:, None]], dim=1)
        scores = top.values[:num_beams]
    smallest_gap = min(smallest_gap, (scores[0] - scores[1]).item())
    return beams[0, len(prompt):].tolist(), smallest_gap


@examples(20)
@given(config=configs(), seed=seeds, num_beams=st.sampled_from([2, 3]))
def test_beam_search_with_the_cache_equals_textbook_beam_search(device, config, seed, num_beams):
    """Beam search keeps each beam's cache in step with its tokens (the cache rows follow their beams)."""
    model = build(GPT2LMHeadModel, config, device, seed)
    prompts = random_ids(torch.Generator().manual_seed(seed), config.vocab_size, (3, 3))
    found = model.generate(prompts.to(device), max_new_tokens=8, num_beams=num_beams, stop_at_eos=False)
    for b in range(3):
        expected, gap = textbook_beam_search(model, prompts[b].tolist(), num_beams, steps=8)
        # Scores within fp32 rounding of each other may rank either way: such a case proves nothing.
        assume(gap > 1e-4)
        assert found[b, 3:].tolist() == expected, \
            f"prompt {b}: beam search with the cache gave {found[b, 3:].tolist()}, textbook beam search {expected}"


def test_generation_stops_each_row_at_eos_and_pads_after_it(device):
    config = tiny_config()
    model = build(GPT2LMHeadModel, config, device, seed=3)
    prompt = random_ids(torch.Generator().manual_seed(3), config.vocab_size, (4, 3)).to(device)
    free = model.generate(prompt, max_new_tokens=8, stop_at_eos=False)
    eos, pad = int(free[0, 5]), (int(free[0, 5]) + 1) % config.vocab_size  # a token row 0 does emit
    # An explicit mask: without one, generate() (as the reference) would take pad tokens in the prompt for padding.
    stopped = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, eos_token_id=eos,
                             pad_token_id=pad)
    steps_to_finish = []
    for b in range(4):
        generated = free[b, 3:].tolist()
        n = generated.index(eos) + 1 if eos in generated else 8  # tokens up to and including eos
        steps_to_finish.append(n)
        row = stopped[b, 3:].tolist()
        assert row[:n] == generated[:n], f"row {b} differs before its eos"
        assert all(t == pad for t in row[n:]), f"row {b} is not padded after eos: {row}"
    # Generation ends as soon as every row has finished.
    assert stopped.size(1) == 3 + max(steps_to_finish)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(device):
    model = build(GPT2LMHeadModel, tiny_config(), device, seed=4)
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]], device=device)

    def sample(seed, **kwargs):
        return model.generate(prompt, max_new_tokens=8, do_sample=True, stop_at_eos=False,
                              generator=torch.Generator(device).manual_seed(seed), **kwargs)

    assert torch.equal(sample(0, temperature=2.0), sample(0, temperature=2.0))
    assert not torch.equal(sample(0, temperature=2.0), sample(1, temperature=2.0))  # hot: draws differ
    greedy = model.generate(prompt, max_new_tokens=8, stop_at_eos=False)
    assert torch.equal(sample(0, top_k=1, temperature=2.0), greedy)


# --- bad inputs: a clear error before any work -------------------------------------------------------


def no_work_allowed(model):
    """Make the token embedding lookup (the first step of every forward) fail loudly: an input check that
    passes by mistake, or an error raised only after work began, shows as this AssertionError instead."""

    def hook(module, args):
        raise AssertionError("the forward pass started: the bad input was not caught before any work")

    body = model if isinstance(model, GPT2Model) else model.transformer
    return body.wte.register_forward_pre_hook(hook)


def bad(name, model_class, overrides, make_kwargs, error, message, xfail=None):
    """One bad-input case: the model class, config overrides, make_kwargs(config, device) -> forward kwargs, the
    exception type, and a regex its message must match (it names the input and, where there is one, the limit)."""
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(model_class, overrides, make_kwargs, error, message, id=name, marks=marks)


def token_ids(device, *shape, value=1):
    return torch.full(shape, value, dtype=torch.long, device=device)


def cache(config, device, batch, length, layers=2):
    """A (zero) cache of `length` tokens: per layer (k, v), each (B, nh, P, hs)."""
    k = torch.zeros(batch, config.n_head, length, config.n_embd // config.n_head, device=device)
    return tuple((k, k) for _ in range(layers))


BAD_INPUTS = [
    bad("token id = vocab_size", GPT2LMHeadModel, {}, lambda c, d: dict(input_ids=token_ids(d, 1, 4, value=64)),
        ValueError, r"input_ids holds token id 64, but vocab_size is 64"),
    bad("negative token id", GPT2Model, {}, lambda c, d: dict(input_ids=token_ids(d, 1, 4, value=-1)),
        ValueError, r"token id -1.*\[0, 64\)"),
    bad("float token ids", GPT2Model, {}, lambda c, d: dict(input_ids=torch.ones(1, 4, device=d)),
        TypeError, r"input_ids must be an integer tensor"),
    bad("input_ids and inputs_embeds", GPT2Model, {},
        lambda c, d: dict(input_ids=token_ids(d, 1, 4), inputs_embeds=torch.zeros(1, 4, 16, device=d)),
        ValueError, r"exactly one of input_ids"),
    bad("neither input_ids nor inputs_embeds", GPT2Model, {}, lambda c, d: dict(),
        ValueError, r"exactly one of input_ids"),
    bad("inputs_embeds of the wrong width", GPT2Model, {},
        lambda c, d: dict(inputs_embeds=torch.zeros(1, 4, 8, device=d)),
        ValueError, r"inputs_embeds has shape \(1, 4, 8\), expected \(B, T, 16\)"),
    bad("longer than n_positions", GPT2LMHeadModel, {}, lambda c, d: dict(input_ids=token_ids(d, 1, 33)),
        ValueError, r"33 tokens long.*n_positions=32"),
    bad("longer than n_positions with the cache", GPT2LMHeadModel, {},
        lambda c, d: dict(input_ids=token_ids(d, 1, 3), past_key_values=cache(c, d, 1, 30)),
        ValueError, r"33 tokens long \(30 cached \+ 3 new\).*n_positions=32"),
    bad("cache of the wrong batch", GPT2Model, {},
        lambda c, d: dict(input_ids=token_ids(d, 1, 3), past_key_values=cache(c, d, 2, 4)),
        ValueError, r"past_key_values\[0\] has shape \(2, 2, 4, 8\), expected \(B, nh, P, hs\) = \(1, 2, 4, 8\)"),
    bad("cache with too few layers", GPT2Model, {},
        lambda c, d: dict(input_ids=token_ids(d, 1, 3), past_key_values=cache(c, d, 1, 4, layers=1)),
        ValueError, r"past_key_values has 1 layers, the model has 2"),
    bad("attention_mask too short", GPT2Model, {},
        lambda c, d: dict(input_ids=token_ids(d, 2, 4), attention_mask=torch.ones(2, 3, device=d)),
        ValueError, r"attention_mask has shape \(2, 3\), expected \(2, 4\)"),
    bad("attention_mask without the cached tokens", GPT2Model, {},
        lambda c, d: dict(input_ids=token_ids(d, 1, 3), past_key_values=cache(c, d, 1, 4),
                          attention_mask=torch.ones(1, 3, device=d)),
        ValueError, r"attention_mask has shape \(1, 3\), expected \(1, 7\)"),
    bad("attention_mask of the wrong batch", GPT2Model, {},
        lambda c, d: dict(input_ids=token_ids(d, 2, 4), attention_mask=torch.ones(1, 4, device=d)),
        ValueError, r"attention_mask has shape \(1, 4\)"),
    bad("attention_mask not 0/1", GPT2Model, {},
        lambda c, d: dict(input_ids=token_ids(d, 1, 4), attention_mask=torch.full((1, 4), 2.0, device=d)),
        ValueError, r"attention_mask must hold only 0"),
    bad("head_mask with too many heads", GPT2Model, {},
        lambda c, d: dict(input_ids=token_ids(d, 1, 4), head_mask=torch.ones(3, device=d)),
        ValueError, r"head_mask has shape \(3,\), expected \(2,\) or \(2, 2\)"),
    bad("head_mask with too many layers", GPT2Model, {},
        lambda c, d: dict(input_ids=token_ids(d, 1, 4), head_mask=torch.ones(3, 2, device=d)),
        ValueError, r"head_mask has shape \(3, 2\)"),
    bad("position_ids too short", GPT2Model, {},
        lambda c, d: dict(input_ids=token_ids(d, 2, 4), position_ids=torch.arange(3, device=d)),
        ValueError, r"position_ids has shape \(3,\)"),
    bad("position_ids of the wrong batch", GPT2Model, {},
        lambda c, d: dict(input_ids=token_ids(d, 2, 4), position_ids=torch.arange(4, device=d).repeat(3, 1)),
        ValueError, r"position_ids has shape \(3, 4\)"),
    bad("position beyond n_positions", GPT2Model, {},
        lambda c, d: dict(input_ids=token_ids(d, 1, 4), position_ids=torch.tensor([[0, 1, 2, 32]], device=d)),
        ValueError, r"position_ids holds position 32, but n_positions is 32"),
    bad("token_type_ids of the wrong shape", GPT2Model, {},
        lambda c, d: dict(input_ids=token_ids(d, 1, 4), token_type_ids=token_ids(d, 1, 5)),
        ValueError, r"token_type_ids has shape \(1, 5\)"),
    bad("token_type_ids outside the vocabulary", GPT2Model, {},
        lambda c, d: dict(input_ids=token_ids(d, 1, 4), token_type_ids=token_ids(d, 1, 4, value=64)),
        ValueError, r"token_type_ids holds token id 64"),
    bad("encoder states without cross-attention", GPT2LMHeadModel, {},
        lambda c, d: dict(input_ids=token_ids(d, 1, 4), encoder_hidden_states=torch.zeros(1, 3, 16, device=d)),
        ValueError, r"no cross-attention.*add_cross_attention=True"),
    bad("encoder mask without encoder states", GPT2Model, dict(add_cross_attention=True),
        lambda c, d: dict(input_ids=token_ids(d, 1, 4), encoder_attention_mask=torch.ones(1, 3, device=d)),
        ValueError, r"encoder_attention_mask was given without encoder_hidden_states"),
    bad("encoder states of the wrong width", GPT2Model, dict(add_cross_attention=True),
        lambda c, d: dict(input_ids=token_ids(d, 1, 4), encoder_hidden_states=torch.zeros(1, 3, 8, device=d)),
        ValueError, r"encoder_hidden_states has shape \(1, 3, 8\)"),
    bad("encoder states of the wrong batch", GPT2Model, dict(add_cross_attention=True),
        lambda c, d: dict(input_ids=token_ids(d, 2, 4), encoder_hidden_states=torch.zeros(1, 3, 16, device=d)),
        ValueError, r"encoder_hidden_states has shape \(1, 3, 16\), expected \(B=2"),
    bad("encoder mask of the wrong shape", GPT2Model, dict(add_cross_attention=True),
        lambda c, d: dict(input_ids=token_ids(d, 1, 4), encoder_hidden_states=torch.zeros(1, 3, 16, device=d),
                       encoder_attention_mask=torch.ones(1, 4, device=d)),
        ValueError, r"encoder_attention_mask has shape \(1, 4\), expected \(1, 3\)"),
    bad("encoder mask not 0/1", GPT2Model, dict(add_cross_attention=True),  # 2s would change the output silently
        lambda c, d: dict(input_ids=token_ids(d, 1, 4), encoder_hidden_states=torch.zeros(1, 3, 16, device=d),
                          encoder_attention_mask=torch.full((1, 3), 2.0, device=d)),
        ValueError, r"encoder_attention_mask must hold only 0 \(padding\) and 1"),
    bad("mc_token_ids beyond the sequence", GPT2DoubleHeadsModel, {},
        lambda c, d: dict(input_ids=token_ids(d, 1, 2, 4), mc_token_ids=torch.tensor([[0, 4]], device=d)),
        ValueError, r"mc_token_ids holds position 4"),
    bad("mc_token_ids of the wrong shape", GPT2DoubleHeadsModel, {},
        lambda c, d: dict(input_ids=token_ids(d, 1, 2, 4), mc_token_ids=torch.tensor([0, 1, 2], device=d)),
        ValueError, r"mc_token_ids has shape \(3,\), expected \(1, 2\)"),
    bad("a batch without pad_token_id", GPT2ForSequenceClassification, {},
        lambda c, d: dict(input_ids=token_ids(d, 2, 4)), ValueError, r"needs config.pad_token_id"),
]


@pytest.mark.parametrize("model_class, overrides, make_kwargs, error, message", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors_before_any_work(device, model_class, overrides, make_kwargs, error, message):
    config = tiny_config(**overrides)
    model = model_class(config).to(device).eval()
    no_work_allowed(model)
    with pytest.raises(error, match=message):
        model(**make_kwargs(config, device))


def test_head_mask_and_pruned_heads_cannot_be_combined(device):
    model = GPT2Model(tiny_config()).to(device)
    model.prune_heads({0: [1]})
    no_work_allowed(model)
    with pytest.raises(ValueError, match="head_mask cannot be combined with pruned heads"):
        model(torch.ones(1, 4, dtype=torch.long, device=device), head_mask=torch.ones(2, device=device))


@pytest.mark.parametrize("plan, message", [
    ({2: [0]}, r"prune_heads got layer 2 heads \[0\]; layers are 0..1 and heads 0..1"),
    ({0: [2]}, r"prune_heads got layer 0 heads \[2\]"),
    ({0: [0, 1]}, r"would remove every head of layer 0"),
])
def test_pruning_bad_heads_raises_and_changes_nothing(device, plan, message):
    model = GPT2Model(tiny_config()).to(device)
    with pytest.raises(ValueError, match=message):
        model.prune_heads(plan)
    assert model.config.pruned_heads == {} and all(block.attn.num_heads == 2 for block in model.h)


BAD_GENERATE_ARGS = [  # (keyword arguments for generate, the message); the default prompt is 3 tokens
    (dict(input_ids=torch.ones(4, dtype=torch.long)), r"input_ids must be a LongTensor of shape \(B, T\), got \(4,\)"),
    (dict(input_ids=torch.ones(1, 0, dtype=torch.long)), r"input_ids is empty"),
    (dict(max_new_tokens=-1), r"max_new_tokens must be a non-negative integer, got -1"),
    (dict(max_new_tokens=31), r"prompt \(3 tokens\) \+ max_new_tokens \(31\) = 34 exceeds n_positions \+ 1 = 33"),
    (dict(do_sample=True, temperature=0.0), r"temperature must be at least 1e-06"),
    (dict(do_sample=True, temperature=-1.0), r"temperature must be at least 1e-06 and finite when sampling, got -1.0"),
    (dict(do_sample=True, temperature=math.nan), r"temperature must be at least 1e-06 and finite when sampling, got nan"),
    (dict(do_sample=True, temperature=math.inf), r"temperature must be at least 1e-06 and finite when sampling, got inf"),
    (dict(do_sample=True, top_p=math.nan), r"top_p must be in \(0, 1\], got nan"),
    (dict(num_beams=2, length_penalty=math.nan), r"length_penalty must be a finite number, got nan"),
    (dict(do_sample=True, top_k=-1), r"top_k must be a non-negative integer, got -1 \(0 or None: no top-k\)"),
    (dict(do_sample=True, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(num_beams=0), r"num_beams must be a positive integer"),
    (dict(attention_mask=torch.ones(1, 4, dtype=torch.long)),
     r"attention_mask has shape \(1, 4\), expected \(1, 3\)"),
    (dict(attention_mask=torch.tensor([[0, 2, 1]])), r"attention_mask must hold only 0 \(padding\) and 1"),
    (dict(attention_mask=torch.tensor([[1, 1, 0]])),
     r"attention_mask row 0 has padding \(0\) at column 2, after a token \(1\).*pad on the left"),
    (dict(attention_mask=torch.tensor([[1, 0, 1]])), r"attention_mask row 0 has padding \(0\) at column 1"),
    (dict(attention_mask=torch.tensor([[0, 0, 0]])), r"attention_mask row 0 is all 0"),
    (dict(input_ids=torch.tensor([[1, 2, 64]])), r"input_ids holds token id 64, but vocab_size is 64"),
]


@pytest.mark.parametrize("kwargs, message", BAD_GENERATE_ARGS, ids=[m.split(" ")[0] for _, m in BAD_GENERATE_ARGS])
def test_generate_rejects_bad_arguments_before_any_work(device, kwargs, message):
    model = GPT2LMHeadModel(tiny_config()).to(device)
    no_work_allowed(model)
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    input_ids = kwargs.pop("input_ids", torch.tensor([[1, 2, 3]], device=device))
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids, **kwargs)


# --- config ------------------------------------------------------------------------------------------

INVALID_CONFIGS = [
    (dict(n_embd=30, n_head=4), r"n_embd \(30\) must be divisible by n_head \(4\)"),
    (dict(vocab_size=0), r"vocab_size must be a positive integer, got 0"),
    (dict(n_layer=-1), r"n_layer must be a positive integer, got -1"),
    (dict(n_positions=8.5), r"n_positions must be an integer, got 8.5 \(a float\)"),
    (dict(n_layer=2.0), r"n_layer must be an integer, got 2.0 \(a float\); write 2"),
    (dict(n_head=True), r"n_head must be an integer, got True \(a bool\)"),
    (dict(tie_word_embeddings="false"), r"tie_word_embeddings must be true or false, got 'false' \(a str\)"),
    (dict(resid_pdrop="0.1"), r"resid_pdrop must be a finite number, got '0.1' \(a str\)"),
    (dict(layer_norm_epsilon=float("inf")), r"layer_norm_epsilon must be a finite number, got inf"),
    (dict(activation_function=["gelu"]), r"activation_function must be a string, got \['gelu'\] \(a list\)"),
    (dict(n_inner="64"), r"n_inner must be an integer or null \(None\), got '64' \(a str\)"),
    (dict(pad_token_id=2 ** 63), r"pad_token_id must fit in 64 bits"),
    (dict(initializer_range=-0.02), r"initializer_range is the standard deviation of the initial weights, >= 0"),
    (dict(num_labels=-1), r"num_labels must be a positive integer, got -1"),
    (dict(n_inner=0), r"n_inner must be None or a positive integer, got 0"),
    (dict(activation_function="gelu2"), r"activation_function is 'gelu2', expected one of"),
    (dict(summary_activation="softmax"), r"summary_activation is 'softmax'"),
    (dict(resid_pdrop=1.0), r"resid_pdrop is a dropout probability in \[0, 1\), got 1.0"),
    (dict(attn_pdrop=-0.1), r"attn_pdrop is a dropout probability"),
    (dict(summary_first_dropout=2.0), r"summary_first_dropout is a dropout probability"),
    (dict(classifier_dropout=1.5), r"classifier_dropout is a dropout probability in \[0, 1\) or None"),
    (dict(layer_norm_epsilon=0.0), r"layer_norm_epsilon must be > 0"),
    (dict(summary_type="max"), r"summary_type is 'max', expected one of"),
    (dict(problem_type="ranking"), r"problem_type is 'ranking', expected one of"),
    (dict(pruned_heads={2: [0]}), r"pruned_heads names layer 2 heads \[0\], but the model has 2 layers of 2 heads"),
    (dict(pruned_heads={0: [5]}), r"pruned_heads names layer 0 heads \[5\]"),
    (dict(pruned_heads={0: [0, 1]}), r"pruned_heads removes all 2 heads of layer 0; a layer keeps at least one"),
    (dict(pruned_heads={0: 1}), r"pruned_heads must map layer numbers to lists of head numbers"),
]


@pytest.mark.parametrize("overrides, message", INVALID_CONFIGS)
def test_invalid_config_raises_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)
    config_json = {**tiny_config().to_dict(), **overrides}
    if "num_labels" in overrides:  # a config.json counts its label names
        del config_json["id2label"]
    with pytest.raises(ValueError, match=message):  # from a config.json too
        GPT2Config.from_dict(config_json)


def test_config_edited_after_creation_is_checked_by_every_model(device):
    for model_class in nanogpt2.HEAD_CLASSES:
        config = tiny_config()
        config.n_head = 3  # 16 is not divisible by 3
        with pytest.raises(ValueError, match=r"n_embd \(16\) must be divisible by n_head \(3\)"):
            model_class(config)


config_fields = st.fixed_dictionaries(
    dict(
        vocab_size=st.integers(1, 100),
        n_layer=st.integers(1, 3),
        n_head=st.sampled_from([1, 2, 4]),
        n_inner=st.one_of(st.none(), st.integers(1, 64)),
        activation_function=st.sampled_from(sorted(nanogpt2.ACTIVATIONS)),
        resid_pdrop=st.floats(0, 0.9),
        layer_norm_epsilon=st.floats(1e-8, 1e-3),
        summary_type=st.sampled_from(nanogpt2.SUMMARY_TYPES),
        summary_activation=st.sampled_from([None, "tanh"]),
        scale_attn_by_inverse_layer_idx=st.booleans(),
        reorder_and_upcast_attn=st.booleans(),
        add_cross_attention=st.booleans(),
        pad_token_id=st.one_of(st.none(), st.integers(0, 99)),
        num_labels=st.integers(1, 5),
        problem_type=st.sampled_from(nanogpt2.PROBLEM_TYPES),
        classifier_dropout=st.one_of(st.none(), st.floats(0, 0.9)),
        tie_word_embeddings=st.booleans(),
        # Keys this class does not know: kept and written back unchanged.
        extra=st.dictionaries(
            st.sampled_from(["n_ctx", "architectures", "torch_dtype", "task_specific_params"]),
            st.one_of(st.integers(0, 1024), st.text(max_size=5), st.lists(st.text(max_size=5), max_size=2)),
        ),
    )
)


@examples(25)
@given(fields=config_fields, prune=st.booleans())
def test_config_json_round_trip(tmp_path, fields, prune):
    """to_json_file then from_json_file gives back every field (pruned heads and unknown keys included);
    the second trip gives back the same file."""
    config = GPT2Config(n_embd=8 * fields["n_head"], n_positions=16, **fields)
    if prune and config.n_head > 1:
        config.pruned_heads = {config.n_layer - 1: [0]}
    path = tmp_path / "config.json"
    config.to_json_file(path)
    loaded = GPT2Config.from_json_file(path)
    for f in dataclasses.fields(GPT2Config):
        if f.name != "extra":  # extra also gains the label names and model_type that to_dict writes
            assert getattr(loaded, f.name) == getattr(config, f.name), f.name
    for key, value in config.extra.items():
        assert loaded.extra[key] == value, key
    assert loaded.to_dict() == config.to_dict()
    loaded.to_json_file(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == path.read_text()


# The config.json of the Hugging Face "gpt2" checkpoint (124M), as published.
HF_GPT2_CONFIG = {
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1, "bos_token_id": 50256,
    "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
    "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_inner": None, "n_layer": 12,
    "n_positions": 1024, "reorder_and_upcast_attn": False, "resid_pdrop": 0.1,
    "scale_attn_by_inverse_layer_idx": False,
    "scale_attn_weights": True, "summary_activation": None, "summary_first_dropout": 0.1,
    "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}, "use_cache": True,
    "vocab_size": 50257,
}


def test_hugging_face_config_json_reads_and_writes_back(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(HF_GPT2_CONFIG))
    config = GPT2Config.from_json_file(path)
    assert config == GPT2Config.from_preset("gpt2", extra=config.extra)
    assert config.num_labels == 2  # Hugging Face's default when the file has no id2label
    written = config.to_dict()
    for key, value in HF_GPT2_CONFIG.items():  # every key, known or not, comes back unchanged
        assert written[key] == value, key
    assert written["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"}
    assert written["label2id"] == {"LABEL_0": 0, "LABEL_1": 1}


def test_label_names_survive_the_round_trip(tmp_path):
    config = GPT2Config.from_dict({**HF_GPT2_CONFIG, "id2label": {"0": "negative", "1": "neutral", "2": "positive"}})
    assert config.num_labels == 3
    config.to_json_file(tmp_path / "config.json")
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert written["label2id"] == {"negative": 0, "neutral": 1, "positive": 2}
