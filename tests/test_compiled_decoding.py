"""generate(compile=True), in both files: the fixed-shape decoding step and its torch.compile wrapper.

    fixed shapes      decode_one_token (every slot of a FixedShapeCache read, the mask hiding the empty ones) gives the
                      logits of one ordinary forward, step after step, with padding and every attention option
    generate          compile=True feeds it the right tokens, positions, mask and slot: the same tokens as the
                      default path (greedy, seeded sampling, eos stops, left padding)
    torch.compile     the step traces as one graph (fullgraph=True), compiled once per model and again when
                      its weights change; the real inductor compile is in the slow tests. The training
                      forward and loss trace as one graph too (train --compile)
    errors            compile= that is not a bool, with the tuple cache, or with beam search

CI has no time for inductor (a tiny model's max-autotune compile takes 20-70 s on 2 cores), so the fast tests
run torch.compile with backend="eager": Dynamo traces the whole step, which is what fails when a change adds a
graph break, and the slow tests run the real compile and compare tokens.
"""

import contextlib
from unittest import mock

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


def tiny(module, seed=0, **overrides):
    """A small model with sharpened weights (so that a wrong key or slot changes the argmax), in eval mode."""
    if module is nanogpt2:
        config = nanogpt2.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=48,
                                     bos_token_id=0, eos_token_id=0, **overrides)
        return gpt2_props.build(nanogpt2.GPT2LMHeadModel, config, torch.device("cpu"), seed)
    config = imagegpt.ImageGPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=17, n_positions=16, **overrides)
    return igpt_props.build(imagegpt.ImageGPTForCausalImageModeling, config, torch.device("cpu"), seed)


# --- Fixed shapes: decode_one_token step by step equals one forward ----------------------------------


def fixed_shape_logits(module, model, ids, mask, positions, prefill):
    """Prefill ids[:, :prefill] the ordinary way, then feed the rest one token a step through
    decode_one_token with a FixedShapeCache (T slots, all read every step); (B, T - prefill, V). The mask is
    made here, not taken from the cache, so that the cache's bookkeeping is tested too (write_at, length)."""
    B, T = ids.shape
    cache = module.FixedShapeCache(T)
    model.transformer(ids[:, :prefill], past_key_values=cache, attention_mask=mask[:, :prefill],
                      position_ids=positions[:, :prefill], use_cache=True)
    cache.fix_shapes(mask[:, :prefill])
    logits = []
    for s in range(prefill, T):
        cache.next_slot()
        assert int(cache.write_at) == s == cache.length
        visible = mask.clone()
        visible[:, s + 1 :] = 0  # the slots not written yet
        logits.append(module.decode_one_token(model, ids[:, s : s + 1], positions[:, s : s + 1], visible, cache))
        cache.advance()
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("name", ["nanogpt2", "imagegpt"])
@examples(25)
@given(data=st.data())
def test_fixed_shape_steps_give_the_logits_of_one_forward(name, data):
    """Each fixed-shape step attends over all T slots of the cache, the unwritten ones hidden by the mask: its
    logits equal one forward over the whole sequence, at every real position, whatever the attention options
    (both cores, fp32 upcast, scales) and the padding."""
    module, props = (nanogpt2, gpt2_props) if name == "nanogpt2" else (imagegpt, igpt_props)
    head = nanogpt2.GPT2LMHeadModel if name == "nanogpt2" else imagegpt.ImageGPTForCausalImageModeling
    config = data.draw(props.configs(add_cross_attention=False), label="config")
    model = props.build(head, config, torch.device("cpu"), data.draw(props.seeds, label="weights"))
    g = torch.Generator().manual_seed(data.draw(props.seeds, label="input seed"))
    B, T = data.draw(st.integers(1, 3), label="B"), data.draw(st.integers(2, 10), label="T")
    prefill = data.draw(st.integers(1, T - 1), label="prefill")
    ids = props.random_ids(g, config.vocab_size, (B, T))
    mask = props.random_padding_mask(g, (B, T)) if data.draw(st.booleans(), label="padding") else torch.ones(B, T).long()
    positions = props.positions_from_mask(mask)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions).logits  # (B, T, V)
        steps = fixed_shape_logits(module, model, ids, mask, positions, prefill)
    real = mask[:, prefill:].bool()
    props.assert_close(steps[real], full[:, prefill:][real], props.FP32_TOL, f"prefill {prefill} of {T}")


