"""WeakTr models: the step-1 CAM model and the step-2 segmenter, on one plain-ViT encoder.

Reads top to bottom as the forward pass: outputs, the ViT encoder pieces (patch and position embeddings, attention,
MLP, layer), the encoder itself (`WeakTrModel`), the step-1 heads (Adaptive Attention Fusion, `WeakTrForCAM`), the
step-2 decoder and its gradient-clipping loss (`WeakTrForSemanticSegmentation`).
Paper: Zhu et al., "WeakTr: Exploring Plain Vision Transformer for Weakly-supervised Semantic Segmentation".
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.auto.modeling_auto import MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging

from .configuration_weaktr import WeakTrConfig

logger = logging.get_logger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class WeakTrModelOutput(ModelOutput):
    """
    Output of the shared ViT encoder.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_prefix_tokens + num_register_tokens +
            num_patches, hidden_size)`):
            Tokens after the last layer (after the final LayerNorm when the encoder has one). Prefix tokens (class
            tokens for step 1, one [CLS] for step 2) come first, then the register tokens (none unless
            `config.num_register_tokens`), then patches in row-major order.
        pooler_output (`torch.FloatTensor` of shape `(batch_size, num_prefix_tokens, hidden_size)`):
            The prefix tokens of `last_hidden_state`.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            Embeddings and the output of each layer, each `(batch_size, sequence_length, hidden_size)`.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
            Softmax attention probabilities of each layer, each `(batch_size, num_heads, sequence_length,
            sequence_length)`.
        attention_outputs (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attention_outputs=True`):
            Each layer's attention-branch output after the output projection and before the residual add, each
            `(batch_size, sequence_length, hidden_size)` (F_l of the paper's Adaptive Attention Fusion).
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    attention_outputs: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class WeakTrCAMOutput(ModelOutput):
    """
    Output of [`WeakTrForCAM`]. `C` is `config.num_labels` (foreground classes), `h, w = height // patch_size,
    width // patch_size`.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
            Sum of the multi-label soft-margin losses of `logits`, `coarse_logits` and `fine_logits`.
        class_loss, coarse_loss, fine_loss (`torch.FloatTensor` of shape `()`, *optional*):
            The three terms of `loss`, for logging.
        logits (`torch.FloatTensor` of shape `(batch_size, C)`):
            Class-token scores: mean over channels of each class token's final (un-normalised) hidden state.
        coarse_logits (`torch.FloatTensor` of shape `(batch_size, C)`):
            Global average of `coarse_cam`.
        fine_logits (`torch.FloatTensor` of shape `(batch_size, C)`):
            Global average of `fine_cam`.
        coarse_cam (`torch.FloatTensor` of shape `(batch_size, C, h, w)`):
            3x3-convolution CAM on the patch tokens, before ReLU.
        fine_cam (`torch.FloatTensor` of shape `(batch_size, C, h, w)`):
            `cross_attention * relu(coarse_cam)` refined by the fused patch-to-patch attention; the CAM used for
            pseudo-labels.
        cross_attention (`torch.FloatTensor` of shape `(batch_size, C, h, w)`):
            Fused class-to-patch attention.
        head_weights (`torch.FloatTensor` of shape `(batch_size, num_hidden_layers * num_attention_heads)`):
            Adaptive Attention Fusion weight of each attention map; channel `head * num_hidden_layers + layer`.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            Embeddings and each layer's output, each `(batch_size, C + h * w, hidden_size)`.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
            Each layer's attention probabilities, `(batch_size, num_heads, C + h * w, C + h * w)`.
    """

    loss: torch.FloatTensor | None = None
    class_loss: torch.FloatTensor | None = None
    coarse_loss: torch.FloatTensor | None = None
    fine_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    coarse_logits: torch.FloatTensor | None = None
    fine_logits: torch.FloatTensor | None = None
    coarse_cam: torch.FloatTensor | None = None
    fine_cam: torch.FloatTensor | None = None
    cross_attention: torch.FloatTensor | None = None
    head_weights: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class WeakTrSemanticSegmenterOutput(SemanticSegmenterOutput):
    """
    Output of [`WeakTrForSemanticSegmentation`]: transformers' `SemanticSegmenterOutput` plus `aux_logits` and
    `decoder_attentions`.

    `attentions` holds the encoder's layers only, as in every transformers vision model (ViT, SegFormer, DINOv2...), so
    code that reads `attentions[-1]` gets the last encoder layer; the mask-transformer decoder's layers have their own
    field, as the decoder of an encoder-decoder model does.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
            Per-pixel cross-entropy at the label size, with gradient clipping when `config.use_gradient_clipping`.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels, padded_height // patch_size, padded_width //
            patch_size)`):
            Mask scores at patch resolution of the input padded bottom/right to a multiple of the patch size.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            Encoder embeddings and each encoder layer's output, each `(batch_size, 1 + num_patches, hidden_size)`.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
            Encoder layers' attention probabilities, each `(batch_size, num_attention_heads, 1 + num_patches,
            1 + num_patches)`.
        aux_logits (`torch.FloatTensor` of shape `(batch_size, num_labels, rows, cols)`, *optional*, returned when
            `output_aux_logits=True`):
            The tokens before the last decoder block decoded by the same head.
        decoder_attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
            Decoder layers' attention probabilities over patches then class embeddings, each `(batch_size,
            decoder_num_attention_heads, num_patches + num_labels, num_patches + num_labels)`.
    """

    aux_logits: torch.FloatTensor | None = None
    decoder_attentions: tuple[torch.FloatTensor, ...] | None = None


# ---------------------------------------------------------------------------------------------------------------------
# ViT encoder pieces
# ---------------------------------------------------------------------------------------------------------------------


def resize_position_embeddings(patch_embeddings, old_grid, new_grid, mode):
    """Resize patch position rows `(1, old_h * old_w, dim)` to `new_grid`, row-major in and out.

    `mode` is `"bicubic"` or `"bilinear"` (interpolation to the target size, align_corners False), or
    `"bicubic_scale_factor"`: the authors' step-1 form, bicubic with scale factors `(new + 0.1) / old`, which samples
    slightly different points than the size form; kept for parity with their checkpoints at new input sizes.
    """
    if tuple(old_grid) == tuple(new_grid):
        return patch_embeddings
    dim = patch_embeddings.shape[-1]
    grid = patch_embeddings.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    dtype = grid.dtype
    grid = grid.float()  # bicubic is not implemented for half precision on every device
    if mode == "bicubic_scale_factor":
        scale = ((new_grid[0] + 0.1) / old_grid[0], (new_grid[1] + 0.1) / old_grid[1])
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
    else:
        grid = F.interpolate(grid, size=tuple(new_grid), mode=mode, align_corners=False)
    if tuple(grid.shape[-2:]) != tuple(new_grid):
        raise RuntimeError(f"Position embeddings resized to {tuple(grid.shape[-2:])} instead of {tuple(new_grid)}.")
    return grid.to(dtype).permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)


