"""imagegpt.py: all of ImageGPT in one readable PyTorch file.

ImageGPT (Chen et al., 2020, "Generative Pretraining from Pixels") is GPT-2 trained on images instead of
text: an image is shrunk to n_px x n_px (32 x 32 for the released models), every pixel is replaced by the
nearest of 512 colours (a palette found by k-means), and the pixels, read in raster order, become a
sequence of 1024 colour tokens that the transformer learns to predict one by one. A start-of-sequence
token (SOS, id 512) comes first, so the first pixel has something to be predicted from.
This file writes every part of the Hugging Face transformers ImageGPT family out in full, with the same
class names, config fields, state_dict keys, forward arguments and output names, so that a Hugging Face
checkpoint loads with `load_state_dict(strict=True)` and gives the same numbers.

It is nanogpt2.py with ImageGPT's differences: `diff nanogpt2.py imagegpt.py` shows exactly what they are.
    - ImageGPTLayerNorm: no mean subtraction and no bias, x / sqrt(mean(x^2) + eps) * weight.
    - quick_gelu, x * sigmoid(1.702 x), instead of GPT-2's tanh GELU.
    - The head predicts the 512 colours only, never SOS, and is not tied to the token embeddings.
    - An image classification head that averages the hidden states over all positions.
    - Pixels and tokens: the colour palette, quantising images, PNG reading and writing.

Map of the file (read it top to bottom; the data flows in this order):
    1. Config            ImageGPTConfig (a dataclass), presets, config.json read/write
    2. Building blocks   Conv1D, ImageGPTLayerNorm, activations, head pruning, masks, output dataclasses
    3. Attention         ImageGPTAttention: self/cross, causal mask, KV cache, head mask, two attention cores
    4. MLP and block     ImageGPTMLP, ImageGPTBlock
    5. The model body    ImageGPTModel: embeddings, blocks, final layer norm, input checks
    6. The heads         ImageGPTForCausalImageModeling, ImageGPTForImageClassification
    7. Generation        greedy, sampling (temperature, top-k, top-p), with the cache, from SOS or a prompt
    8. Loading, saving   safetensors read by hand, the hub download, from_pretrained, save_pretrained (+ palette)
    9. Pixels and tokens the palette (OpenAI's, or k-means on your images), quantise, dequantise, PNG files
   10. Command line      `python imagegpt.py sample ...` and `python imagegpt.py complete ...`

Shapes in comments: B batch, T new tokens, P cached (past) tokens, S encoder tokens, C = n_embd,
nh = number of heads, hs = head size (C // nh), V = vocab size (colours + SOS), K = number of colours.

Run the tests with `python -m pytest -q` (see README.md); sample with `python imagegpt.py sample --help`.
"""

import argparse
import hashlib
import json
import math
import os
import re
import struct
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# ----------------------------------------------------------------------------------------------------
# 1. Config
# ----------------------------------------------------------------------------------------------------

# The problem types a classification head can be asked to solve (as Hugging Face names them).
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")


@dataclass
class ImageGPTConfig:
    """Every hyperparameter of an ImageGPT model, with Hugging Face's names and defaults (those of
    openai/imagegpt-small, 76M parameters).

    Fields Hugging Face keeps on its base config class (num_labels, problem_type, ...) are written here
    too, so that one dataclass says everything a model reads. Keys of a config.json that this class does
    not know are kept in `extra` and written back unchanged.
    """

    vocab_size: int = 512 + 1  # 512 colours + the start-of-sequence token (SOS = vocab_size - 1)
    n_positions: int = 32 * 32  # one position per pixel of a 32 x 32 image
    n_embd: int = 512  # width C of the residual stream
    n_layer: int = 24
    n_head: int = 8
    n_inner: Optional[int] = None  # MLP width; None means 4 * n_embd
    activation_function: str = "quick_gelu"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    # Attention options.
    scale_attn_weights: bool = True  # divide scores by sqrt(hs)
    scale_attn_by_inverse_layer_idx: bool = False  # also divide by (layer index + 1), for stability
    reorder_and_upcast_attn: bool = False  # scores and softmax in fp32 even under autocast
    add_cross_attention: bool = False  # a cross-attention sub-block in every block (encoder-decoder use)
    use_cache: bool = True
    # Heads.
    num_labels: int = 2
    problem_type: Optional[str] = None
    tie_word_embeddings: bool = False  # the head predicts K colours, the embedding holds K + 1 tokens
    # Heads removed by prune_heads, {layer: [head, ...]}, so that a saved pruned model rebuilds its shapes.
    pruned_heads: Dict[int, List[int]] = field(default_factory=dict)
    output_attentions: bool = False
    output_hidden_states: bool = False
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.validate()

    # Hugging Face's generic names for the same numbers.
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    # ImageGPT's own numbers.
    @property
    def sos_token_id(self) -> int:
        """The start-of-sequence token: the last row of the token embedding, never predicted by the head."""
        return self.vocab_size - 1

    @property
    def n_colours(self) -> int:
        return self.vocab_size - 1

    @property
    def n_px(self) -> int:
        """The side of the square images the model was trained on (n_positions = n_px * n_px)."""
        side = math.isqrt(self.n_positions)
        if side * side != self.n_positions:
            raise ValueError(f"n_positions={self.n_positions} is not a square number, so it is no n_px x n_px image")
        return side

    def validate(self):
        """Raise a ValueError naming the field, its value and what it should be. Called on creation and by
        every model, so a config edited after creation is checked too."""
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "num_labels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "num_labels" else 1):
                raise ValueError(f"ImageGPTConfig.{name} must be a positive integer, got {value!r}")
        if self.vocab_size < 2:
            raise ValueError(f"ImageGPTConfig.vocab_size is {self.vocab_size}, but it counts the colours + SOS, so "
                             "it must be at least 2 (512 + 1 for OpenAI's palette)")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"ImageGPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): each head "
                f"gets n_embd // n_head channels; try n_head in {[h for h in range(1, 33) if self.n_embd % h == 0]}"
            )
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner < 1):
            raise ValueError(f"ImageGPTConfig.n_inner must be None or a positive integer, got {self.n_inner!r}")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"ImageGPTConfig.activation_function is {self.activation_function!r}, expected one of "
                             f"{sorted(ACTIVATIONS)}")
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"ImageGPTConfig.{name} is a dropout probability in [0, 1), got {value!r}")
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"ImageGPTConfig.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"ImageGPTConfig.problem_type is {self.problem_type!r}, expected one of {PROBLEM_TYPES}")
        if self.tie_word_embeddings:
            raise ValueError(
                "ImageGPTConfig.tie_word_embeddings must be False: the head scores the vocab_size - 1 colours and "
                "the embedding also holds SOS, so the two matrices differ in shape"
            )
        for layer, heads in self.pruned_heads.items():
            if not 0 <= int(layer) < self.n_layer or any(not 0 <= int(h) < self.n_head for h in heads):
                raise ValueError(
                    f"ImageGPTConfig.pruned_heads names layer {layer} heads {list(heads)}, but the model has "
                    f"{self.n_layer} layers of {self.n_head} heads"
                )

    # --- presets and config.json -------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ImageGPTConfig":
        """The config of one of OpenAI's released sizes, e.g. `ImageGPTConfig.from_preset("imagegpt-medium")`
        (or just "medium")."""
        key = name if name in PRESETS else f"imagegpt-{name}"
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}, expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})

    @classmethod
    def from_dict(cls, config_dict: dict) -> "ImageGPTConfig":
        """Build from a Hugging Face config dict. Keys this class does not know are kept in `extra`."""
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in config_dict.items() if k in known}
        extra = {k: v for k, v in config_dict.items() if k not in known and k != "num_labels"}
        if "id2label" in config_dict:  # Hugging Face stores the label names; num_labels is their count
            kwargs["num_labels"] = len(config_dict["id2label"])
        elif "num_labels" in config_dict:
            kwargs["num_labels"] = config_dict["num_labels"]
        if "pruned_heads" in kwargs:  # JSON object keys are strings
            kwargs["pruned_heads"] = {int(k): [int(h) for h in v] for k, v in kwargs["pruned_heads"].items()}
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict:
        """The config as Hugging Face writes it (so transformers reads the same model back)."""
        d = dict(self.extra)
        d.update({f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "num_labels")})
        d["pruned_heads"] = {str(k): list(v) for k, v in self.pruned_heads.items()}
        labels = d.pop("id2label", None)
        if labels is None or len(labels) != self.num_labels:
            labels = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
        d["id2label"] = labels
        d["label2id"] = {name: int(i) for i, name in labels.items()}
        d["model_type"] = "imagegpt"
        return d

    @classmethod
    def from_json_file(cls, path) -> "ImageGPTConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_json_file(self, path):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")


# OpenAI's three released sizes (trained on 32 x 32 ImageNet with the same 512-colour palette).
PRESETS = {
    "imagegpt-small": dict(n_layer=24, n_head=8, n_embd=512),  # iGPT-S, 76M parameters
    "imagegpt-medium": dict(n_layer=36, n_head=8, n_embd=1024),  # iGPT-M, 455M
    "imagegpt-large": dict(n_layer=48, n_head=16, n_embd=1536),  # iGPT-L, 1.4B
}

# ----------------------------------------------------------------------------------------------------
# 2. Building blocks
# ----------------------------------------------------------------------------------------------------


class Conv1D(nn.Module):
    """A linear layer with its weight stored transposed, (in, out), as OpenAI's TensorFlow code stored it.

    The name is historical: it is the 1x1 convolution of the original code, which is just x @ W + b.
    Keeping the (in, out) layout is what lets OpenAI's and Hugging Face's checkpoints load unchanged.
    """

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf  # output features
        self.weight = nn.Parameter(torch.empty(nx, nf))  # (in, out), the transpose of nn.Linear's
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        out_shape = x.shape[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)  # (N, in) @ (in, out) + b
        return x.view(out_shape)


class ImageGPTLayerNorm(nn.Module):
    """ImageGPT's layer norm: x / sqrt(mean(x^2) + eps) * weight, with no mean subtraction and no bias
    (what is now called an RMS norm). OpenAI's image-gpt code normalised this way; a standard LayerNorm
    here changes a pretrained model's outputs completely.

    The reference multiplies by `weight.data`, which hides the weight from autograd, so its layer norm
    weights never train; here they do. The forward numbers are the same.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x):
        rms = torch.sqrt(torch.mean(torch.square(x), dim=-1, keepdim=True) + self.eps)  # (B, T, C) -> (B, T, 1)
        return x / rms * self.weight


def gelu_new(x):
    """GPT-2's GELU: the tanh approximation OpenAI trained GPT-2 with."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def gelu_fast(x):
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def quick_gelu(x):
    """x * sigmoid(1.702 x): the cheaper GELU approximation ImageGPT was trained with (CLIP uses it too).
    It differs from the exact GELU by up to ~0.02, so a pretrained model needs exactly this one."""
    return x * torch.sigmoid(1.702 * x)


# Every activation a config may name, by its Hugging Face name.
ACTIVATIONS = {
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": gelu_fast,
    "gelu": F.gelu,  # exact, with erf
    "quick_gelu": quick_gelu,
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,
    "silu": F.silu,
    "swish": F.silu,
    "mish": F.mish,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "linear": lambda x: x,
}