# --- generate(compile=True) with the step uncompiled: the loop's bookkeeping ---------------------------


@contextlib.contextmanager
def uncompiled(module):
    """generate(compile=True) with decode_one_token itself in place of its compiled version."""
    with mock.patch.object(module, "compiled_decode_step", lambda model: module.decode_one_token):
        yield


GPT2_CASES = [
    dict(),  # greedy
    dict(do_sample=True, top_k=7, temperature=0.8),
    dict(do_sample=True, top_p=0.9),
    dict(stop_at_eos=True),  # eos is token 0 in these configs: rows stop, then carry padding
]


@pytest.mark.parametrize("options", GPT2_CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_gpt2_generate_with_fixed_shapes_matches_the_default(options, padded):
    """The same tokens as the default (static cache, growing reads) for greedy, seeded sampling and eos stops,
    with and without left padding: the mask gains each new token's column, the slot advances, and the
    positions continue each row's own count."""
    model = tiny(nanogpt2, seed=3)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 97, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :4], mask[1, :1] = 0, 0
    options = {"stop_at_eos": False, **options}
    outputs = []
    for compile in (False, True):
        seeded = torch.Generator().manual_seed(11)
        with uncompiled(nanogpt2):
            outputs.append(model.generate(ids, attention_mask=mask, max_new_tokens=20, generator=seeded,
                                          compile=compile, **options))
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("options", [dict(), dict(do_sample=True, top_k=5)])
def test_imagegpt_generate_with_fixed_shapes_matches_the_default(options):
    """ImageGPT: the same pixels, up to the last one, which has no slot (SOS + n_positions pixels in n_positions)."""
    model = tiny(imagegpt, seed=4)
    prompts = torch.tensor([[16, 3, 5], [16, 9, 9]])
    outputs = []
    for compile in (False, True):
        seeded = torch.Generator().manual_seed(2)
        with uncompiled(imagegpt):
            outputs.append(model.generate(prompts, num_samples=2, generator=seeded, compile=compile, **options))
    assert outputs[0].shape == (4, 17)
    assert torch.equal(outputs[0], outputs[1])


# --- torch.compile: one graph, compiled once per model and again when the weights change ---------------


class CountingCompile:
    """torch.compile with backend="eager" (Dynamo traces, nothing is generated), counting the calls."""

    def __init__(self):
        self.calls = []
        self.real = torch.compile

    def __call__(self, fn, mode=None, fullgraph=False):
        self.calls.append((fn, mode, fullgraph))
        return self.real(fn, backend="eager", fullgraph=fullgraph)


@pytest.mark.parametrize("name", ["nanogpt2", "imagegpt"])
def test_the_step_traces_as_one_graph_and_is_recompiled_when_the_weights_change(name):
    """fullgraph=True: Dynamo traces the whole step or raises (a graph break would split it and, on a GPU, stop
    CUDA graphs). A second call reuses the compiled step; editing the weights in place compiles it afresh,
    since freezing (on CPU) bakes them in, and the tokens follow the new weights."""
    module = MODULES[name]
    model = tiny(module, seed=6)
    prompt = torch.tensor([[5, 7, 9, 11]]) if name == "nanogpt2" else torch.tensor([[16, 2, 4]])
    run = lambda compile: model.generate(prompt, max_new_tokens=8, compile=compile)
    counting = CountingCompile()
    with mock.patch.object(torch, "compile", counting):
        torch.compiler.reset()
        first = run(True)
        assert torch.equal(first, run(False))
        assert [(fn, mode, full) for fn, mode, full in counting.calls] == [
            (module.decode_one_token, "max-autotune", True)]
        assert torch.equal(run(True), first) and len(counting.calls) == 1  # reused
        with torch.no_grad():
            model.lm_head.weight.mul_(-1.0)  # in place: same storage, a new version
        changed = run(True)
        assert len(counting.calls) == 2, "edited weights must be compiled again"
        assert torch.equal(changed, run(False)) and not torch.equal(changed, first)
    torch.compiler.reset()