def drop_path(hidden_states, drop_prob, training):
    """Stochastic depth: zero whole samples of a residual branch with probability `drop_prob`, rescale the rest."""
    if drop_prob == 0.0 or not training:
        return hidden_states
    keep_prob = 1.0 - drop_prob
    shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
    mask = hidden_states.new_empty(shape).bernoulli_(keep_prob)
    return hidden_states * mask / keep_prob


class WeakTrDropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states):
        return drop_path(hidden_states, self.drop_prob, self.training)

    def extra_repr(self):
        return f"p={self.drop_prob}"


class WeakTrPatchEmbeddings(nn.Module):
    """Non-overlapping `patch_size` convolution: `(B, channels, H, W)` -> `(B, H/p * W/p, hidden_size)`."""

    def __init__(self, config: WeakTrConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size)

    def forward(self, pixel_values):
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"pixel_values must have shape (batch_size, {self.num_channels}, height, width), got "
                f"{tuple(pixel_values.shape)}. Convert images to RGB (WeakTrImageProcessor does) or set "
                f"config.num_channels."
            )
        height, width = pixel_values.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"Input size {height}x{width} is not a multiple of the patch size {self.patch_size}. Resize or pad "
                f"the image (WeakTrImageProcessor(do_pad=True) pads to a multiple of the patch size)."
            )
        embeddings = self.proj(pixel_values.to(self.proj.weight.dtype))
        return embeddings.flatten(2).transpose(1, 2)


def build_2d_rope(grid, head_dim, theta, reference_grid, device=None, rope_type="eva02"):
    """Axial 2-D rotary table `(cos, sin)`, each `(rows * cols, head_dim)` float32, patches in row-major order.

    Frequencies are `theta ** (-i / (head_dim / 4))`, a quarter of each head per axis. Computed per forward from
    `arange`: nothing is stored in the weights.

    - `"eva02"`: the first half of each head rotates with the patch row, the second half with the column, in
      interleaved pairs (`rotate_interleaved`). Positions along an axis of `n` patches are `arange(n) / n *
      reference_grid`, rescaled per axis as timm's EVA does, so every grid spans EVA-02's pretraining extent; at the
      authors' 30x30 grid this is their fixed table.
    - `"dinov3"`: patch centres `(i + 0.5) / n` mapped to [-1, 1] per axis, angle `2 pi * position / period` with
      `period = theta ** (i / (head_dim / 4))`; the head is `[row, col, row, col]` quarters for the rotate-half
      layout (`rotate_half`), as DINOv3 (timm's `RotaryEmbeddingDinoV3`). `reference_grid` is unused.
    """
    rows, cols = grid
    quarter = head_dim // 4
    exponents = torch.arange(quarter, device=device, dtype=torch.float32) / quarter
    if rope_type == "dinov3":
        periods = theta**exponents
        row_pos = (torch.arange(0.5, rows, device=device, dtype=torch.float32) / rows) * 2.0 - 1.0
        col_pos = (torch.arange(0.5, cols, device=device, dtype=torch.float32) / cols) * 2.0 - 1.0
        row_freqs = 2 * math.pi * row_pos[:, None] / periods  # (rows, head_dim / 4)
        col_freqs = 2 * math.pi * col_pos[:, None] / periods
        angles = torch.cat([row_freqs[:, None].expand(rows, cols, -1), col_freqs[None].expand(rows, cols, -1)], -1)
        angles = angles.reshape(rows * cols, head_dim // 2).repeat(1, 2)
        return angles.cos(), angles.sin()
    inv_freq = 1.0 / theta**exponents
    row_pos = torch.arange(rows, device=device, dtype=torch.float32) / rows * reference_grid
    col_pos = torch.arange(cols, device=device, dtype=torch.float32) / cols * reference_grid
    row_freqs = (row_pos[:, None] * inv_freq).repeat_interleave(2, dim=-1)  # (rows, head_dim / 2)
    col_freqs = (col_pos[:, None] * inv_freq).repeat_interleave(2, dim=-1)  # (cols, head_dim / 2)
    angles = torch.cat(
        [row_freqs[:, None].expand(rows, cols, -1), col_freqs[None].expand(rows, cols, -1)], dim=-1
    ).reshape(rows * cols, head_dim)
    return angles.cos(), angles.sin()


def rotate_interleaved(hidden_states):
    """`(x0, x1, x2, x3, ...)` -> `(-x1, x0, -x3, x2, ...)`: a quarter turn of each consecutive pair (EVA-02)."""
    pairs = hidden_states.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def rotate_half(hidden_states):
    """`(x_1, x_2)` halves -> `(-x_2, x_1)`: the rotate-half layout (DINOv3)."""
    first, second = hidden_states.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


ROPE_ROTATIONS = {"eva02": rotate_interleaved, "dinov3": rotate_half}


def apply_rotary_pos_emb(query, key, cos, sin, rotate=rotate_interleaved):
    """Rotate the last `cos.shape[0]` tokens (the patches) of `query` and `key` `(B, heads, T, head_dim)` with the
    pair layout `rotate`; the prefix tokens before them (class tokens, registers) are left as they are."""
    num_prefix = query.shape[-2] - cos.shape[0]

    def apply(states):
        patches = states[..., num_prefix:, :]
        rotated = patches * cos + rotate(patches) * sin
        return torch.cat([states[..., :num_prefix, :], rotated.type_as(states)], dim=-2)

    return apply(query), apply(key)


class WeakTrSelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm / the authors' parameter layout).

    `key_bias=False` (with `qkv_bias`) is EVA-02's layout: `qkv` without bias plus `q_bias` and `v_bias`, the key
    bias fixed at zero. Rotary `position_embeddings` `(cos, sin)`, when given, rotate queries and keys before the
    attention kernel with the pair layout `rotate`, so eager and SDPA attention see the same inputs.
    """

    def __init__(self, config, hidden_size, num_heads, qkv_bias, attention_dropout, projection_dropout,
                 key_bias=True, rotate=rotate_interleaved):  # fmt: skip
        super().__init__()
        self.config = config
        self.rotate = rotate
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = attention_dropout
        self.is_causal = False
        separate_biases = qkv_bias and not key_bias
        self.qkv = nn.Linear(hidden_size, hidden_size * 3, bias=qkv_bias and key_bias)
        self.q_bias = nn.Parameter(torch.zeros(hidden_size)) if separate_biases else None
        self.v_bias = nn.Parameter(torch.zeros(hidden_size)) if separate_biases else None
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.proj_drop = nn.Dropout(projection_dropout)

    def forward(self, hidden_states, position_embeddings=None, output_attentions=False):
        batch_size, seq_len, hidden_size = hidden_states.shape
        qkv = self.qkv(hidden_states)  # through the module, so hooks, adapters and quantised layers see the call
        if self.q_bias is not None:
            qkv = qkv + torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        # (3, B, heads, T, head_dim)
        qkv = qkv.view(batch_size, seq_len, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        if position_embeddings is not None:
            query, key = apply_rotary_pos_emb(query, key, *position_embeddings, rotate=self.rotate)
        implementation = "eager" if output_attentions else (self.config._attn_implementation or "sdpa")
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        attn_output, attn_probs = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
        )
        attn_output = attn_output.reshape(batch_size, seq_len, hidden_size)
        return self.proj_drop(self.proj(attn_output)), attn_probs


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention that also returns the probabilities `(B, heads, T, T)`."""
    scores = torch.matmul(query, key.transpose(-2, -1)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_output = torch.matmul(F.dropout(probs, p=dropout, training=module.training), value)
    return attn_output.transpose(1, 2).contiguous(), probs


class WeakTrMLP(nn.Module):
    def __init__(self, hidden_size, intermediate_size, hidden_act, dropout):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.act = ACT2FN[hidden_act]
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.drop = nn.Dropout(dropout)

    def forward(self, hidden_states):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(hidden_states)))))