def find_pruneable_heads_and_indices(heads, n_heads: int, head_size: int, already_pruned: set):
    """Which heads still need pruning, and the channel indices to keep in the remaining width.

    Head numbers are those of the original model; after earlier pruning, a head's channels sit further
    left, by one head size for every smaller head already removed.
    Returns (heads to prune now, LongTensor of kept channel indices within one of q, k or v).
    """
    heads = set(heads) - already_pruned
    keep = torch.ones(n_heads, head_size)  # (nh_now, hs): 1 = keep this channel
    for head in heads:
        head = head - sum(1 for h in already_pruned if h < head)  # position among the heads still here
        keep[head] = 0
    index = torch.arange(len(keep.view(-1)))[keep.view(-1).eq(1)]
    return heads, index


def prune_conv1d_layer(layer: Conv1D, index: torch.Tensor, dim: int = 1) -> Conv1D:
    """A new, smaller Conv1D keeping only `index` along `dim` (0: inputs, 1: outputs) of the weight."""
    index = index.to(layer.weight.device)
    weight = layer.weight.index_select(dim, index).detach().clone()
    bias = layer.bias.detach().clone() if dim == 0 else layer.bias[index].detach().clone()
    new_layer = Conv1D(weight.size(1), weight.size(0)).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new_layer.weight.copy_(weight)
        new_layer.bias.copy_(bias)
    new_layer.weight.requires_grad = layer.weight.requires_grad
    new_layer.bias.requires_grad = layer.bias.requires_grad
    return new_layer


def padding_mask_to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) of 1 = attend, 0 = padding -> (B, 1, 1, S) to add to attention scores.

    Masked keys get the dtype's most negative number, not -inf, so that a row with every key masked
    (a padding query) gives a uniform softmax instead of NaN.
    """
    mask = mask[:, None, None, :].to(dtype)  # (B, S) -> (B, 1, 1, S), broadcasts over heads and queries
    return (1.0 - mask) * torch.finfo(dtype).min


def init_imagegpt_weights(module: nn.Module, config: ImageGPTConfig):
    """ImageGPT's initialisation (GPT-2's), for one module (use with `model.apply`): N(0, 0.02) weights,
    zero biases, unit layer norms, and each residual projection (c_proj) scaled by 1/sqrt(2 * n_layer),
    since every block adds two of them to the residual stream and their variance would otherwise grow
    with depth."""
    if isinstance(module, (nn.Linear, Conv1D)):
        module.weight.data.normal_(mean=0.0, std=config.initializer_range)
        if module.bias is not None:
            module.bias.data.zero_()
    elif isinstance(module, nn.Embedding):
        module.weight.data.normal_(mean=0.0, std=config.initializer_range)
    elif isinstance(module, ImageGPTLayerNorm):
        module.weight.data.fill_(1.0)
    for name, p in module.named_parameters():
        if name == "c_proj.weight":  # ImageGPTAttention.c_proj and ImageGPTMLP.c_proj
            p.data.normal_(mean=0.0, std=config.initializer_range / math.sqrt(2 * config.n_layer))


class ModelOutput:
    """Base of the output dataclasses: attribute access (`out.logits`), and like Hugging Face, indexing
    and `to_tuple()` over the fields that are set (what `return_dict=False` returns)."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]


@dataclass
class BaseModelOutputWithPastAndCrossAttentions(ModelOutput):
    last_hidden_state: torch.Tensor = None  # (B, T, C)
    past_key_values: Optional[Tuple[Tuple[torch.Tensor, torch.Tensor], ...]] = None  # per layer (k, v)
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None  # n_layer + 1 of (B, T, C)
    attentions: Optional[Tuple[torch.Tensor, ...]] = None  # n_layer of (B, nh, T, P + T)
    cross_attentions: Optional[Tuple[torch.Tensor, ...]] = None  # n_layer of (B, nh, T, S)


@dataclass
class CausalLMOutputWithCrossAttentions(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None  # (B, T, V - 1): scores of the colours, never of SOS
    past_key_values: Optional[tuple] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None
    cross_attentions: Optional[tuple] = None


@dataclass
class SequenceClassifierOutputWithPast(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None  # (B, num_labels)
    past_key_values: Optional[tuple] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


# ----------------------------------------------------------------------------------------------------
# 3. Attention
# ----------------------------------------------------------------------------------------------------


class ImageGPTAttention(nn.Module):
    """Multi-head attention: causal self-attention, or (is_cross_attention=True) attention from the
    decoder's tokens to an encoder's outputs. ImageGPT's attention is GPT-2's, unchanged.

    Each pixel's query is compared with every visible key; the softmax of the scores weights the values.
    Self-attention is causal: a pixel sees itself and the pixels before it in raster order (the rows
    above, and the pixels to its left), never after. The keys and values of earlier pixels can be passed
    back in (`layer_past`) so that generating one more pixel costs one pixel's work, not the image's.
    """

    def __init__(self, config: ImageGPTConfig, is_cross_attention: bool = False, layer_idx: Optional[int] = None):
        super().__init__()
        self.embed_dim = config.n_embd
        self.num_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.split_size = self.embed_dim  # width of each of q, k, v (shrinks when heads are pruned)
        self.scale_attn_weights = config.scale_attn_weights
        self.scale_attn_by_inverse_layer_idx = config.scale_attn_by_inverse_layer_idx
        self.reorder_and_upcast_attn = config.reorder_and_upcast_attn
        self.is_cross_attention = is_cross_attention
        self.layer_idx = layer_idx
        if is_cross_attention:
            self.c_attn = Conv1D(2 * self.embed_dim, self.embed_dim)  # keys and values from the encoder
            self.q_attn = Conv1D(self.embed_dim, self.embed_dim)  # queries from the decoder
        else:
            self.c_attn = Conv1D(3 * self.embed_dim, self.embed_dim)  # q, k and v in one matmul
        self.c_proj = Conv1D(self.embed_dim, self.embed_dim)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.pruned_heads = set()
        # bias[0, 0, i, j] is True where query i may see key j (j <= i). Not saved in the state_dict:
        # it is the same for every model of this n_positions.
        causal = torch.tril(torch.ones(config.n_positions, config.n_positions, dtype=torch.bool))
        self.register_buffer("bias", causal.view(1, 1, config.n_positions, config.n_positions), persistent=False)

    def prune_heads(self, heads):
        """Remove whole heads: their columns of c_attn (in q, k and v) and their rows of c_proj.
        (The reference prunes cross-attention as if it held q, k and v; here its k, v and q_attn are pruned.)"""
        heads, index = find_pruneable_heads_and_indices(heads, self.num_heads, self.head_dim, self.pruned_heads)
        if len(heads) == 0:
            return
        index_attn = torch.cat([index + i * self.split_size for i in range(3 if not self.is_cross_attention else 2)])
        self.c_attn = prune_conv1d_layer(self.c_attn, index_attn, dim=1)
        if self.is_cross_attention:
            self.q_attn = prune_conv1d_layer(self.q_attn, index, dim=1)
        self.c_proj = prune_conv1d_layer(self.c_proj, index, dim=0)
        self.num_heads -= len(heads)
        self.split_size = self.head_dim * self.num_heads
        self.pruned_heads = self.pruned_heads.union(heads)

    def score_scale(self) -> float:
        """What q @ k^T is multiplied by. 1/sqrt(hs) keeps the scores' variance near 1 whatever the head
        size, so the softmax does not saturate; the per-layer factor steadies deep models in mixed precision."""
        scale = 1.0 / math.sqrt(self.head_dim) if self.scale_attn_weights else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            scale /= float(self.layer_idx + 1)
        return scale

    def split_heads(self, x):
        B, T, _ = x.size()
        return x.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, T, nh*hs) -> (B, nh, T, hs)

    def forward(
        self,
        hidden_states,
        layer_past=None,
        attention_mask=None,
        head_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        use_cache=False,
        output_attentions=False,
    ):
        """hidden_states (B, T, C); layer_past (k, v) each (B, nh, P, hs); attention_mask (B, 1, 1, P + T)
        additive; head_mask (B or 1, nh, 1, 1) of 0/1. Returns (output (B, T, C), present or None,
        attention weights (B, nh, T, P + T) or None)."""
        B, T, C = hidden_states.size()
        if encoder_hidden_states is not None:
            if not self.is_cross_attention:
                raise ValueError("encoder_hidden_states were given to a self-attention layer")
            query = self.q_attn(hidden_states)  # (B, T, C)
            key, value = self.c_attn(encoder_hidden_states).split(self.split_size, dim=2)  # 2 x (B, S, C)
            attention_mask = encoder_attention_mask  # padding of the encoder's tokens; no causal mask
        else:
            query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)  # 3 x (B, T, C)
        q, k, v = self.split_heads(query), self.split_heads(key), self.split_heads(value)  # (B, nh, T, hs)

        if layer_past is not None:  # prepend the cached keys and values of the P earlier pixels
            past_key, past_value = layer_past
            k = torch.cat((past_key, k), dim=-2)  # (B, nh, P + T, hs)
            v = torch.cat((past_value, v), dim=-2)
        present = (k, v) if use_cache else None

        # One visible `if`: the explicit core when a caller wants the weights or masks heads (or asks for
        # the fp32 upcast path); otherwise PyTorch's fused kernel, which never materialises (T, T) weights.
        if output_attentions or head_mask is not None or self.reorder_and_upcast_attn:
            y, weights = self.explicit_attention(q, k, v, attention_mask, head_mask)
        else:
            y, weights = self.sdpa_attention(q, k, v, attention_mask), None

        y = y.transpose(1, 2).contiguous().view(B, T, self.split_size)  # (B, nh, T, hs) -> (B, T, nh*hs)
        y = self.resid_dropout(self.c_proj(y))  # (B, T, C)
        return y, present, weights

    def explicit_attention(self, q, k, v, attention_mask=None, head_mask=None):
        """softmax(q k^T * scale + mask) v, every step written out. q (B, nh, T, hs), k and v (B, nh, K, hs)."""
        if self.reorder_and_upcast_attn:
            # Scores and softmax in fp32 even under autocast: in fp16, q @ k^T of a deep model overflows.
            # The scale goes in before the matmul ("reorder"), which keeps the products smaller too.
            with torch.autocast(q.device.type, enabled=False):
                scores = torch.matmul(q.float() * self.score_scale(), k.float().transpose(-1, -2))  # (B, nh, T, K)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.score_scale()  # (B, nh, T, K)

        if not self.is_cross_attention:
            # The new T queries are the last T of the P + T positions: query i sits at position P + i.
            T, K = q.size(-2), k.size(-2)
            causal = self.bias[:, :, K - T : K, :K]  # (1, 1, T, K)
            scores = torch.where(causal, scores, torch.finfo(scores.dtype).min)
        if attention_mask is not None:
            scores = scores + attention_mask  # (B, 1, 1, K): padding keys go to the dtype's minimum

        weights = F.softmax(scores, dim=-1).type(v.dtype)  # back to v's dtype under mixed precision
        weights = self.attn_dropout(weights)
        if head_mask is not None:
            weights = weights * head_mask  # (.., nh, 1, 1): a masked head contributes nothing
        return torch.matmul(weights, v), weights  # (B, nh, T, K) @ (B, nh, K, hs) -> (B, nh, T, hs)

    def sdpa_attention(self, q, k, v, attention_mask=None):
        """The same maths through torch.nn.functional.scaled_dot_product_attention (flash or memory-
        efficient kernels on GPUs). The reference ImageGPT has only the explicit core; this one is ours."""
        T, K = q.size(-2), k.size(-2)
        dropout_p = self.attn_dropout.p if self.training else 0.0
        scale = self.score_scale()
        if attention_mask is not None:
            # The kernel wants the mask in q's dtype. Clamp first: float32's minimum is -inf in bfloat16,
            # and a row of -inf (a padding query) would softmax to NaN.
            attention_mask = attention_mask.clamp(min=torch.finfo(q.dtype).min).to(q.dtype)
        if self.is_cross_attention:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout_p, scale=scale)
        if attention_mask is None and T == K:  # no cache, no padding: the kernel's own causal mask
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale)
        if attention_mask is None and T == 1:  # one new pixel sees every cached one: nothing to mask
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
        # With a cache (T < K) the causal mask is the bottom-right corner of the full one, which is_causal
        # (top-left) does not give, so pass it in, with the padding mask added. Future keys get -inf and
        # padding keys the dtype's minimum, so every row scores exactly as in the explicit core.
        causal = self.bias[:, :, K - T : K, :K]  # (1, 1, T, K)
        padding = attention_mask if attention_mask is not None else torch.zeros((), dtype=q.dtype, device=q.device)
        mask = torch.where(causal, padding, float("-inf"))  # (B or 1, 1, T, K)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


