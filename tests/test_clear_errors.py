"""Inputs that once crashed deep inside torch, numpy or struct now get a clear error, raised before any work,
naming the argument (or file), what it got and what was expected. Both model files where they apply."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import imagegpt
import nanogpt2

ROOT = Path(__file__).resolve().parent.parent
MODULES = {"nanogpt2": nanogpt2, "imagegpt": imagegpt}


def tiny(module, head=None):
    torch.manual_seed(0)
    if module is nanogpt2:
        config = nanogpt2.GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=8, vocab_size=16)
        return (head or nanogpt2.GPT2LMHeadModel)(config).eval()
    config = imagegpt.ImageGPTConfig(n_layer=1, n_head=2, n_embd=8, n_positions=4, vocab_size=5)
    return (head or imagegpt.ImageGPTForCausalImageModeling)(config).eval()


# --- 5. Weights that are not finite -------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_checkpoint_with_nan_or_inf_weights_is_refused_naming_the_tensors(tmp_path, name, bad):
    model = tiny(MODULES[name])
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, :3] = bad
        model.transformer.ln_f.weight[1] = -bad
    model.save_pretrained(tmp_path)
    with pytest.raises(MODULES[name].CheckpointError,
                       match=r"NaN or inf, in 2 tensor\(s\): transformer.h.0.mlp.c_fc.weight \(3 of 256 values\), "
                             r"transformer.ln_f.weight \(1 of 8 values\)"):
        type(model).from_pretrained(tmp_path)
