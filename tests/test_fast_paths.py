"""The faster computations of both model files equal the plain ones they replace (the plain ones stay in the
files, or here, for the reader): the fused tanh GELU, the label-shifting loss, the LM head's layout in
generation."""

import pytest
import torch
import torch.nn.functional as F

import imagegpt
import nanogpt2

MODULES = [nanogpt2, imagegpt]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_fused_gelu_equals_the_formula_values_and_gradients(module):
    x = torch.linspace(-12, 12, 20001, dtype=torch.float64).float().requires_grad_()
    fast = module.gelu_new(x)
    (fast_grad,) = torch.autograd.grad(fast.sum(), x)
    formula = module.gelu_new_formula(x)
    (formula_grad,) = torch.autograd.grad(formula.sum(), x)
    # The same function evaluated in a different order: a few fp32 roundings apart (|x| <= 12, values <= 12).
    assert torch.allclose(fast, formula, rtol=1e-6, atol=1e-6)
    # Gradients: the fused kernel flushes the tiny slope far left to 0 (at x = -5.2 the true one is -1.0e-6),
    # and either stays within 1.1e-6 of the float64 formula's; a wrong derivative is off by 1e-2 or more.
    assert torch.allclose(fast_grad, formula_grad, rtol=1e-5, atol=2e-6)
    assert (module.ACTIVATIONS["gelu_new"](x) == fast).all()  # the fast one is what the models use


def copy_shifted_loss(logits, labels):
    """The reference's way: drop the last position's logits (a copy) and the first label."""
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    return F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1), ignore_index=-100)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
@pytest.mark.parametrize("shape", [(2, 7), (3, 2, 5), (1, 3)])
def test_shifting_labels_gives_the_loss_of_shifting_logits(module, shape):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*shape, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, shape, generator=g)
    labels[..., 1] = -100  # an ignored label inside the sequence
    ours = module.shifted_lm_loss(logits, labels)
    expected = copy_shifted_loss(logits, labels)
    assert torch.allclose(ours, expected, rtol=1e-6, atol=1e-7)  # the same terms, summed in the same order
    (g_ours,), (g_expected,) = torch.autograd.grad(ours, logits), torch.autograd.grad(expected, logits)
    assert torch.allclose(g_ours, g_expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_generation_logits_equal_the_lm_heads(module, batch):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    model = torch.nn.Module()
    model.lm_head = head
    hidden = torch.randn(batch, 16)
    assert torch.allclose(module.next_token_logits(model, hidden), head(hidden), rtol=1e-5, atol=1e-6)