# ----------------------------------------------------------------------------------------------------
# 4. MLP and block
# ----------------------------------------------------------------------------------------------------


class ImageGPTMLP(nn.Module):
    """Position-wise feed-forward: C -> n_inner (4C) -> activation (quick_gelu) -> C."""

    def __init__(self, intermediate_size: int, config: ImageGPTConfig):
        super().__init__()
        self.c_fc = Conv1D(intermediate_size, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, intermediate_size)
        self.act = ACTIVATIONS[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class ImageGPTBlock(nn.Module):
    """One transformer block, pre-norm: x + attn(ln_1(x)), [+ cross_attn(ln_cross_attn(x))], + mlp(ln_2(x)).

    GPT-2's block with ImageGPT's layer norm (no mean subtraction, no bias). The residual stream itself is
    never normalised until ln_f, and gradients flow straight through it.
    """

    def __init__(self, config: ImageGPTConfig, layer_idx: Optional[int] = None):
        super().__init__()
        inner_dim = config.n_inner if config.n_inner is not None else 4 * config.n_embd
        self.ln_1 = ImageGPTLayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = ImageGPTAttention(config, layer_idx=layer_idx)
        self.ln_2 = ImageGPTLayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        if config.add_cross_attention:
            self.crossattention = ImageGPTAttention(config, is_cross_attention=True, layer_idx=layer_idx)
            self.ln_cross_attn = ImageGPTLayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = ImageGPTMLP(inner_dim, config)

    def forward(
        self,
        hidden_states,
        layer_past=None,
        attention_mask=None,
        head_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        use_cache=False,
        output_attentions=False,
    ):
        """Returns (hidden_states (B, T, C), present (k, v) or None, self-attention weights or None,
        cross-attention weights or None)."""
        attn_out, present, self_weights = self.attn(
            self.ln_1(hidden_states),
            layer_past=layer_past,
            attention_mask=attention_mask,
            head_mask=head_mask,
            use_cache=use_cache,
            output_attentions=output_attentions,
        )
        hidden_states = hidden_states + attn_out

        cross_weights = None
        if encoder_hidden_states is not None:
            # The encoder's keys and values are recomputed every call, never cached: they do not grow.
            cross_out, _, cross_weights = self.crossattention(
                self.ln_cross_attn(hidden_states),
                head_mask=head_mask,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                output_attentions=output_attentions,
            )
            hidden_states = hidden_states + cross_out

        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))
        return hidden_states, present, self_weights, cross_weights


# ----------------------------------------------------------------------------------------------------
# 5. The model body
# ----------------------------------------------------------------------------------------------------


def _shape_error(name, got, expected, fix=""):
    return ValueError(f"{name} has shape {tuple(got)}, expected {expected}" + (f" ({fix})" if fix else ""))


def _check_indices(name, ids, limit, limit_name="vocab_size", what="token id"):
    """Token ids (and other indices) must be integers in [0, limit): an embedding lookup outside it
    crashes on the CPU and corrupts silently or asserts on a GPU."""
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must be an integer tensor, got dtype {ids.dtype}")
    if ids.numel() > 0:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= limit:
            bad = low if low < 0 else high
            raise ValueError(f"{name} holds {what} {bad}, but {limit_name} is {limit} ({what}s must be in [0, {limit}))")