@pytest.mark.parametrize("name", ["nanogpt2", "imagegpt"])
def test_the_training_forward_and_loss_trace_as_one_graph(name):
    """train --compile and bench.py's train-gpu compile forward + loss: the input checks must not split the
    graph (reading token ids back into Python, or dropping the -100 labels, which gives a data-dependent
    shape), or every step would wait for the device between the pieces."""
    module = MODULES[name]
    model = tiny(module).train()
    ids = torch.randint(0, 16, (2, 12))
    labels = ids.masked_fill(torch.rand(2, 12, generator=torch.Generator().manual_seed(0)) < 0.3, -100)
    explained = torch._dynamo.explain(lambda x, y: model(x, labels=y).loss)(ids, labels)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    torch.compiler.reset()


# --- Errors, before any work ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nanogpt2", "imagegpt"])
def test_compile_arguments_are_checked(name):
    module = MODULES[name]
    model = tiny(module)
    prompt = torch.tensor([[1, 2]]) if name == "nanogpt2" else torch.tensor([[16, 2]])
    with pytest.raises(TypeError, match="compile must be True or False, got 'yes'"):
        model.generate(prompt, max_new_tokens=2, compile="yes")
    with pytest.raises(ValueError, match='compile=True needs cache="static"'):
        model.generate(prompt, max_new_tokens=2, compile=True, cache="tuple")
    if module is nanogpt2:
        with pytest.raises(ValueError, match="not beam search"):
            model.generate(prompt, max_new_tokens=2, compile=True, num_beams=2)


# --- The real compile (inductor), slow -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nanogpt2", "imagegpt"])
def test_inductor_compiled_generation_matches_eager_and_follows_new_weights(name):
    """The real thing: inductor with max-autotune and freezing on the CPU (a minute or so per model). The same
    tokens as eager generation, with padding and with seeded sampling; after the weights change, the tokens of
    the new weights, not the frozen old ones."""
    module = MODULES[name]
    model = tiny(module, seed=8)
    torch.compiler.reset()
    if module is nanogpt2:
        ids = torch.randint(1, 97, (3, 5), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        run = lambda compile, **kw: model.generate(ids, attention_mask=mask, max_new_tokens=12, stop_at_eos=False,
                                                   compile=compile, **kw)
    else:
        prompt = torch.tensor([[16, 1, 2], [16, 5, 5]])
        run = lambda compile, **kw: model.generate(prompt, num_samples=2, compile=compile, **kw)
    assert torch.equal(run(True), run(False))
    seeded = lambda: torch.Generator().manual_seed(4)
    assert torch.equal(run(True, do_sample=True, generator=seeded()), run(False, do_sample=True, generator=seeded()))
    with torch.no_grad():
        for p in model.transformer.h[0].parameters():
            p.mul_(-1.0)
    assert torch.equal(run(True), run(False))
    torch.compiler.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (tests/gpu_checks.sh runs it)")
@pytest.mark.parametrize("name", ["nanogpt2", "imagegpt"])
def test_cuda_graphs_compiled_generation_matches_eager(name):
    """On a GPU, compile=True is mode="reduce-overhead": the step replays as a CUDA graph, reading and writing
    the cache in place (mark_static). The same tokens as eager generation, call after call (the graph is
    recorded on an early call and replayed later), and after the weights change."""
    module = MODULES[name]
    model = tiny(module, seed=8).cuda()
    torch.compiler.reset()
    if module is nanogpt2:
        ids = torch.randint(1, 97, (3, 5), generator=torch.Generator().manual_seed(1)).cuda()
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        run = lambda compile: model.generate(ids, attention_mask=mask, max_new_tokens=12, stop_at_eos=False,
                                             compile=compile)
    else:
        prompt = torch.tensor([[16, 1, 2], [16, 5, 5]]).cuda()
        run = lambda compile: model.generate(prompt, num_samples=2, compile=compile)
    expected = run(False)
    for _ in range(3):
        assert torch.equal(run(True), expected)
    with torch.no_grad():
        for p in model.transformer.h[0].parameters():
            p.mul_(-1.0)
    assert torch.equal(run(True), run(False))
    torch.compiler.reset()