class WeakTrGatedMLP(nn.Module):
    """Gated MLP (SwiGLU with `hidden_act="silu"`, EVA-02): packed `fc1` gives `[gate; value]`, then
    `fc2(norm(act(gate) * value))`. Same attribute names and constructor as `WeakTrMLP`, so either fills a layer's
    `mlp` slot. `norm_eps` adds the LayerNorm of EVA-02-B/L on the gated hidden (`norm`; identity when None).
    Dropout sits where `WeakTrMLP` has it; the authors' EVA-02 has none inside, which their step-2 default
    (`hidden_dropout_prob=0`) matches."""

    def __init__(self, hidden_size, intermediate_size, hidden_act, dropout, norm_eps=None):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, 2 * intermediate_size)
        self.act = ACT2FN[hidden_act]
        self.norm = nn.Identity() if norm_eps is None else nn.LayerNorm(intermediate_size, eps=norm_eps)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.drop = nn.Dropout(dropout)

    def forward(self, hidden_states):
        gate, value = self.fc1(hidden_states).chunk(2, dim=-1)
        return self.drop(self.fc2(self.norm(self.drop(self.act(gate) * value))))


class WeakTrLayerScale(nn.Module):
    """LayerScale (DINOv2): a learned per-channel scale of a residual branch, initialised to `init_value`."""

    def __init__(self, hidden_size, init_value):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((hidden_size,), float(init_value)))

    def forward(self, hidden_states):
        return hidden_states * self.gamma


class WeakTrLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block; used by the encoder and by the step-2 decoder with their own sizes. Recomputed in
    the backward pass after `model.activation_checkpointing_enable()` (`gradient_checkpointing_enable()` before
    transformers 5.23).

    The variants fill fixed slots when the layer is built: `mlp_layer` (`WeakTrMLP` or `WeakTrGatedMLP`), `ls1` /
    `ls2` (LayerScale when `layerscale_value` is a number, identity when None), the attention's bias layout
    (`key_bias`) and its rotary pair layout (`rotate`). The defaults are the plain ViT block.
    """

    def __init__(self, config, hidden_size, num_heads, intermediate_size, hidden_act, layer_norm_eps, qkv_bias,
                 dropout, attention_dropout, drop_path_rate, *, mlp_layer=WeakTrMLP, layerscale_value=None,
                 key_bias=True, rotate=rotate_interleaved):  # fmt: skip
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.attn = WeakTrSelfAttention(
            config, hidden_size, num_heads, qkv_bias, attention_dropout, dropout, key_bias=key_bias, rotate=rotate
        )
        self.ls1 = nn.Identity() if layerscale_value is None else WeakTrLayerScale(hidden_size, layerscale_value)
        self.drop_path = WeakTrDropPath(drop_path_rate)
        self.norm2 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.mlp = mlp_layer(hidden_size, intermediate_size, hidden_act, dropout)
        self.ls2 = nn.Identity() if layerscale_value is None else WeakTrLayerScale(hidden_size, layerscale_value)

    def forward(self, hidden_states, position_embeddings=None, output_attentions=False):
        """Returns `(hidden_states, attention_probs or None, attention-branch output before the residual add)`; the
        branch output includes LayerScale (it is what the residual adds, before stochastic depth)."""
        attn_output, attn_probs = self.attn(
            self.norm1(hidden_states), position_embeddings=position_embeddings, output_attentions=output_attentions
        )
        attn_output = self.ls1(attn_output)
        hidden_states = hidden_states + self.drop_path(attn_output)
        hidden_states = hidden_states + self.drop_path(self.ls2(self.mlp(self.norm2(hidden_states))))
        return hidden_states, attn_probs, attn_output


# ---------------------------------------------------------------------------------------------------------------------
# Pretrained base class and the shared encoder
# ---------------------------------------------------------------------------------------------------------------------


class WeakTrPreTrainedModel(PreTrainedModel):
    config: WeakTrConfig
    config_class = WeakTrConfig
    base_model_prefix = "weaktr"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["WeakTrLayer"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True
    _supports_attention_backend = True

    @classmethod
    def from_timm_backbone(cls, backbone, id2label=None, arch=None, pretrained=True, position_interpolation=None,
                           **config_overrides):  # fmt: skip
        """
        This model on a timm backbone, its config read from the timm model (no table per name) and its encoder
        initialised with the backbone's weights (`weaktr_hf.timm_backbone.load_timm_backbone`).

        Args:
            backbone: a timm model instance, a timm name (`"vit_base_patch16_dinov3_qkvb.lvd1689m"`, downloads with
                `pretrained`), a folder saved by `timm.models.save_for_hf`, or a checkpoint file with `arch`.
            id2label: the classes (step 1: foreground classes; step 2: with background as label 0).
            arch: the timm name a checkpoint file was saved from.
            position_interpolation: resize of the position table to `image_size` (`"bicubic"` / `"bilinear"`;
                default: the step's, as `load_timm_backbone`).
            config_overrides: any `WeakTrConfig` field, e.g. `image_size=480` or `layer_norm_eps=1e-5`.

        Supported: timm's `VisionTransformer` (ViT, DeiT, DeiT-III, DINOv2 with or without registers) and `Eva`
        (EVA-02, DINOv3); other models are refused with that list. For step 2 the decoder follows the encoder's
        width as in the authors' Segmenter (heads = width / 64, MLP 4 x width). Needs timm.
        """
        from .timm_backbone import from_timm_backbone

        return from_timm_backbone(
            cls, backbone, id2label=id2label, arch=arch, pretrained=pretrained,
            position_interpolation=position_interpolation, **config_overrides,
        )  # fmt: skip

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as transformers does; a model saved with its code also names its encoder for `AutoModel` in the
        config's `auto_map`, so `AutoModel` loads the encoder of either step where weaktr-hf is not installed."""
        if self._auto_class is not None:
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}),
                                    "AutoModel": "modeling_weaktr.WeakTrModel"}  # fmt: skip
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module):
        """Truncated-normal linear/conv weights and zero biases, as timm's ViT initialisation."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, WeakTrLayerScale):
            init.constant_(module.gamma, module.init_value)
        elif isinstance(module, WeakTrSelfAttention) and module.q_bias is not None:
            init.zeros_(module.q_bias)
            init.zeros_(module.v_bias)
        elif isinstance(module, WeakTrModel):
            init.trunc_normal_(module.cls_token, std=std)
            for embedding in (module.pos_embed, module.reg_token):
                if embedding is not None:
                    init.trunc_normal_(embedding, std=std)
        elif isinstance(module, WeakTrMaskTransformerDecoder):
            class_std = module.class_embedding_std
            init.trunc_normal_(module.cls_emb, std=std if class_std is None else class_std)
            scale = module.proj_patch.shape[0] ** -0.5
            init.normal_(module.proj_patch, std=scale)
            init.normal_(module.proj_classes, std=scale)


class WeakTrModel(WeakTrPreTrainedModel):
    """
    The plain ViT encoder both WeakTr steps share: patch embedding, `num_prefix_tokens` learned prefix tokens,
    position embeddings resized to any input grid, pre-norm layers with stochastic depth, optional final LayerNorm.
    Config fields choose the variants of the authors' step-2 backbones: LayerScale (DINOv2-S), gated MLP, q/v biases
    and 2-D rotary embeddings of the patch tokens (EVA-02-S); and past them, register tokens (DINOv2-reg, DINOv3),
    DINOv3's rotary embedding without a learned position table, EVA-02-B/L's MLP norm. The rotary table is built
    once per forward for the input's grid and handed to every layer. Tokens are laid out as `[prefix tokens,
    register tokens, patches]`; only prefix tokens and patches have position rows.

    Step 1 uses `num_labels` class tokens and no final LayerNorm (the authors' forward never applies it); step 2 uses
    one [CLS] token and the final LayerNorm. As a standalone model (`AutoModel`) it is the encoder of the saved
    model: by default a config saved by a `WeakTrForCAM` (its `architectures`) gives the step-1 layout (prefix tokens,
    norm, position-table resize), any other the step-2 one.
    """

    def __init__(self, config: WeakTrConfig, num_prefix_tokens: int | None = None, use_final_norm: bool | None = None,
                 position_interpolation: str | None = None):  # fmt: skip
        super().__init__(config)
        step1 = "WeakTrForCAM" in (config.architectures or [])
        num_prefix_tokens = (config.num_labels if step1 else 1) if num_prefix_tokens is None else num_prefix_tokens
        use_final_norm = (not step1) if use_final_norm is None else use_final_norm
        position_interpolation = position_interpolation or ("bicubic_scale_factor" if step1 else "bilinear")
        self.num_prefix_tokens = num_prefix_tokens
        self.num_register_tokens = config.num_register_tokens
        self.grid_size = config.image_grid
        self.position_interpolation = config.position_embedding_interpolation or position_interpolation
        num_patches = self.grid_size[0] * self.grid_size[1]

        self.patch_embed = WeakTrPatchEmbeddings(config)
        self.cls_token = nn.Parameter(torch.zeros(1, num_prefix_tokens, config.hidden_size))
        registers = config.num_register_tokens
        self.reg_token = nn.Parameter(torch.zeros(1, registers, config.hidden_size)) if registers else None
        self.pos_embed = (
            nn.Parameter(torch.zeros(1, num_prefix_tokens + num_patches, config.hidden_size))
            if config.use_absolute_position_embeddings
            else None
        )
        self.pos_drop = nn.Dropout(config.hidden_dropout_prob)
        # Stochastic depth grows linearly with depth, as in DeiT. Computed on the CPU whatever the default device, so
        # that building the model under `torch.device("meta")` (empty-weights loading) works.
        rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers, device="cpu").tolist()
        gated_mlp = partial(WeakTrGatedMLP, norm_eps=config.layer_norm_eps if config.use_mlp_norm else None)
        self.blocks = nn.ModuleList(
            WeakTrLayer(
                config, config.hidden_size, config.num_attention_heads, config.intermediate_size, config.hidden_act,
                config.layer_norm_eps, config.qkv_bias, config.hidden_dropout_prob,
                config.attention_probs_dropout_prob, rate,
                mlp_layer=gated_mlp if config.use_gated_mlp else WeakTrMLP,
                layerscale_value=config.layerscale_value, key_bias=config.key_bias,
                rotate=ROPE_ROTATIONS[config.rope_type],
            )  # fmt: skip
            for rate in rates
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if use_final_norm else None
        self.post_init()

    def get_input_embeddings(self):
        return self.patch_embed

    def _check_unsupported_inputs(self, kwargs, grid):
        for name in ("head_mask", "attention_mask"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"WeakTr does not support {name}: every attention head and every patch is used. Drop {name}=."
                )
        if kwargs.get("interpolate_pos_encoding") is False and tuple(grid) != tuple(self.grid_size):
            raise ValueError(
                f"interpolate_pos_encoding=False, but the input is a {grid[0]}x{grid[1]} patch grid and the position "
                f"table is {self.grid_size[0]}x{self.grid_size[1]} (config.image_size); WeakTr always resizes the "
                "table to the input. Pass images of config.image_size, or drop interpolate_pos_encoding=False."
            )

    @property
    def num_leading_tokens(self):
        """Tokens before the first patch: the prefix tokens and the registers."""
        return self.num_prefix_tokens + self.num_register_tokens

    def interpolate_pos_encoding(self, grid):
        """The position table for an input of `grid = (rows, cols)` patches (unchanged for the training grid); None
        for an encoder without one (DINOv3)."""
        if self.pos_embed is None:
            return None
        prefix = self.pos_embed[:, : self.num_prefix_tokens]
        patches = resize_position_embeddings(
            self.pos_embed[:, self.num_prefix_tokens :], self.grid_size, grid, self.position_interpolation
        )
        return torch.cat([prefix, patches], dim=1)

    def rotary_embeddings(self, grid, device):
        """The 2-D rotary table `(cos, sin)` for `grid = (rows, cols)` patches (see `build_2d_rope`)."""
        config = self.config
        return build_2d_rope(
            grid, config.head_dim, config.rope_theta, config.rope_reference_grid, device, config.rope_type
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attention_outputs: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> WeakTrModelOutput | tuple:
        r"""
        Other keyword arguments (e.g. the trainer's `num_items_in_batch`) are accepted and unused, except these, which
        would otherwise be silently ignored: `head_mask` and `attention_mask` (not supported: every head and every
        patch is used, the CAM fuses all heads' attention) raise an error; `interpolate_pos_encoding=False` raises an
        error for an input whose patch grid differs from the training grid, as the position table is always resized
        to the input.
        """
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict

        patches = self.patch_embed(pixel_values)
        grid = (pixel_values.shape[-2] // self.config.patch_size, pixel_values.shape[-1] // self.config.patch_size)
        self._check_unsupported_inputs(kwargs, grid)
        batch_size = patches.shape[0]
        hidden_states = torch.cat([self.cls_token.expand(batch_size, -1, -1), patches], dim=1)
        if self.pos_embed is not None:
            hidden_states = hidden_states + self.interpolate_pos_encoding(grid)
        if self.reg_token is not None:  # registers go between the prefix tokens and the patches, without positions
            prefix, patches = hidden_states.split([self.num_prefix_tokens, patches.shape[1]], dim=1)
            hidden_states = torch.cat([prefix, self.reg_token.expand(batch_size, -1, -1), patches], dim=1)
        hidden_states = self.pos_drop(hidden_states)
        position_embeddings = self.rotary_embeddings(grid, pixel_values.device) if self.config.use_rope else None

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        all_attention_outputs = () if output_attention_outputs else None
        for block in self.blocks:
            hidden_states, attn_probs, attn_output = block(
                hidden_states, position_embeddings=position_embeddings, output_attentions=output_attentions
            )
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_probs,)
            if output_attention_outputs:
                all_attention_outputs += (attn_output,)
        if self.norm is not None:
            hidden_states = self.norm(hidden_states)

        output = WeakTrModelOutput(
            last_hidden_state=hidden_states,
            pooler_output=hidden_states[:, : self.num_prefix_tokens],
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            attention_outputs=all_attention_outputs,
        )
        return output if return_dict else output.to_tuple()


# ---------------------------------------------------------------------------------------------------------------------
# Step 1: CAM generation with Adaptive Attention Fusion
# ---------------------------------------------------------------------------------------------------------------------


class WeakTrAdaptiveAttentionFusion(nn.Module):
    """
    Adaptive Attention Fusion (paper, Sec. 3.1): one weight per attention map (K = layers x heads), predicted from
    the heads' own features, and the weighted mean of the maps.

    Channel order follows the authors' checkpoints: channel `head * num_layers + layer`, and a layer's attention
    output is split into heads with the head index varying fastest along the hidden dimension.
    """

    def __init__(self, config: WeakTrConfig):
        super().__init__()
        channels = config.num_hidden_layers * config.num_attention_heads
        head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.pooling = config.aaf_pooling
        # Two linears with no activation between them, as released.
        self.attn_feat_ffn = nn.Sequential(
            nn.Linear(head_dim, head_dim // config.aaf_feat_reduction),
            nn.Linear(head_dim // config.aaf_feat_reduction, 1),
        )
        self.attn_head_ffn = nn.Sequential(
            nn.Linear(channels, channels // config.aaf_reduction, bias=False),
            nn.ReLU(),
            nn.Linear(channels // config.aaf_reduction, channels, bias=False),
            nn.Sigmoid(),
        )

    def head_features(self, attention_outputs):
        """Pool each head's feature over tokens: L x `(B, T, D)` -> `(B, heads * L, D / heads)`, head-major."""
        batch_size, _, hidden_size = attention_outputs[0].shape
        pooled = []
        for layer_output in attention_outputs:
            # Head index fastest along D: view D as (D / heads, heads).
            per_head = layer_output.view(batch_size, -1, hidden_size // self.num_heads, self.num_heads)
            pooled.append(per_head.amax(dim=1) if self.pooling == "max" else per_head.mean(dim=1))
        stacked = torch.stack(pooled, dim=1)  # (B, L, head_dim, heads)
        return stacked.permute(0, 3, 1, 2).reshape(batch_size, -1, hidden_size // self.num_heads)

    def forward(self, attentions, attention_outputs):
        """
        Args:
            attentions: per layer `(B, heads, T, T)` attention probabilities (detached here).
            attention_outputs: per layer `(B, T, D)` attention-branch outputs (detached here).

        Returns:
            `(fused (B, T, T), head_weights (B, heads * L))`.
        """
        features = self.head_features([output.detach() for output in attention_outputs])
        head_weights = self.attn_head_ffn(self.attn_feat_ffn(features).squeeze(-1))
        num_layers = len(attentions)
        weights = head_weights.view(head_weights.shape[0], self.num_heads, num_layers)
        # Weighted mean over all K maps without materialising a (B, K, T, T) stack.
        fused = None
        for layer, layer_attention in enumerate(attentions):
            term = torch.einsum("bh,bhij->bij", weights[:, :, layer], layer_attention.detach())
            fused = term if fused is None else fused + term
        return fused / weights[0].numel(), head_weights


class WeakTrForCAM(WeakTrPreTrainedModel):
    """
    WeakTr step 1 (paper, Sec. 3.1): a ViT with one class token per foreground class, trained from image-level labels
    with three multi-label heads (class tokens, coarse CAM, fine CAM). The fine CAM refines
    `cross_attention * relu(coarse_cam)` with the fused patch attention; its loss trains only the fusion weights.

    The model always computes attention probabilities eagerly, whatever `attn_implementation` says: the fusion needs
    them.
    """

    def __init__(self, config: WeakTrConfig):
        if config.problem_type is None:
            config.problem_type = "multi_label_classification"
        super().__init__(config)
        self.num_labels = config.num_labels
        self.weaktr = WeakTrModel(
            config, num_prefix_tokens=config.num_labels, use_final_norm=False,
            position_interpolation="bicubic_scale_factor",
        )  # fmt: skip
        self.head = nn.Conv2d(config.hidden_size, config.num_labels, kernel_size=3, padding=1)
        self.adaptive_attention_fusion = WeakTrAdaptiveAttentionFusion(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> WeakTrCAMOutput | tuple:
        r"""
        labels (`torch.FloatTensor` of shape `(batch_size, num_labels)`, *optional*):
            Multi-hot image-level labels (1 for each foreground class present). A `(batch_size,)` integer tensor of
            class ids (one class per image) is taken as one-hot rows, except with one foreground class, where it
            is refused (class ids or presence flags cannot be told apart). The loss follows `config.problem_type`:
            `"multi_label_classification"` (WeakTr's, set when the config has none), or as transformers' image
            classifiers, `"single_label_classification"` (class ids, cross-entropy) or `"regression"` (mean squared
            error).
        """
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.weaktr(
            pixel_values,
            output_attentions=True,
            output_hidden_states=output_hidden_states,
            output_attention_outputs=True,
            return_dict=True,
            **kwargs,
        )
        num_classes = self.num_labels
        first_patch = self.weaktr.num_leading_tokens  # class tokens, then registers (left out of the CAMs)
        batch_size = pixel_values.shape[0]
        grid = (pixel_values.shape[-2] // self.config.patch_size, pixel_values.shape[-1] // self.config.patch_size)
        tokens = outputs.last_hidden_state

        logits = tokens[:, :num_classes].mean(dim=-1)
        # Contiguous like the authors' input to the conv, so the same conv kernel runs (bitwise-equal CAMs).
        patch_map = tokens[:, first_patch:].transpose(1, 2).reshape(batch_size, -1, *grid).contiguous()
        coarse_cam = self.head(patch_map)
        coarse_logits = coarse_cam.mean(dim=(2, 3))

        fused, head_weights = self.adaptive_attention_fusion(outputs.attentions, outputs.attention_outputs)
        cross_attention = fused[:, :num_classes, first_patch:].reshape(batch_size, num_classes, *grid)
        patch_attention = fused[:, first_patch:, first_patch:]
        cams = cross_attention * F.relu(coarse_cam.detach())
        fine_cam = torch.bmm(cams.flatten(2), patch_attention.transpose(1, 2)).view_as(cams)
        if self.config.fine_cam_scale != 1.0:
            fine_cam = fine_cam * self.config.fine_cam_scale
        fine_logits = fine_cam.mean(dim=(2, 3))

        loss = class_loss = coarse_loss = fine_loss = None
        if labels is not None:
            labels = self._check_labels(labels, batch_size)
            class_loss, coarse_loss, fine_loss = (
                self._image_loss(head_logits, labels) for head_logits in (logits, coarse_logits, fine_logits)
            )
            loss = class_loss + coarse_loss + fine_loss

        output = WeakTrCAMOutput(
            loss=loss,
            class_loss=class_loss,
            coarse_loss=coarse_loss,
            fine_loss=fine_loss,
            logits=logits,
            coarse_logits=coarse_logits,
            fine_logits=fine_logits,
            coarse_cam=coarse_cam,
            fine_cam=fine_cam,
            cross_attention=cross_attention,
            head_weights=head_weights,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()

    def _check_labels(self, labels, batch_size):
        """Labels in the form `config.problem_type` needs; class ids `(batch_size,)` become one-hot rows for the
        multi-label loss (an image with one class is a multi-label image with one class present)."""
        problem_type = self.config.problem_type
        is_class_ids = labels.ndim == 1 and not labels.is_floating_point()
        if problem_type == "multi_label_classification" and is_class_ids and self.num_labels == 1:
            # With one class, a class id is always 0, so 0/1 presence flags would be read as "present" for every image.
            raise ValueError(
                f"labels of shape ({batch_size},) and dtype {labels.dtype} are ambiguous with one foreground class "
                "(class ids, which are all 0, or 0/1 presence flags?); give multi-hot labels of shape (batch_size, 1), "
                "e.g. labels[:, None].float() for presence flags."
            )
        if problem_type == "multi_label_classification" and is_class_ids and labels.shape[0] == batch_size:
            self._check_class_ids(labels)
            return F.one_hot(labels.long(), self.num_labels).float()
        if problem_type == "single_label_classification":
            if not (is_class_ids and labels.shape[0] == batch_size):
                raise ValueError(
                    f"labels must be class ids of shape (batch_size,) = ({batch_size},) for problem_type "
                    f"'single_label_classification', got {tuple(labels.shape)} {labels.dtype}."
                )
            self._check_class_ids(labels)
            return labels.long()
        if problem_type == "regression" and self.num_labels == 1 and labels.shape == (batch_size,):
            labels = labels[:, None]
        if labels.shape != (batch_size, self.num_labels):
            raise ValueError(
                f"labels must be multi-hot of shape (batch_size, num_labels) = ({batch_size}, {self.num_labels}), got "
                f"{tuple(labels.shape)}. Build them from image-level class ids with one column per foreground class "
                f"of config.id2label, or give one class id per image as a (batch_size,) integer tensor."
            )
        return labels.float()

    def _check_class_ids(self, labels):
        if ((labels < 0) | (labels >= self.num_labels)).any():
            raise ValueError(f"labels hold class ids outside [0, {self.num_labels}): {labels.tolist()[:10]}.")

    def _image_loss(self, head_logits, labels):
        """One head's image-level loss under `config.problem_type`, as transformers' image classifiers: multi-label
        soft margin (the paper's loss, and the default), cross-entropy, or mean squared error."""
        head_logits = head_logits.float()
        if self.config.problem_type == "single_label_classification":
            return F.cross_entropy(head_logits, labels)
        if self.config.problem_type == "regression":
            return F.mse_loss(head_logits, labels)
        return F.multilabel_soft_margin_loss(head_logits, labels)


# ---------------------------------------------------------------------------------------------------------------------
# Step 2: online retraining with the gradient-clipping decoder
# ---------------------------------------------------------------------------------------------------------------------


class WeakTrMaskTransformerDecoder(nn.Module):
    """
    Mask-transformer decoder (paper, Sec. 3.2, after Segmenter): patch tokens and one learned embedding per class go
    through a few transformer layers; masks are cosine similarities of projected patches and classes, LayerNorm'd
    over classes.
    """

    def __init__(self, config: WeakTrConfig):
        super().__init__()
        width = config.decoder_hidden_size
        self.num_labels = config.num_labels
        self.proj_dec = nn.Linear(config.hidden_size, width)
        self.cls_emb = nn.Parameter(torch.zeros(1, config.num_labels, width))
        self.class_embedding_std = config.decoder_class_embedding_std
        num_layers = config.decoder_num_hidden_layers
        rates = torch.linspace(0, config.decoder_drop_path_rate, num_layers, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            WeakTrLayer(
                config, width, config.decoder_num_attention_heads, config.decoder_intermediate_size, "gelu",
                config.decoder_layer_norm_eps, True, config.decoder_hidden_dropout_prob,
                config.decoder_hidden_dropout_prob, rate,
            )  # fmt: skip
            for rate in rates
        )
        self.decoder_norm = nn.LayerNorm(width, eps=config.decoder_layer_norm_eps)
        self.proj_patch = nn.Parameter(torch.zeros(width, width))
        self.proj_classes = nn.Parameter(torch.zeros(width, width))
        self.mask_norm = nn.LayerNorm(config.num_labels, eps=config.decoder_layer_norm_eps)

    def forward(self, patch_tokens, grid, output_attentions=False, output_aux_logits=False):
        """`(B, rows * cols, hidden_size)` patch tokens -> `(B, num_labels, rows, cols)` logits.

        With `output_aux_logits`, the tokens before the last block also go through the same head (norm, projections,
        mask norm), as the authors' `MultiMaskTransformer` (OnlineRetraining/segm/model/decoder.py:175-191); they are
        returned as a third element (None otherwise).
        """
        hidden_states = self.proj_dec(patch_tokens)
        hidden_states = torch.cat([hidden_states, self.cls_emb.expand(hidden_states.shape[0], -1, -1)], dim=1)
        attentions = ()
        aux_logits = None
        for index, block in enumerate(self.blocks):
            if output_aux_logits and index == len(self.blocks) - 1:
                aux_logits = self.masks(hidden_states, grid)
            hidden_states, attn_probs, _ = block(hidden_states, output_attentions=output_attentions)
            attentions += (attn_probs,)
        return self.masks(hidden_states, grid), attentions, aux_logits

    def masks(self, hidden_states, grid):
        """The head: decoder tokens `(B, rows * cols + num_labels, width)` -> `(B, num_labels, rows, cols)` logits."""
        hidden_states = self.decoder_norm(hidden_states)
        patches = hidden_states[:, : -self.num_labels] @ self.proj_patch
        classes = hidden_states[:, -self.num_labels :] @ self.proj_classes
        masks = F.normalize(patches, dim=-1) @ F.normalize(classes, dim=-1).transpose(1, 2)
        masks = self.mask_norm(masks)
        return masks.transpose(1, 2).reshape(masks.shape[0], self.num_labels, *grid)


def padded_length(length, patch_size):
    """`length` rounded up to a multiple of `patch_size`.

    Written with floor division: `torch.compile` with dynamic shapes cannot trace `%` on symbolic sizes here.
    """
    return (length + patch_size - 1) // patch_size * patch_size


def upsample_logits(logits, input_size, patch_size):
    """Patch-resolution logits -> `input_size` `(H, W)` pixels.

    The model pads inputs bottom/right to a multiple of `patch_size`; logits are upsampled bilinearly to the padded
    size and the padding is cropped, so predictions line up with the unpadded input.
    """
    height, width = input_size
    padded = (padded_length(height, patch_size), padded_length(width, patch_size))
    upsampled = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)
    return upsampled[..., :height, :width]


def clip_pixel_losses(pixel_losses, valid_mask, start_value, window_size, average="all_pixels"):
    """
    Gradient clipping of the step-2 loss (paper, Sec. 3.2): once the batch's mean loss is at most `start_value`,
    each pixel's loss is capped at max(mean loss of its `window_size` window, mean loss of the batch); pixels above
    the cap keep the cap's value but carry no gradient, so noisy pseudo-labels stop dominating training.

    Args:
        pixel_losses: `(B, H, W)` per-pixel losses, 0 at ignored pixels.
        valid_mask: `(B, H, W)` bool, False at ignored pixels.
        average: `"all_pixels"` takes every mean over all pixels, ignored ones counted as zeros (the authors' way);
            `"valid_pixels"` (and `"classes"`) over non-ignored pixels only.

    Windows tile the image from the top-left over the batch-averaged loss map; a border window that sticks out
    counts only real pixels. When H and W are multiples of `window_size` this equals the authors' implementation.
    A map smaller than the window has one window, the whole map: the cap is then the global mean (warned once).
    """
    detached = pixel_losses.detach()
    weights = valid_mask.to(detached.dtype) if average != "all_pixels" else torch.ones_like(detached)
    global_mean = (detached * weights).sum() / weights.sum().clamp_min(1.0)
    if global_mean > start_value:
        return pixel_losses
    height, width = detached.shape[-2:]
    if height < window_size or width < window_size:
        logger.warning_once(
            f"gradient clipping: the {height}x{width} label map is smaller than clip_window_size {window_size}, so "
            "the local window mean is the global mean and clipping is plain global-mean clipping; train on crops "
            "at least clip_window_size wide, or lower clip_window_size."
        )
    pad = (0, (-width) % window_size, 0, (-height) % window_size)
    loss_sum = F.pad((detached * weights).sum(0, keepdim=True), pad).unsqueeze(1)
    count = F.pad(weights.sum(0, keepdim=True), pad).unsqueeze(1)
    window_mean = F.avg_pool2d(loss_sum, window_size) / F.avg_pool2d(count, window_size).clamp_min(1e-12)
    cap = torch.maximum(window_mean, global_mean)
    cap = cap.repeat_interleave(window_size, dim=-2).repeat_interleave(window_size, dim=-1)[0, :, :height, :width]
    return torch.where(detached > cap, cap, pixel_losses)


def semantic_segmentation_loss(logits, labels, config):
    """Per-pixel cross-entropy at the label size with optional gradient clipping, averaged per `config.loss_average`."""
    ignore_index = config.semantic_loss_ignore_index
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    pixel_losses = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    valid = labels != ignore_index
    if config.use_gradient_clipping:
        pixel_losses = clip_pixel_losses(
            pixel_losses, valid, config.clip_start_value, config.clip_window_size, config.loss_average
        )
    if config.loss_average == "valid_pixels":
        return (pixel_losses * valid).sum() / valid.sum().clamp_min(1)
    if config.loss_average == "classes":
        return class_balanced_mean(pixel_losses, labels, valid, config.num_labels, config.loss_class_balance)
    return pixel_losses.mean()


def class_balanced_mean(pixel_losses, labels, valid, num_labels, balance=1.0):
    """Each class's mean pixel loss, averaged over the classes present in the batch with weights proportional to
    (pixel count) ** (1 - balance): with `balance` 1 every class the labels hold weighs the same whatever its size,
    with 0 this is the mean over valid pixels, in between rare classes count more than their pixels. Ignored pixels
    count nowhere; 0 with a graph if nothing is valid."""
    index = torch.where(valid, labels, 0).flatten()
    weights = valid.flatten().to(pixel_losses.dtype)
    counts = torch.zeros(num_labels, dtype=pixel_losses.dtype, device=pixel_losses.device).index_add_(0, index, weights)
    sums = torch.zeros_like(counts).index_add_(0, index, pixel_losses.flatten() * weights)
    present = counts > 0
    if not present.any():
        return pixel_losses.sum() * 0.0
    class_weights = counts[present] ** (1.0 - balance)
    return (class_weights * sums[present] / counts[present]).sum() / class_weights.sum()


class WeakTrForSemanticSegmentation(WeakTrPreTrainedModel):
    """
    WeakTr step 2 (paper, Sec. 3.2): a ViT encoder (one [CLS] token, final LayerNorm) and a mask-transformer decoder,
    retrained online on CAM pseudo-labels with the gradient-clipping loss. Label 0 is background.

    `logits` are at patch resolution of the input padded bottom/right to a multiple of the patch size; use
    [`upsample_logits`] (or `WeakTrImageProcessor.post_process_semantic_segmentation` on unpadded inputs) to get
    pixel predictions.
    """

    def __init__(self, config: WeakTrConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.weaktr = WeakTrModel(config, num_prefix_tokens=1, use_final_norm=True, position_interpolation="bilinear")
        self.decoder = WeakTrMaskTransformerDecoder(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_aux_logits: bool = False,
        use_auxiliary_ensemble: bool | None = None,
        **kwargs,
    ) -> WeakTrSemanticSegmenterOutput | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
            Per-pixel class ids in `[0, num_labels)`, or `config.semantic_loss_ignore_index` to ignore a pixel.
        output_aux_logits (`bool`, *optional*, defaults to `False`):
            Also return `aux_logits`: the tokens before the last decoder block decoded by the same head (shape and
            resolution of `logits`). The authors' evaluation adds 0.8 x their softmax to that of `logits`.
        use_auxiliary_ensemble (`bool`, *optional*):
            Return as `logits` the log of the ensemble probabilities of `config.auxiliary_ensemble_weight` (default:
            when that weight is > 0 and no `labels` are given); `False` gives the final decoder output alone.
        """
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        return_dict = self.config.return_dict if return_dict is None else return_dict
        patch_size = self.config.patch_size
        height, width = pixel_values.shape[-2:]
        padded = F.pad(
            pixel_values, (0, padded_length(width, patch_size) - width, 0, padded_length(height, patch_size) - height)
        )
        grid = (padded.shape[-2] // patch_size, padded.shape[-1] // patch_size)

        outputs = self.weaktr(
            padded,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        weight = self.config.auxiliary_ensemble_weight
        if use_auxiliary_ensemble is None:
            use_auxiliary_ensemble = weight > 0 and labels is None
        logits, decoder_attentions, aux_logits = self.decoder(
            outputs.last_hidden_state[:, self.weaktr.num_leading_tokens :], grid, output_attentions=output_attentions,
            output_aux_logits=output_aux_logits or use_auxiliary_ensemble,
        )  # fmt: skip
        if use_auxiliary_ensemble:
            if labels is not None:
                raise ValueError("use_auxiliary_ensemble is for inference; the loss is on the final decoder output.")
            probabilities = (logits.float().softmax(1) + weight * aux_logits.float().softmax(1)) / (1.0 + weight)
            logits = probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log().to(logits.dtype)
            aux_logits = aux_logits if output_aux_logits else None

        loss = None
        if labels is not None:
            labels = self._check_labels(labels, pixel_values.shape[0])
            loss = semantic_segmentation_loss(upsample_logits(logits, (height, width), patch_size), labels, self.config)

        output = WeakTrSemanticSegmenterOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            aux_logits=aux_logits,
            decoder_attentions=decoder_attentions if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()

    def _check_labels(self, labels, batch_size):
        if labels.ndim != 3 or labels.shape[0] != batch_size:
            raise ValueError(
                f"labels must be class-id maps of shape (batch_size, height, width) with batch_size {batch_size}, got "
                f"{tuple(labels.shape)}."
            )
        if labels.dtype != torch.long:
            raise ValueError(f"labels must be int64 class ids, got {labels.dtype}.")
        ignore = self.config.semantic_loss_ignore_index
        bad = (labels != ignore) & ((labels < 0) | (labels >= self.num_labels))
        if bad.any():
            raise ValueError(
                f"labels hold class ids outside [0, {self.num_labels}) that are not the ignore index {ignore}: "
                f"{sorted(labels[bad].unique().tolist())[:10]}. Check config.id2label against the dataset's classes."
            )
        return labels


# The image-segmentation pipeline checks the model's class name against transformers' own name tables, which models
# added with `register` do not reach, and logs "The model ... is not supported" for them. Listing the name here (the
# Auto classes never read this table for "weaktr", not one of transformers' config types) silences that wherever
# this file is imported, also as remote code where weaktr-hf is not installed.
MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES.setdefault("weaktr", WeakTrForSemanticSegmentation.__name__)


__all__ = [
    "WeakTrCAMOutput",
    "WeakTrForCAM",
    "WeakTrForSemanticSegmentation",
    "WeakTrModel",
    "WeakTrModelOutput",
    "WeakTrPreTrainedModel",
    "WeakTrSemanticSegmenterOutput",
    "clip_pixel_losses",
    "resize_position_embeddings",
    "semantic_segmentation_loss",
    "upsample_logits",
]