class ImageGPTModel(nn.Module):
    """The ImageGPT body: token (colour) + position (pixel) embeddings, n_layer blocks, a final layer norm.
    It returns the last hidden states (B, T, C); the heads below turn them into predictions."""

    def __init__(self, config: ImageGPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embed_dim = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # colour (and SOS) embeddings, (V, C)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)  # pixel position embeddings, (n_positions, C)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([ImageGPTBlock(config, layer_idx=i) for i in range(config.n_layer)])
        self.ln_f = ImageGPTLayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.palette = None  # (K, 3) colours in [-1, 1], set by from_pretrained; not part of the state_dict
        self.apply(lambda module: init_imagegpt_weights(module, config))
        if config.pruned_heads:  # a config saved from a pruned model rebuilds the pruned shapes
            self.prune_heads({layer: heads for layer, heads in config.pruned_heads.items()})

    @property
    def dtype(self):
        return self.wte.weight.dtype

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    def prune_heads(self, heads_to_prune: Dict[int, List[int]]):
        """Remove attention heads, {layer: [heads]}, numbered as in the unpruned model. Pruning a head twice
        is a no-op. The config records them, so a saved model rebuilds the same shapes."""
        for layer, heads in heads_to_prune.items():
            if not 0 <= layer < self.config.n_layer or any(not 0 <= h < self.config.n_head for h in heads):
                raise ValueError(
                    f"prune_heads got layer {layer} heads {list(heads)}; layers are 0..{self.config.n_layer - 1} "
                    f"and heads 0..{self.config.n_head - 1}"
                )
            if len(set(heads) | self.h[layer].attn.pruned_heads) >= self.config.n_head:
                raise ValueError(f"prune_heads would remove every head of layer {layer}; keep at least one")
        for layer, heads in heads_to_prune.items():
            self.h[layer].attn.prune_heads(heads)
            pruned = sorted(self.h[layer].attn.pruned_heads)
            if pruned:
                self.config.pruned_heads[layer] = pruned

    def gradient_checkpointing_enable(self):
        """Trade compute for memory when training: keep only each block's input, recompute its insides
        during the backward pass."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.gradient_checkpointing = False

    # --- forward -------------------------------------------------------------------------------------

    def check_inputs(
        self, input_ids, inputs_embeds, past_key_values, attention_mask, token_type_ids, position_ids, head_mask,
        encoder_hidden_states, encoder_attention_mask,
    ):
        """Every shape and range the forward pass relies on, checked before any work, so a mistake gives a
        clear message instead of a broadcast that silently does the wrong thing or an error deep in torch."""
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) or inputs_embeds (B, T, C)")
        if input_ids is not None:
            if input_ids.dim() < 1:
                raise _shape_error("input_ids", input_ids.shape, "(B, T)")
            _check_indices("input_ids", input_ids, cfg.vocab_size)
            input_shape = tuple(input_ids.shape)
        else:
            if inputs_embeds.dim() < 2 or inputs_embeds.size(-1) != cfg.n_embd:
                raise _shape_error("inputs_embeds", inputs_embeds.shape, f"(B, T, {cfg.n_embd})")
            input_shape = tuple(inputs_embeds.shape[:-1])
        T = input_shape[-1]
        batch = math.prod(input_shape[:-1])
        past_length = 0
        if past_key_values is not None:
            if len(past_key_values) != cfg.n_layer:
                raise ValueError(f"past_key_values has {len(past_key_values)} layers, the model has {cfg.n_layer}")
            past_length = past_key_values[0][0].size(-2)
            for i, (k, v) in enumerate(past_key_values):
                nh = self.h[i].attn.num_heads
                expected = (batch, nh, past_length, cfg.n_embd // cfg.n_head)
                if tuple(k.shape) != expected or tuple(v.shape) != expected:
                    raise _shape_error(f"past_key_values[{i}]", k.shape, f"(B, nh, P, hs) = {expected}")
        if past_length + T > cfg.n_positions:
            raise ValueError(
                f"the sequence is {past_length + T} tokens long ({past_length} cached + {T} new), but the model "
                f"has n_positions={cfg.n_positions}; crop the input to its last {cfg.n_positions - past_length} tokens"
            )
        if attention_mask is not None:
            expected = input_shape[:-1] + (past_length + T,)
            if tuple(attention_mask.shape) != expected:
                raise _shape_error("attention_mask", attention_mask.shape, expected, "1 per cached and new token")
            if not torch.all((attention_mask == 0) | (attention_mask == 1)):
                raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        if token_type_ids is not None:
            if tuple(token_type_ids.shape) != input_shape:
                raise _shape_error("token_type_ids", token_type_ids.shape, input_shape)
            _check_indices("token_type_ids", token_type_ids, cfg.vocab_size)
        if position_ids is not None:
            if position_ids.size(-1) != T or position_ids.dim() > len(input_shape):
                raise _shape_error("position_ids", position_ids.shape, f"(T,), (1, T) or (B, T) with T={T}")
            _check_indices("position_ids", position_ids, cfg.n_positions, "n_positions", "position")
        if head_mask is not None:
            if tuple(head_mask.shape) not in ((cfg.n_head,), (cfg.n_layer, cfg.n_head)):
                raise _shape_error("head_mask", head_mask.shape, f"({cfg.n_head},) or ({cfg.n_layer}, {cfg.n_head})")
            if any(block.attn.pruned_heads for block in self.h):
                raise ValueError("head_mask cannot be combined with pruned heads; mask or prune, not both")
        if encoder_hidden_states is not None:
            if not cfg.add_cross_attention:
                raise ValueError(
                    "encoder_hidden_states were given, but this model has no cross-attention; build it with "
                    "ImageGPTConfig(add_cross_attention=True)"
                )
            if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] != batch or \
                    encoder_hidden_states.shape[2] != cfg.n_embd:
                raise _shape_error("encoder_hidden_states", encoder_hidden_states.shape, f"(B={batch}, S, {cfg.n_embd})")
            if encoder_attention_mask is not None and \
                    tuple(encoder_attention_mask.shape) != tuple(encoder_hidden_states.shape[:2]):
                raise _shape_error("encoder_attention_mask", encoder_attention_mask.shape,
                                   tuple(encoder_hidden_states.shape[:2]))
        elif encoder_attention_mask is not None:
            raise ValueError("encoder_attention_mask was given without encoder_hidden_states")
        return input_shape, past_length

    def forward(
        self,
        input_ids=None,
        past_key_values=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=True,
    ):
        cfg = self.config
        use_cache = cfg.use_cache if use_cache is None else use_cache
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        input_shape, past_length = self.check_inputs(
            input_ids, inputs_embeds, past_key_values, attention_mask, token_type_ids, position_ids, head_mask,
            encoder_hidden_states, encoder_attention_mask,
        )
        T = input_shape[-1]
        if self.gradient_checkpointing and self.training:
            use_cache = False  # the cache would hold activations checkpointing is trying not to keep

        # Leading dimensions beyond the batch are flattened into one batch, as the reference does.
        if input_ids is not None:
            input_ids = input_ids.reshape(-1, T)  # (..., T) -> (B, T)
            inputs_embeds = self.wte(input_ids.to(self.wte.weight.device))  # (B, T, C)
        else:
            inputs_embeds = inputs_embeds.reshape(-1, T, self.embed_dim)
        device = inputs_embeds.device
        if position_ids is None:  # the new pixels continue after the P cached ones
            position_ids = torch.arange(past_length, past_length + T, device=device).unsqueeze(0)  # (1, T)
        else:
            position_ids = position_ids.reshape(-1, T).to(device)
        hidden_states = inputs_embeds + self.wpe(position_ids)  # (B, T, C) + (B or 1, T, C)
        if token_type_ids is not None:  # as GPT-2: no segment table, segments reuse the token embeddings
            hidden_states = hidden_states + self.wte(token_type_ids.reshape(-1, T).to(device))
        hidden_states = self.drop(hidden_states)

        if attention_mask is not None:  # (..., P + T) of 0/1 -> (B, 1, 1, P + T) additive
            attention_mask = padding_mask_to_additive(attention_mask.reshape(-1, past_length + T), self.dtype)
        if encoder_hidden_states is not None:
            if encoder_attention_mask is None:
                encoder_attention_mask = torch.ones(encoder_hidden_states.shape[:2], device=device)
            encoder_attention_mask = padding_mask_to_additive(encoder_attention_mask, self.dtype)  # (B, 1, 1, S)
        if head_mask is not None:  # (nh,) or (n_layer, nh) -> (n_layer, 1, nh, 1, 1) of 0/1 factors
            head_mask = head_mask.to(self.dtype).expand(cfg.n_layer, -1)[:, None, :, None, None]

        presents = () if use_cache else None
        all_hidden_states = () if output_hidden_states else None
        all_self_attentions = () if output_attentions else None
        all_cross_attentions = () if output_attentions and cfg.add_cross_attention else None
        for i, block in enumerate(self.h):
            layer_past = past_key_values[i] if past_key_values is not None else None
            layer_inputs = [
                a.to(hidden_states.device) if isinstance(a, torch.Tensor) else a
                for a in (attention_mask, head_mask[i] if head_mask is not None else None,
                          encoder_hidden_states, encoder_attention_mask)
            ]
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if self.gradient_checkpointing and self.training:
                outputs = torch.utils.checkpoint.checkpoint(
                    block, hidden_states, None, *layer_inputs, False, output_attentions, use_reentrant=False
                )
            else:
                outputs = block(hidden_states, layer_past, *layer_inputs, use_cache, output_attentions)
            hidden_states, present, self_weights, cross_weights = outputs
            if use_cache:
                presents += (present,)
            if output_attentions:
                all_self_attentions += (self_weights,)
                if cfg.add_cross_attention:
                    all_cross_attentions += (cross_weights,)

        hidden_states = self.ln_f(hidden_states)
        hidden_states = hidden_states.view(input_shape + (hidden_states.size(-1),))  # (..., T, C)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        out = BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states,
            past_key_values=presents,
            hidden_states=all_hidden_states,
            attentions=all_self_attentions,
            cross_attentions=all_cross_attentions,
        )
        return out if return_dict else out.to_tuple()


# ----------------------------------------------------------------------------------------------------
# 6. The heads
# ----------------------------------------------------------------------------------------------------


def shifted_lm_loss(logits, labels):
    """Next-pixel cross-entropy: position t's logits predict labels[t + 1]. Labels of -100 are ignored
    (padding, or a prompt the loss should not count)."""
    shift_logits = logits[..., :-1, :].contiguous()  # (..., T - 1, V - 1): every position but the last...
    shift_labels = labels[..., 1:].contiguous().to(logits.device)  # (..., T - 1): ...predicts the next label
    return F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1), ignore_index=-100)


class ImageGPTForCausalImageModeling(nn.Module):
    """ImageGPT with its next-pixel head: logits over the K = vocab_size - 1 colours for the next pixel.

    Unlike GPT-2's, the head is not tied to the token embeddings, and it has no row for SOS: SOS only
    ever starts a sequence, so the model is never asked to predict it.
    """

    def __init__(self, config: ImageGPTConfig):
        super().__init__()
        self.config = config
        self.transformer = ImageGPTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size - 1, bias=False)  # colours only, no SOS
        init_imagegpt_weights(self.lm_head, config)
        self.palette = None  # (K, 3) colours in [-1, 1], set by from_pretrained; not part of the state_dict

    def get_output_embeddings(self):
        return self.lm_head

    def prune_heads(self, heads_to_prune):
        self.transformer.prune_heads(heads_to_prune)

    def forward(
        self,
        input_ids=None,
        past_key_values=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=True,
    ):
        """labels (B, T): usually input_ids itself (SOS first); the shift happens inside, so the label at
        position 0 is never read. Returns loss, logits (B, T, V - 1), ..."""
        if labels is not None:
            shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
            if tuple(labels.shape) != tuple(shape):
                raise _shape_error("labels", labels.shape, tuple(shape), "one label per input token")
            predicted = labels[..., 1:]
            _check_indices("labels (after the first position)", predicted[predicted != -100],
                           self.config.vocab_size - 1, "the number of colours", "colour")
        body = self.transformer(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
            token_type_ids=token_type_ids, position_ids=position_ids, head_mask=head_mask,
            inputs_embeds=inputs_embeds, encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
        )
        logits = self.lm_head(body.last_hidden_state)  # (B, T, C) -> (B, T, V - 1)
        loss = shifted_lm_loss(logits, labels) if labels is not None else None
        out = CausalLMOutputWithCrossAttentions(
            loss=loss, logits=logits, past_key_values=body.past_key_values, hidden_states=body.hidden_states,
            attentions=body.attentions, cross_attentions=body.cross_attentions,
        )
        return out if return_dict else out.to_tuple()

    def generate(self, input_ids=None, **kwargs):
        """Sample or complete images; see generate() in section 7 for every option."""
        return generate(self, input_ids, **kwargs)


def classification_loss(logits, labels, num_labels, problem_type):
    """The loss a classification head trains with. Without a problem_type, it is inferred as the
    reference does: one label means regression (MSE), integer labels mean one class per example
    (cross-entropy), float labels mean several classes at once (binary cross-entropy per class)."""
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    labels = labels.to(logits.device)
    if problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
        return F.mse_loss(logits, labels.to(logits.dtype))
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class ImageGPTForImageClassification(nn.Module):
    """A label (or a number) for a whole image, from the average of the hidden states over all its pixels.

    (GPT-2's sequence classifier reads the last token instead; ImageGPT's paper found averaged features
    classify better. The average includes padding positions, as in the reference: pad nothing, or pool
    the hidden states yourself.)
    """

    def __init__(self, config: ImageGPTConfig):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.transformer = ImageGPTModel(config)
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        init_imagegpt_weights(self.score, config)
        self.palette = None  # (K, 3) colours in [-1, 1], set by from_pretrained; not part of the state_dict

    def prune_heads(self, heads_to_prune):
        self.transformer.prune_heads(heads_to_prune)

    def forward(
        self,
        input_ids=None,
        past_key_values=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=True,
    ):
        """labels (B,): class ids, or floats for regression; (B, num_labels) floats for multi-label."""
        if labels is not None and labels.dim() > 0 and labels.dtype in (torch.long, torch.int) and \
                self.num_labels > 1 and self.config.problem_type in (None, "single_label_classification"):
            _check_indices("labels", labels, self.num_labels, "num_labels", "class")
        body = self.transformer(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
            token_type_ids=token_type_ids, position_ids=position_ids, head_mask=head_mask,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        pooled = body.last_hidden_state.mean(dim=1)  # (B, T, C) -> (B, C): the average over all pixels
        logits = self.score(pooled)  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = classification_loss(logits, labels, self.num_labels, self.config.problem_type)
        out = SequenceClassifierOutputWithPast(
            loss=loss, logits=logits, past_key_values=body.past_key_values,
            hidden_states=body.hidden_states, attentions=body.attentions,
        )
        return out if return_dict else out.to_tuple()


HEAD_CLASSES = (ImageGPTModel, ImageGPTForCausalImageModeling, ImageGPTForImageClassification)

# ----------------------------------------------------------------------------------------------------
# 7. Generation
# ----------------------------------------------------------------------------------------------------


def top_k_filter(logits, k: int):
    """Keep the k largest logits of each row; the rest become -inf (probability 0). Ties at the k-th
    value are all kept."""
    k = min(k, logits.size(-1))
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits, p: float):
    """Nucleus sampling: keep the smallest set of most likely colours whose probabilities sum to at least
    p; the rest become -inf. The most likely colour is always kept."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)  # least likely first
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, K)
    remove_sorted = cumulative <= (1 - p)  # the unlikely tail whose total mass is at most 1 - p
    remove_sorted[..., -1:] = False  # always keep the most likely colour
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)  # back to palette order
    return logits.masked_fill(remove, float("-inf"))


def _check_generate_args(model, input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, num_samples):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a LongTensor of shape (B, T), got {shape}")
    if input_ids.size(1) == 0:
        raise ValueError(f"input_ids is empty: start each row with the SOS token ({model.config.sos_token_id}), "
                         "or pass input_ids=None to sample from SOS")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    # The last new token is sampled but never fed back, so it needs no position: SOS + n_positions pixels fit.
    total = input_ids.size(1) + max_new_tokens
    if total > model.config.n_positions + 1:
        raise ValueError(
            f"prompt ({input_ids.size(1)} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
            f"n_positions + 1 = {model.config.n_positions + 1} (SOS + one token per pixel); ask for fewer tokens"
        )
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r} (use do_sample=False for greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    _check_indices("input_ids", input_ids, model.config.vocab_size)


@torch.no_grad()
def generate(
    model: "ImageGPTForCausalImageModeling",
    input_ids=None,
    max_new_tokens: Optional[int] = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    num_samples: int = 1,
    generator: Optional[torch.Generator] = None,
    on_token=None,
):
    """Continue each prompt pixel by pixel, reusing the key/value cache so every step runs the model on
    one new token only.

    input_ids (B, T): the prompts, each starting with SOS (vocab_size - 1) followed by the pixels already
    known (the top rows of an image, in raster order); None means one prompt of just SOS, an
    unconditional sample. Each prompt is continued num_samples times (rows grouped by prompt).
    max_new_tokens defaults to what completes the image: n_positions + 1 - T.
    Greedy by default (the most likely colour each step); do_sample=True samples from
    softmax(logits / temperature), optionally restricted to the top_k colours and/or the top_p nucleus,
    using `generator` for reproducible draws. on_token(tokens (B,)) is called after each step, for progress.
    Returns a LongTensor (B * num_samples, T + max_new_tokens); drop the first column (SOS) to get pixels.
    """
    device = model.transformer.wte.weight.device
    if input_ids is None:
        input_ids = torch.full((1, 1), model.config.sos_token_id, dtype=torch.long)
    if max_new_tokens is None and isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
        max_new_tokens = model.config.n_positions + 1 - input_ids.size(1)
    _check_generate_args(model, input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, num_samples)
    was_training = model.training
    model.eval()  # no dropout while generating
    tokens = input_ids.to(device).repeat_interleave(num_samples, dim=0)  # (B * num_samples, T)
    try:
        past, step_input = None, tokens
        for _ in range(max_new_tokens):
            out = model(step_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()  # (B, K): the prediction for the next pixel
            if do_sample:
                logits = logits / temperature
                if top_k is not None:
                    logits = top_k_filter(logits, top_k)
                if top_p is not None:
                    logits = top_p_filter(logits, top_p)
                probs = F.softmax(logits, dim=-1)
                next_tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)  # (B,)
            else:
                next_tokens = logits.argmax(dim=-1)  # (B,)
            tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
            if on_token is not None:
                on_token(next_tokens)
            step_input = next_tokens[:, None]  # (B, 1)
        return tokens
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------
# 8. Loading and saving
# ----------------------------------------------------------------------------------------------------
# A Hugging Face model directory holds config.json and the weights: model.safetensors (or several
# shards listed in model.safetensors.index.json), or the older pytorch_model.bin (what the openai/imagegpt-*
# repositories hold). ImageGPT's directories also keep the palette: preprocessor_config.json ("clusters",
# Hugging Face's layout) or kmeans_centers.npy (OpenAI's). safetensors is simple enough to read by hand:
#     8 bytes      N, the header's length (unsigned little-endian)
#     N bytes      JSON: {"name": {"dtype": "F32", "shape": [512, 1536], "data_offsets": [begin, end]}, ...}
#     the rest     every tensor's raw little-endian bytes, at [begin, end) counted from the end of the header

SAFETENSORS_DTYPES = {  # name in the header -> (numpy dtype to read the bytes as, torch dtype)
    "F64": ("<f8", torch.float64), "F32": ("<f4", torch.float32), "F16": ("<f2", torch.float16),
    "BF16": ("<u2", torch.bfloat16),  # numpy has no bfloat16: read the 16-bit patterns, reinterpret in torch
    "I64": ("<i8", torch.int64), "I32": ("<i4", torch.int32), "I16": ("<i2", torch.int16),
    "I8": ("i1", torch.int8), "U8": ("u1", torch.uint8), "BOOL": ("u1", torch.bool),
}
TORCH_TO_SAFETENSORS = {torch_dtype: name for name, (_, torch_dtype) in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the format's own limit; a larger "length" means a corrupt file


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupt, or not matching the model."""


class _atomic_path:
    """`with _atomic_path(path) as tmp:` write to tmp; on success it is renamed onto path in one step, so
    a reader (or an interrupted run) never sees half a file; on failure tmp is removed."""

    def __init__(self, path):
        self.path = os.fspath(path)

    def __enter__(self):
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, self.tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(self.path) + ".", suffix=".tmp")
        os.close(fd)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            os.replace(self.tmp, self.path)
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)
        return False


def _write_atomically(path, data: bytes):
    with _atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def read_safetensors_header(path) -> Tuple[dict, int]:
    """(header dict, offset of the data section). Every claim the header makes is checked against the
    file before any tensor is read, so a lying header gives an error, never an out-of-bounds read."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file (truncated?)")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path}: header claims {n} bytes but the file has {size} (truncated or corrupt)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, absurd numbers or nesting
            raise CheckpointError(f"{path}: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is a {type(header).__name__}, expected a JSON object")
    data_size = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype") if isinstance(info, dict) else info
        if not isinstance(info, dict) or not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype!r}, expected one of "
                                  f"{sorted(SAFETENSORS_DTYPES)}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        itemsize = np.dtype(SAFETENSORS_DTYPES[dtype][0]).itemsize
        if (not isinstance(shape, list) or len(shape) > 64 or not all(type(d) is int and d >= 0 for d in shape)
                or math.prod(max(d, 1) for d in shape) * itemsize >= 2 ** 63):  # numpy's limits
            raise CheckpointError(f"{path}: tensor {name!r} has shape {shape!r}, expected a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise CheckpointError(f"{path}: tensor {name!r} has data_offsets {offsets!r}, outside the "
                                  f"{data_size} data bytes (truncated or corrupt)")
        if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} of shape {shape} and dtype {info['dtype']} needs "
                                  f"{math.prod(shape) * itemsize} bytes, its offsets span {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap in the data section (corrupt file)")
    return header, 8 + n


def load_safetensors(path) -> Dict[str, torch.Tensor]:
    """Read a .safetensors file with numpy (memory-mapped) into CPU tensors."""
    header, data_start = read_safetensors_header(path)
    tensors = {}
    if os.path.getsize(path) == data_start:  # only empty tensors (np.memmap cannot map zero bytes)
        data = np.zeros(0, dtype=np.uint8)
    else:
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        np_dtype, torch_dtype = SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        array = np.frombuffer(data[begin:end], dtype=np_dtype).reshape(info["shape"])
        tensor = torch.from_numpy(array.copy())  # copy: own the memory, let the file close
        if torch_dtype in (torch.bfloat16, torch.bool):
            tensor = tensor.view(torch_dtype) if torch_dtype == torch.bfloat16 else tensor.bool()
        tensors[name] = tensor
    del data
    return tensors


def save_safetensors(tensors: Dict[str, torch.Tensor], path, metadata: Optional[dict] = None):
    """Write tensors as .safetensors (atomically: a temporary file renamed at the end)."""
    header, chunks, offset = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in TORCH_TO_SAFETENSORS:
            raise TypeError(f"cannot save tensor {name!r} of dtype {t.dtype} as safetensors")
        raw = (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t.to(torch.uint8) if t.dtype == torch.bool
               else t).numpy().tobytes()
        header[name] = {"dtype": TORCH_TO_SAFETENSORS[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # pad so the data starts 8-byte aligned
    with _atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header_bytes)))
            f.write(header_bytes)
            for raw in chunks:
                f.write(raw)


# Short names of the released checkpoints -> their Hugging Face hub repositories.
HUB_NAMES = {
    "imagegpt-small": "openai/imagegpt-small",
    "imagegpt-medium": "openai/imagegpt-medium",
    "imagegpt-large": "openai/imagegpt-large",
}


def cache_dir() -> str:
    return os.environ.get("NANOGPT2_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nanogpt2")


def hub_url(repo_id: str, filename: str) -> str:
    base = os.environ.get("NANOGPT2_HUB_URL", "https://huggingface.co").rstrip("/")
    return f"{base}/{repo_id}/resolve/main/{filename}"


def _progress(desc: str, done: int, total: Optional[int], start: float):
    rate = done / max(time.time() - start, 1e-6) / 1e6
    of = f" / {total / 1e6:.1f} MB ({100 * done / total:.0f}%)" if total else " MB"
    sys.stderr.write(f"\r{desc}: {done / 1e6:.1f}{of}, {rate:.1f} MB/s   ")
    sys.stderr.flush()


def download(url: str, dest: str, desc: Optional[str] = None, quiet: bool = False) -> str:
    """Fetch url to dest, resumably and atomically. Bytes go to dest + ".part", continued with an HTTP
    Range request when a previous try was cut off; only a complete file is renamed to dest, so a partial
    download never looks like a cached one. When the server gives the file's SHA-256 (the hub's ETag for
    large files) it is checked, and a corrupted file is deleted."""
    if os.path.exists(dest):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"User-Agent": "nanogpt2"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    desc = desc or os.path.basename(dest)
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the .part is already complete (or longer than the file): start over
            os.remove(part)
            return download(url, dest, desc, quiet)
        raise
    with response:
        if have and response.status != 206:  # the server ignored the Range header: start from zero
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        etag = (response.headers.get("X-Linked-Etag") or response.headers.get("ETag") or "").strip('"').lower()
        start, done, last_report = time.time(), have, 0.0
        with open(part, "ab" if have else "wb") as f:
            while True:
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                f.write(chunk)
                done += len(chunk)
                if not quiet and time.time() - last_report > 0.2:
                    _progress(f"downloading {desc}", done, total, start)
                    last_report = time.time()
    if not quiet:
        _progress(f"downloading {desc}", done, total, start)
        sys.stderr.write("\n")
    if total is not None and done != total:
        raise CheckpointError(f"download of {url} stopped at {done} of {total} bytes; run again to resume")
    if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag):
        sha = hashlib.sha256()
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                sha.update(block)
        if sha.hexdigest() != etag:
            os.remove(part)
            raise CheckpointError(f"download of {url} is corrupt: sha256 {sha.hexdigest()}, expected {etag}; "
                                  "run again to download it afresh")
    os.replace(part, dest)
    return dest


def _download_if_present(repo_id: str, filename: str, local: str) -> bool:
    """Download one file of a hub repository; False (not an error) when the repository has no such file."""
    try:
        download(hub_url(repo_id, filename), os.path.join(local, filename))
        return True
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise
        return False


def resolve_checkpoint(name_or_dir: str) -> str:
    """A local directory as it is; a released name (imagegpt-small, ...) or hub repo id (owner/name)
    downloaded into the cache unless already there: config.json, the weights (model.safetensors, its
    shards, or pytorch_model.bin, whichever the repository has) and the palette (preprocessor_config.json)."""
    if os.path.isdir(name_or_dir):
        return name_or_dir
    repo_id = HUB_NAMES.get(name_or_dir, name_or_dir)
    looks_like_repo = re.fullmatch(r"[\w-][\w.-]*/[\w-][\w.-]*", name_or_dir) and ".." not in name_or_dir
    if name_or_dir not in HUB_NAMES and not looks_like_repo:  # ./ckpt or ../ckpt: a mistyped local path
        raise CheckpointError(
            f"model {name_or_dir!r} is neither a directory nor a known name ({', '.join(HUB_NAMES)}) nor a hub "
            "repository id like openai/imagegpt-small"
        )
    local = os.path.join(cache_dir(), *repo_id.split("/"))
    weight_files = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    try:
        download(hub_url(repo_id, "config.json"), os.path.join(local, "config.json"))
        if not any(os.path.exists(os.path.join(local, f)) for f in weight_files):
            # The first layout the repository has; the openai/imagegpt-* repositories hold pytorch_model.bin.
            if not _download_if_present(repo_id, "model.safetensors", local):
                if _download_if_present(repo_id, "model.safetensors.index.json", local):
                    with open(os.path.join(local, "model.safetensors.index.json"), encoding="utf-8") as f:
                        for shard in sorted(set(json.load(f)["weight_map"].values())):
                            download(hub_url(repo_id, shard), os.path.join(local, shard))
                elif not _download_if_present(repo_id, "pytorch_model.bin", local):
                    raise CheckpointError(f"{repo_id} has no model.safetensors, sharded index or pytorch_model.bin")
        if not any(os.path.exists(os.path.join(local, f)) for f in PALETTE_FILES):
            _download_if_present(repo_id, "preprocessor_config.json", local)  # the palette, if it has one
    except (urllib.error.URLError, OSError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(
            f"could not download {name_or_dir} from {hub_url(repo_id, '')} ({getattr(e, 'reason', e)}). "
            f"To use it offline, put its config.json, model.safetensors and preprocessor_config.json (or "
            f"kmeans_centers.npy) in {local} (or pass a local directory holding them)"
        ) from None
    return local


def load_state_dict_files(directory: str) -> Dict[str, torch.Tensor]:
    """The weights of a model directory, whichever of the four Hugging Face layouts it uses."""
    for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                    ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        single, index = os.path.join(directory, single_name), os.path.join(directory, index_name)
        if os.path.exists(single):
            files = [single]
        elif os.path.exists(index):  # shards: the index maps every tensor name to its file
            with open(index, encoding="utf-8") as f:
                files = [os.path.join(directory, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
        else:
            continue
        state_dict = {}
        for path in files:
            if not os.path.exists(path):
                raise CheckpointError(f"{path} is listed in {index_name} but missing")
            if path.endswith(".safetensors"):
                state_dict.update(load_safetensors(path))
            else:  # weights_only: a .bin is a pickle, and a pickle can run code; this refuses anything but tensors
                try:
                    loaded = torch.load(path, map_location="cpu", weights_only=True)
                except Exception as e:
                    raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint of tensors "
                                          f"({type(e).__name__}): truncated, corrupt or unsafe") from None
                if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
                    raise CheckpointError(f"{path} holds a {type(loaded).__name__}, expected a dict of tensors")
                state_dict.update(loaded)
        return state_dict
    raise CheckpointError(f"{directory} holds no weights: expected model.safetensors, pytorch_model.bin or a "
                          "sharded index of either")


# Keys that heads other than the one being loaded may bring along, and buffers older checkpoints saved.
OTHER_HEAD_PREFIXES = ("lm_head.", "score.")
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".crossattention.bias", ".crossattention.masked_bias")


def match_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a checkpoint's keys to the model's (checkpoints of the body have no "transformer." prefix,
    checkpoints of a head do), drop what the model does not need, and check the rest: every missing or
    unexpected key and every shape mismatch is listed in one error."""
    expected = model.state_dict()
    is_body = isinstance(model, ImageGPTModel)
    renamed = {}
    for key, tensor in state_dict.items():
        if key.endswith(IGNORED_SUFFIXES):
            continue
        if is_body and key.startswith("transformer."):
            key = key[len("transformer."):]
        elif not is_body and not key.startswith("transformer.") and not key.startswith(OTHER_HEAD_PREFIXES):
            key = "transformer." + key
        renamed[key] = tensor
    missing = [k for k in expected if k not in renamed
               and (is_body or k.startswith("transformer."))]  # a head's own weights may start fresh
    unexpected = [k for k in renamed if k not in expected and not k.startswith(OTHER_HEAD_PREFIXES)]
    mismatched = [f"{k}: checkpoint {tuple(renamed[k].shape)}, model {tuple(expected[k].shape)}"
                  for k in renamed if k in expected and renamed[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"missing keys: {missing}"] * bool(missing) + [f"unexpected keys: {unexpected}"] * bool(unexpected)
        lines += [f"shape mismatches: {mismatched}"] * bool(mismatched)
        raise CheckpointError("the checkpoint does not fit " + type(model).__name__ + ": " + "; ".join(lines))
    return {k: v for k, v in renamed.items() if k in expected}


def parse_dtype(dtype) -> Optional[torch.dtype]:
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(names)}")
    return names[dtype]


def from_pretrained(cls, name_or_dir, dtype=None, device=None):
    """Build a model of class `cls` from a Hugging Face checkpoint: a local directory, a released name
    (imagegpt-small, imagegpt-medium, imagegpt-large) or a hub repository id (openai/imagegpt-small).
    Weights load in fp32 unless dtype says otherwise ("float16", "bfloat16", or a torch.dtype), onto
    `device` (default CPU). A head the checkpoint has no weights for (say a classifier on top of
    imagegpt-small) starts freshly initialised. The directory's palette, if it has one, becomes
    `model.palette` ((K, 3) in [-1, 1], on the CPU)."""
    dtype = parse_dtype(dtype)
    directory = resolve_checkpoint(str(name_or_dir))
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{directory} has no config.json")
    config = ImageGPTConfig.from_json_file(config_path)
    model = cls(config)
    model.load_state_dict(match_state_dict(model, load_state_dict_files(directory)), strict=False)
    model.to(dtype=dtype or torch.float32, device=device)
    if any(os.path.exists(os.path.join(directory, name)) for name in PALETTE_FILES):
        model.palette = load_palette(directory)
    return model.eval()


def save_pretrained(model: nn.Module, directory):
    """Write config.json and model.safetensors in the layout Hugging Face transformers loads, and the
    palette, when the model has one, beside them (preprocessor_config.json and kmeans_centers.npy)."""
    os.makedirs(directory, exist_ok=True)
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["torch_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    save_safetensors(model.state_dict(), os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    _write_atomically(os.path.join(directory, "config.json"),
                      (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    if model.palette is not None:
        save_palette(model.palette, directory, n_px=model.config.n_px)


# Every model class loads and saves the same way: one function each, attached to all three classes.
for _cls in HEAD_CLASSES:
    _cls.from_pretrained = classmethod(from_pretrained)
    _cls.save_pretrained = save_pretrained


# ----------------------------------------------------------------------------------------------------
# 9. Pixels and tokens
# ----------------------------------------------------------------------------------------------------
#
# An image becomes tokens in three steps, as Hugging Face's ImageGPTImageProcessor does it:
#   resize to n_px x n_px (bilinear)  ->  normalise to [-1, 1] (x / 127.5 - 1)  ->  nearest palette colour.
# The palette is OpenAI's 512 k-means centres (kmeans_centers.npy, (512, 3) in [-1, 1]), or one fitted to
# your own images with fit_palette(). Tokens go back to pixels by looking the colour up (dequantise).
# PNG files are read and written here with zlib alone, so nothing beyond numpy and torch is needed.


def _as_uint8_image(image, name="image") -> torch.Tensor:
    """One RGB image, (H, W, 3) uint8, as a CPU tensor (a numpy array or a tensor is accepted)."""
    image = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image).cpu()
    if image.dtype != torch.uint8:
        raise TypeError(f"{name} must hold uint8 pixels in [0, 255], got dtype {image.dtype}")
    if image.dim() != 3 or image.size(-1) != 3:
        raise _shape_error(name, image.shape, "(H, W, 3): RGB, channels last (convert grey or RGBA with to_rgb)")
    return image


def _as_image_list(images) -> List[torch.Tensor]:
    """A single image (H, W, 3), a batch (B, H, W, 3) or a list of images -> a list of (H, W, 3) uint8 tensors."""
    if isinstance(images, (list, tuple)):
        return [_as_uint8_image(image, f"images[{i}]") for i, image in enumerate(images)]
    images = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if images.dim() == 4:
        return [_as_uint8_image(image, f"images[{i}]") for i, image in enumerate(images)]
    return [_as_uint8_image(images, "images")]


def resize_image(image, n_px: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (n_px, n_px, 3) uint8 with bilinear filtering.

    antialias=True widens the filter when shrinking, as Pillow's BILINEAR (which the reference processor
    uses) does; without it, shrinking a photo to 32 x 32 samples 4 pixels of each block and aliases.
    The result is rounded to uint8, as the reference's Pillow round trip rounds it.
    """
    image = _as_uint8_image(image)
    x = image.permute(2, 0, 1)[None].float()  # (H, W, 3) -> (1, 3, H, W): interpolate wants channels first
    x = F.interpolate(x, size=(n_px, n_px), mode="bilinear", align_corners=False, antialias=True)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8)  # (1, 3, n, n) -> (n, n, 3)


def normalise(image: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [0, 255] -> float32 in [-1, 1], the scale of the palette."""
    return image.float() / 127.5 - 1.0


def nearest_colour(pixels: torch.Tensor, palette: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """(N, 3) pixels in [-1, 1], (K, 3) palette -> (N,) index of the nearest colour (squared distance).

    Computed in float64 as |x|^2 - 2 x.c + |c|^2, the reference's formula, so that a pixel halfway between
    two colours goes the same way; ties go to the lower index (argmin's first). In chunks of pixels, so
    that a large image needs (chunk, K) of memory, not (N, K).
    """
    palette = palette.to(torch.float64)
    c2 = (palette ** 2).sum(dim=1)  # (K,)
    out = []
    for start in range(0, pixels.size(0), chunk):
        x = pixels[start : start + chunk].to(palette.device, torch.float64)  # (n, 3)
        d = (x ** 2).sum(dim=1, keepdim=True) - 2 * x @ palette.T + c2  # (n, 1) - (n, K) + (K,) -> (n, K)
        out.append(d.argmin(dim=1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=palette.device)


def _check_palette(palette) -> torch.Tensor:
    palette = torch.as_tensor(np.asarray(palette) if not isinstance(palette, torch.Tensor) else palette)
    if palette.dim() != 2 or palette.size(1) != 3 or palette.size(0) < 1:
        raise _shape_error("palette", palette.shape, "(K, 3): K colours, RGB")
    palette = palette.to(torch.float32)
    if not torch.isfinite(palette).all():
        raise ValueError("palette holds NaN or infinite values")
    if palette.abs().max() > 1.0 + 1e-3:  # a little slack for centres saved with rounding
        raise ValueError(
            f"palette values must be in [-1, 1] (pixel / 127.5 - 1), but its largest magnitude is "
            f"{float(palette.abs().max()):.4g}; if it holds 0..255 colours, divide by 127.5 and subtract 1"
        )
    return palette


def quantise(images, palette, n_px: Optional[int] = None) -> torch.Tensor:
    """Images -> colour tokens: resize to n_px x n_px (if given), normalise, replace each pixel by the index
    of the nearest palette colour, read the pixels in raster order (row by row, left to right).

    images: (H, W, 3) uint8 -> (H*W,) tokens; (B, H, W, 3) or a list of B images -> (B, H*W). Images of
    different sizes need n_px. Prepend SOS (config.sos_token_id) before giving the tokens to a model.
    """
    palette = _check_palette(palette)
    single = not isinstance(images, (list, tuple)) and np.ndim(images) == 3
    image_list = _as_image_list(images)
    if n_px is not None:
        if not isinstance(n_px, int) or n_px < 1:
            raise ValueError(f"n_px must be a positive integer, got {n_px!r}")
        image_list = [resize_image(image, n_px) for image in image_list]
    shapes = {tuple(image.shape) for image in image_list}
    if len(shapes) > 1:
        raise ValueError(f"the images have different sizes {sorted(shapes)}: pass n_px to resize them all")
    pixels = normalise(torch.stack(image_list))  # (B, H, W, 3) in [-1, 1]
    B, H, W, _ = pixels.shape
    tokens = nearest_colour(pixels.reshape(-1, 3), palette).view(B, H * W)  # (B*H*W,) -> (B, H*W)
    return tokens[0] if single else tokens


def dequantise(tokens, palette) -> torch.Tensor:
    """Colour tokens -> uint8 RGB: (..., n_px * n_px) -> (..., n_px, n_px, 3), each token replaced by its
    palette colour, rint(127.5 * (colour + 1)). Drop SOS (the first column of generate()'s output) first."""
    palette = _check_palette(palette)
    tokens = torch.as_tensor(tokens)
    n = tokens.size(-1) if tokens.dim() > 0 else 0
    n_px = math.isqrt(n)
    if tokens.dim() == 0 or n_px * n_px != n or n == 0:
        raise _shape_error("tokens", tokens.shape, "(..., n_px * n_px): one token per pixel of a square image")
    _check_indices("tokens", tokens, palette.size(0), "the number of palette colours", "colour")
    colours = torch.round(127.5 * (palette.to(torch.float64) + 1.0)).clamp(0, 255).to(torch.uint8)  # (K, 3)
    return colours[tokens.cpu().long()].view(*tokens.shape[:-1], n_px, n_px, 3)  # (..., N, 3) -> (..., n, n, 3)


def _kmeans_plus_plus(pixels: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centre is a pixel drawn with probability proportional to its squared
    distance from the nearest centre so far, so the first centres spread over the colours actually used."""
    n = pixels.size(0)
    centres = [pixels[int(torch.randint(n, (1,), generator=generator))]]
    d2 = ((pixels - centres[0]) ** 2).sum(dim=1)  # (N,): squared distance to the nearest centre
    for _ in range(1, k):
        total = d2.sum()
        if total > 0:
            index = int(torch.multinomial(d2 / total, 1, generator=generator))
        else:  # every pixel sits on a centre: fewer distinct colours than k, so some centres repeat
            index = int(torch.randint(n, (1,), generator=generator))
        centres.append(pixels[index])
        d2 = torch.minimum(d2, ((pixels - pixels[index]) ** 2).sum(dim=1))
    return torch.stack(centres)  # (k, 3)


def fit_palette(images, n_colours: int = 512, n_iter: int = 20, seed: int = 0, n_px: Optional[int] = None,
                max_pixels: int = 200_000) -> torch.Tensor:
    """Fit a palette of n_colours to your own images with k-means (what OpenAI did on ImageNet).

    images: (B, H, W, 3) uint8, or a list of (H, W, 3); resized to n_px first if given (fit at the size you
    will quantise at). At most max_pixels pixels, drawn at random, are used. k-means++ seeding, then n_iter
    rounds of: assign every pixel to its nearest centre, move each centre to the mean of its pixels. A
    centre left with no pixels moves to the pixel farthest from its own centre, so no colour is wasted.
    Deterministic for a given seed. Returns (n_colours, 3) float32 in [-1, 1].
    A model only understands the palette it was trained with: use this one to train a new model.
    """
    if not isinstance(n_colours, int) or n_colours < 1:
        raise ValueError(f"n_colours must be a positive integer, got {n_colours!r}")
    if not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"n_iter must be a non-negative integer, got {n_iter!r}")
    image_list = _as_image_list(images)
    if n_px is not None:
        image_list = [resize_image(image, n_px) for image in image_list]
    pixels = torch.cat([normalise(image).reshape(-1, 3) for image in image_list]).double()  # (N, 3)
    generator = torch.Generator().manual_seed(seed)
    if pixels.size(0) > max_pixels:
        pixels = pixels[torch.randperm(pixels.size(0), generator=generator)[:max_pixels]]
    centres = _kmeans_plus_plus(pixels, n_colours, generator)  # (K, 3)
    for _ in range(n_iter):
        assign = nearest_colour(pixels, centres)  # (N,)
        counts = torch.bincount(assign, minlength=n_colours)  # (K,)
        sums = torch.zeros_like(centres).index_add_(0, assign, pixels)  # (K, 3)
        new_centres = sums / counts.clamp(min=1)[:, None].to(sums.dtype)
        empty = (counts == 0).nonzero().flatten()
        if len(empty) > 0:
            error = ((pixels - centres[assign]) ** 2).sum(dim=1)  # (N,): how badly each pixel is served
            farthest = error.topk(min(len(empty), len(error))).indices
            new_centres[empty[: len(farthest)]] = pixels[farthest]
        centres = new_centres
    return centres.float()


def load_palette(path) -> torch.Tensor:
    """A palette from kmeans_centers.npy (OpenAI's file), a preprocessor_config.json (Hugging Face keeps
    it there as "clusters"), or a directory holding either. Returns (K, 3) float32 in [-1, 1]."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in PALETTE_FILES:
            if os.path.exists(os.path.join(path, name)):
                return load_palette(os.path.join(path, name))
        raise FileNotFoundError(f"no palette in {path}: expected one of {', '.join(PALETTE_FILES)}")
    if path.endswith(".npy"):
        return _check_palette(np.load(path, allow_pickle=False))
    with open(path, encoding="utf-8") as f:
        processor = json.load(f)
    if "clusters" not in processor:
        raise ValueError(f"{path} holds no \"clusters\" (the palette); keys are {sorted(processor)}")
    return _check_palette(np.array(processor["clusters"], dtype=np.float64))


# Where a checkpoint directory keeps its palette, in the order they are looked for.
PALETTE_FILES = ("preprocessor_config.json", "kmeans_centers.npy")


def save_palette(palette, directory, n_px: Optional[int] = None):
    """Write the palette into a checkpoint directory as Hugging Face does (preprocessor_config.json, which
    transformers' ImageGPTImageProcessor reads back) and as OpenAI did (kmeans_centers.npy)."""
    palette = _check_palette(palette)
    processor = {
        "clusters": palette.double().tolist(),
        "do_color_quantize": True,
        "do_normalize": True,
        "do_resize": True,
        "image_processor_type": "ImageGPTImageProcessor",
        "resample": 2,  # Pillow's BILINEAR
    }
    if n_px is not None:
        processor["size"] = {"height": n_px, "width": n_px}
    _write_atomically(os.path.join(directory, "preprocessor_config.json"),
                      (json.dumps(processor, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    with _atomic_path(os.path.join(directory, "kmeans_centers.npy")) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, palette.numpy())


# --- PNG files ---------------------------------------------------------------------------------------
#
# A PNG is an 8-byte signature and a list of chunks, each: length (4 bytes, big-endian), type (4 ASCII
# letters), data, CRC-32 of type + data. IHDR gives the size and pixel format; the IDAT chunks, joined,
# are one zlib stream holding every row, each row prefixed by a filter-type byte that says how its
# bytes were predicted from the left pixel, the pixel above, or both (see _unfilter_row).

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel: grey, RGB, grey+alpha, RGBA
_RESAVE_HINT = "re-save it as an 8-bit RGB PNG (e.g. `convert in.png -depth 8 PNG24:out.png`, or any image editor)"


def _png_chunk(chunk_type: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + chunk_type + data + struct.pack(">I", zlib.crc32(chunk_type + data))


def write_png(path, image):
    """Write (H, W, 3) RGB, (H, W, 4) RGBA, or (H, W) / (H, W, 1) grey uint8 pixels as a PNG, atomically.
    Every row uses filter type 0 (no prediction): simplest, and small images compress well enough."""
    image = np.asarray(image.cpu() if isinstance(image, torch.Tensor) else image)
    if image.dtype != np.uint8:
        raise TypeError(f"write_png needs uint8 pixels, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]  # (H, W) -> (H, W, 1)
    colour_types = {1: 0, 2: 4, 3: 2, 4: 6}  # samples per pixel -> PNG colour type
    if image.ndim != 3 or image.shape[2] not in colour_types or image.shape[0] < 1 or image.shape[1] < 1:
        raise _shape_error("image", image.shape, "(H, W), (H, W, 1), (H, W, 2), (H, W, 3) or (H, W, 4), H, W >= 1")
    H, W, channels = image.shape
    header = struct.pack(">IIBBBBB", W, H, 8, colour_types[channels], 0, 0, 0)  # 8-bit, deflate, no interlace
    rows = np.concatenate([np.zeros((H, 1), np.uint8), image.reshape(H, W * channels)], axis=1)  # filter byte 0
    png = PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + \
        _png_chunk(b"IEND", b"")
    _write_atomically(path, png)


def _paeth(a: int, b: int, c: int) -> int:
    """PNG's Paeth predictor: of left (a), above (b) and upper-left (c), the one nearest a + b - c."""
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def _unfilter_row(filter_type: int, row: bytes, prev: bytes, bpp: int) -> bytes:
    """Undo one row's filter. Each stored byte is the pixel byte minus a prediction, mod 256, from
    a = the byte bpp to the left, b = the byte above, c = the byte above-left (0 outside the image):
    0 None: nothing; 1 Sub: a; 2 Up: b; 3 Average: floor((a + b) / 2); 4 Paeth: _paeth(a, b, c).
    Sub and Up are whole-row numpy operations; Average and Paeth depend on the byte just rebuilt to the
    left, so they go byte by byte (pure Python: about 1 s per 3 MB of pixels)."""
    if filter_type == 0:
        return row
    x = np.frombuffer(row, np.uint8)
    if filter_type == 1:  # running sum along the row, per channel: (W * bpp,) -> (W, bpp), cumsum over W
        return (x.reshape(-1, bpp).cumsum(axis=0, dtype=np.uint64) & 0xFF).astype(np.uint8).tobytes()
    if filter_type == 2:
        return (x + np.frombuffer(prev, np.uint8)).tobytes()  # uint8 addition wraps mod 256
    out = bytearray(row)
    if filter_type == 3:
        for i in range(len(out)):
            a = out[i - bpp] if i >= bpp else 0
            out[i] = (out[i] + ((a + prev[i]) >> 1)) & 0xFF
        return bytes(out)
    for i in range(len(out)):  # 4, Paeth
        a, c = (out[i - bpp], prev[i - bpp]) if i >= bpp else (0, 0)
        out[i] = (out[i] + _paeth(a, prev[i], c)) & 0xFF
    return bytes(out)


def read_png(path) -> np.ndarray:
    """Read an 8-bit PNG: grey, grey + alpha, RGB or RGBA, any filter types, any number of IDAT chunks,
    every CRC checked. Returns the pixels as stored, (H, W, C) uint8 with C = 1, 2, 3 or 4 (to_rgb()
    makes that RGB). 16-bit, palette and interlaced PNGs are refused with a ValueError saying how to
    convert them."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != PNG_SIGNATURE:
        raise ValueError(f"{path} is not a PNG file (it does not start with the PNG signature); {_RESAVE_HINT}")
    header, idat, pos = None, [], 8
    while True:
        if pos + 12 > len(data):
            raise ValueError(f"{path} is truncated: it ends at byte {len(data)} before its IEND chunk")
        length, chunk_type = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        crc_bytes = data[pos + 8 + length : pos + 12 + length]
        if len(body) < length or len(crc_bytes) < 4:
            raise ValueError(f"{path} is truncated inside its {chunk_type!r} chunk at byte {pos}")
        if zlib.crc32(chunk_type + body) != struct.unpack(">I", crc_bytes)[0]:
            raise ValueError(f"{path}: the {chunk_type.decode('latin-1')} chunk at byte {pos} fails its CRC check "
                             "(the file is corrupt)")
        if header is None and chunk_type != b"IHDR":
            raise ValueError(f"{path}: the first chunk is {chunk_type!r}, not IHDR (the file is corrupt)")
        if chunk_type == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif chunk_type == b"IDAT":
            idat.append(body)
        elif chunk_type == b"IEND":
            break
        elif not chunk_type[0] & 0x20 and chunk_type != b"PLTE":  # upper-case first letter: critical
            raise ValueError(f"{path} has an unknown critical chunk {chunk_type!r}; {_RESAVE_HINT}")
        pos += 12 + length  # ancillary chunks (text, gamma, ...) are skipped

    width, height, bit_depth, colour_type, _, _, interlace = header
    if colour_type == 3:
        raise ValueError(f"{path} is a palette (indexed-colour) PNG, which this reader does not decode; {_RESAVE_HINT}")
    if colour_type not in PNG_CHANNELS:
        raise ValueError(f"{path} has PNG colour type {colour_type}, which does not exist (the file is corrupt)")
    if bit_depth != 8:
        raise ValueError(f"{path} has {bit_depth}-bit samples; only 8-bit PNGs are read; {_RESAVE_HINT}")
    if interlace != 0:
        raise ValueError(f"{path} is an interlaced (Adam7) PNG, which this reader does not decode; {_RESAVE_HINT}")
    channels = PNG_CHANNELS[colour_type]
    stride = width * channels  # bytes per row, without the filter byte
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        raise ValueError(f"{path}: its image data does not decompress ({e}); the file is corrupt") from None
    if len(raw) != height * (stride + 1):
        raise ValueError(f"{path}: the image data holds {len(raw)} bytes, but a {width} x {height} image of "
                         f"{channels} channels needs {height * (stride + 1)} (the file is corrupt)")
    rows, prev = [], bytes(stride)  # the row above the first one is all zeros
    for y in range(height):
        start = y * (stride + 1)
        filter_type = raw[start]
        if filter_type > 4:
            raise ValueError(f"{path}: row {y} has filter type {filter_type}, but PNG defines 0-4 (the file is corrupt)")
        prev = _unfilter_row(filter_type, raw[start + 1 : start + 1 + stride], prev, channels)
        rows.append(prev)
    return np.frombuffer(b"".join(rows), np.uint8).reshape(height, width, channels).copy()


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 from read_png -> (H, W, 3): grey is repeated into R, G and B; an image with alpha is
    composited over white, as a viewer shows it (the colour under a transparent pixel is arbitrary)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[-1]
    colour = image[..., :3] if channels >= 3 else np.repeat(image[..., :1], 3, axis=-1)  # (H, W, 3)
    if channels in (2, 4):
        alpha = image[..., -1:].astype(np.float64) / 255.0  # (H, W, 1)
        colour = np.round(colour * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(colour)


def image_grid(images, columns: int, scale: int = 1, pad: int = 2) -> np.ndarray:
    """N images (N, H, W, 3) uint8 -> one (rows * (scale*H + pad) + pad, ...) image, left to right then top to
    bottom, on white, each image enlarged scale times by repeating pixels (32 x 32 is tiny on a screen)."""
    images = np.asarray(images.cpu() if isinstance(images, torch.Tensor) else images)
    N, H, W, _ = images.shape
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)  # (N, H, W, 3) -> (N, sH, sW, 3)
    H, W = H * scale, W * scale
    rows = math.ceil(N / columns)
    grid = np.full((rows * (H + pad) + pad, columns * (W + pad) + pad, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = pad + (i // columns) * (H + pad), pad + (i % columns) * (W + pad)
        grid[top : top + H, left : left + W] = image
    return grid

# ----------------------------------------------------------------------------------------------------
# 10. Command line
# ----------------------------------------------------------------------------------------------------

CLI_EXAMPLES = """examples:
  python imagegpt.py sample --model imagegpt-small --num-samples 8 --out samples.png   # downloads 76M params once
  python imagegpt.py sample --model ./my-checkpoint --top-k 40 --seed 1 --out samples.png
  python imagegpt.py complete --model imagegpt-small --image cat.png --out completions.png
  python imagegpt.py complete --model openai/imagegpt-medium --image cat.png --num-samples 4 --temperature 0.9

A model directory holds config.json, model.safetensors (or pytorch_model.bin) and its palette
(preprocessor_config.json or kmeans_centers.npy); --palette points at a palette kept elsewhere.
Every image costs one model step per pixel (1024 for 32 x 32): minutes on a CPU, seconds on a GPU.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagegpt.py",
        description="ImageGPT in one file. `sample` draws new images; `complete` keeps the top half of your "
                    "image and lets the model paint the rest.",
        epilog=CLI_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    sample = commands.add_parser(
        "sample", help="draw unconditional samples into one PNG grid",
        description="Draw images from nothing (the SOS token) and write them side by side into one PNG.",
        epilog=CLI_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    complete = commands.add_parser(
        "complete", help="complete the bottom half of an image, several times",
        description="Shrink IMAGE to the model's n_px x n_px, keep its top rows, sample the rest, and write the "
                    "original (as the model sees it) followed by the completions into one PNG.",
        epilog=CLI_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    complete.add_argument("--image", required=True, help="the PNG to complete (8-bit grey, RGB or RGBA)")
    complete.add_argument("--keep-rows", type=int, default=None,
                          help="rows of the shrunk image to keep (default: the top half, n_px // 2)")
    for command, out in ((sample, "samples.png"), (complete, "completions.png")):
        command.add_argument("--model", default="imagegpt-small",
                             help="a directory with config.json + weights + palette, a released name "
                                  "(imagegpt-small, imagegpt-medium, imagegpt-large) or a hub repo id "
                                  "(default: imagegpt-small)")
        command.add_argument("--palette", default=None,
                             help="kmeans_centers.npy or preprocessor_config.json, if the model directory has none")
        command.add_argument("--num-samples", type=int, default=8, help="images to draw (default 8)")
        command.add_argument("--out", default=out, help=f"the PNG to write (default {out})")
        command.add_argument("--temperature", type=float, default=1.0,
                             help="divide the logits by this; lower is more predictable, 0 means greedy (default 1.0)")
        command.add_argument("--top-k", type=int, default=0,
                             help="sample only among the k most likely colours; 0 turns it off (default 0)")
        command.add_argument("--top-p", type=float, default=None,
                             help="sample only among the most likely colours whose probabilities sum to p")
        command.add_argument("--seed", type=int, default=None, help="random seed, for samples you can reproduce")
        command.add_argument("--scale", type=int, default=4,
                             help="enlarge every pixel to scale x scale in the PNG (default 4: 32 px -> 128 px)")
        command.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when present)")
        command.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                             help="weights' precision (default float32: sampling one pixel at a time is bound by "
                                  "kernel launches, not arithmetic, so half precision gains little)")
    return parser


def _check_args(args):
    """The user's numbers, checked before a model is loaded (which can take a while)."""
    for name, value, low in (("--num-samples", args.num_samples, 1), ("--top-k", args.top_k, 0),
                             ("--scale", args.scale, 1)):
        if value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 means greedy), got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if getattr(args, "image", None) is not None and not os.path.isfile(args.image):
        raise ValueError(f"--image {args.image}: no such file")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise ValueError(f"--out {args.out}: the directory {out_dir} does not exist")
    if args.palette is not None and not os.path.exists(args.palette):
        raise ValueError(f"--palette {args.palette}: no such file")


def load_model_and_palette(args):
    """The model on its device, and the palette: --palette, else the one saved with the model."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    model = ImageGPTForCausalImageModeling.from_pretrained(args.model, dtype=args.dtype, device=device)
    palette = load_palette(args.palette) if args.palette is not None else model.palette
    if palette is None:
        raise ValueError(f"{args.model} comes without a palette (preprocessor_config.json or kmeans_centers.npy); "
                         "pass --palette PATH")
    if palette.size(0) != model.config.n_colours:
        raise ValueError(f"the palette has {palette.size(0)} colours, but the model predicts "
                         f"{model.config.n_colours}; use the palette the model was trained with")
    model.config.n_px  # raises a clear error for a model whose positions are not a square image
    return model, palette, device


class ProgressLine:
    """on_token callback for generate(): one line on stderr, rewritten in place at most 5 times a second."""

    def __init__(self, total: int, what: str):
        self.total, self.what, self.done = total, what, 0
        self.start = self.last = time.time()

    def __call__(self, tokens):
        self.done += 1
        now = time.time()
        if now - self.last > 0.2 or self.done == self.total:
            rate = self.done / max(now - self.start, 1e-6)
            left = (self.total - self.done) / rate
            sys.stderr.write(f"\r{self.what}: {self.done}/{self.total} pixels ({100 * self.done // self.total}%), "
                             f"{rate:.1f} px/s, {left:.0f} s left   ")
            sys.stderr.flush()
            self.last = now
        if self.done == self.total:
            sys.stderr.write("\n")


def _generate_images(model, prompt, args, device, what):
    """Sample num_samples continuations of prompt (1, T) with the command line's options -> (N, n*n) tokens."""
    seed = args.seed if args.seed is not None else torch.seed() % 2**31
    if args.seed is None:
        sys.stderr.write(f"seed {seed} (pass --seed {seed} to draw the same images again)\n")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    max_new_tokens = model.config.n_positions + 1 - prompt.size(1)
    tokens = model.generate(
        prompt, num_samples=args.num_samples, do_sample=args.temperature > 0, temperature=args.temperature or 1.0,
        top_k=args.top_k or None, top_p=args.top_p, generator=generator,
        on_token=ProgressLine(max_new_tokens, f"{what} {args.num_samples} images"),
    )
    return tokens[:, 1:].cpu()  # drop SOS: one token per pixel


def sample_command(args):
    _check_args(args)
    model, palette, device = load_model_and_palette(args)
    sos = torch.full((1, 1), model.config.sos_token_id, dtype=torch.long)
    images = dequantise(_generate_images(model, sos, args, device, "sampling"), palette)  # (N, n, n, 3)
    write_png(args.out, image_grid(images, columns=min(args.num_samples, 8), scale=args.scale))
    sys.stderr.write(f"wrote {args.out}\n")


def complete_command(args):
    _check_args(args)
    image = to_rgb(read_png(args.image))  # read before the model: a bad file fails fast
    model, palette, device = load_model_and_palette(args)
    n_px = model.config.n_px
    keep_rows = args.keep_rows if args.keep_rows is not None else n_px // 2
    if not 0 <= keep_rows < n_px:
        raise ValueError(f"--keep-rows must be in [0, {n_px}) for this {n_px} x {n_px} model, got {keep_rows}")
    original = quantise(image, palette, n_px=n_px)  # (n_px * n_px,): the whole image as the model sees it
    sos = torch.tensor([model.config.sos_token_id])
    prompt = torch.cat([sos, original[: keep_rows * n_px]])[None]  # (1, 1 + keep_rows * n_px)
    completions = _generate_images(model, prompt, args, device, "completing")  # (N, n_px * n_px)
    images = dequantise(torch.cat([original[None], completions]), palette)  # original first: (1 + N, n, n, 3)
    write_png(args.out, image_grid(images, columns=1 + args.num_samples, scale=args.scale))
    sys.stderr.write(f"wrote {args.out} (the original, as the model sees it, then {args.num_samples} completions)\n")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "sample":
            sample_command(args)
        else:
            complete_command(args)
    except KeyboardInterrupt:  # Ctrl-C: stop quietly; the PNG is written only when complete, so none is left
        sys.stderr.write("\ninterrupted: nothing written\n")
        return 130
    except (ValueError, OSError) as e:  # a user's mistake: one line, no traceback
        print(f"imagegpt.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
