"""WeakTr model configuration."""

from transformers import PreTrainedConfig

POSITION_INTERPOLATIONS = ("bicubic_scale_factor", "bicubic", "bilinear")
AAF_POOLINGS = ("max", "avg")
LOSS_AVERAGES = ("all_pixels", "valid_pixels", "classes")
ROPE_TYPES = ("eva02", "dinov3")
# Block layouts of the authors' step-2 encoders (their OnlineRetraining/segm/model/{vit,eva02}.py): the WeakTrConfig fields that differ.
# "vit" is DeiT-S and the augreg ViT-S; "dinov2" adds LayerScale; "eva02" has a SiLU-gated MLP (EVA-02-S: width 1024,
# set `intermediate_size` with it), query/value biases only and 2-D RoPE. "dinov3" (DINOv3 ViT-S/B/L, timm
# `vit_*_patch16_dinov3`) is past the paper: LayerScale, 4 register tokens, DINOv3's rotary embedding and no learned
# position table. Sizes, registers and biases of any timm backbone are read from the model itself
# (`weaktr_hf.timm_backbone.timm_backbone_config`).
ENCODER_VARIANTS = {
    "vit": dict(hidden_act="gelu", layerscale_value=None, use_gated_mlp=False, key_bias=True, use_rope=False),
    "dinov2": dict(hidden_act="gelu", layerscale_value=1.0, use_gated_mlp=False, key_bias=True, use_rope=False),
    "eva02": dict(hidden_act="silu", layerscale_value=None, use_gated_mlp=True, key_bias=False, use_rope=True),
    "dinov3": dict(hidden_act="gelu", layerscale_value=1.0, use_gated_mlp=False, key_bias=True, use_rope=True,
                   rope_type="dinov3", rope_theta=100.0, use_absolute_position_embeddings=False,
                   num_register_tokens=4),
}


class WeakTrConfig(PreTrainedConfig):
    r"""
    Configuration of both WeakTr models: [`WeakTrForCAM`] (step 1, CAM generation) and
    [`WeakTrForSemanticSegmentation`] (step 2, online retraining). The defaults describe the authors' DeiT-S runs on
    PASCAL VOC (hustvl/WeakTr `main.py` for step 1, `OnlineRetraining/segm/config.yml` for step 2): encoder fields
    are named as in transformers' `ViTConfig`.

    Classes come from `id2label` / `num_labels`, as in transformers (2 generic labels when neither is given). For
    step 1 they are the foreground classes (one class token each); for step 2 they include background as label 0.
    `weaktr_hf.labels` has the VOC and COCO layouts, e.g. `WeakTrConfig(id2label=foreground_id2label(VOC_CLASSES))`.

    Args:
        image_size (`int` or `tuple[int, int]`, *optional*, defaults to 224):
            Training input size; the position-embedding table holds one row per patch of this grid.
        patch_size (`int`, *optional*, defaults to 16):
            Side of a square patch.
        num_channels (`int`, *optional*, defaults to 3):
            Input channels.
        hidden_size (`int`, *optional*, defaults to 384):
            Encoder width (DeiT-S).
        num_hidden_layers (`int`, *optional*, defaults to 12):
            Encoder depth.
        num_attention_heads (`int`, *optional*, defaults to 6):
            Attention heads per encoder layer.
        intermediate_size (`int`, *optional*, defaults to 1536):
            Encoder MLP width (4x hidden size).
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            MLP activation, a key of `transformers.activations.ACT2FN`.
        hidden_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout after the attention projection and in the MLP of the encoder.
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout on encoder attention probabilities.
        drop_path_rate (`float`, *optional*, defaults to 0.1):
            Stochastic depth of the last encoder layer; layer `i` uses `drop_path_rate * i / (L - 1)`.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            Encoder LayerNorm epsilon (timm's DeiT uses 1e-6; the authors' step-2 encoder uses 1e-5).
        qkv_bias (`bool`, *optional*, defaults to `True`):
            Bias in the fused query/key/value projection.
        key_bias (`bool`, *optional*, defaults to `True`):
            With `qkv_bias`, whether the key projection has a bias too. `False` is EVA-02's layout: separate
            `q_bias` and `v_bias` parameters and a key bias fixed at zero.
        layerscale_value (`float`, *optional*):
            LayerScale (DINOv2): initial value of the learned per-channel scales `ls1.gamma` / `ls2.gamma` applied to
            each residual branch. `None` means no LayerScale at all (no parameters).
        use_gated_mlp (`bool`, *optional*, defaults to `False`):
            Gated (SwiGLU) MLP, as EVA-02: one packed `fc1` of `2 * intermediate_size` rows (gate first, then value),
            `hidden_act(gate) * value`, then `fc2`. `intermediate_size` is the width after gating.
        use_mlp_norm (`bool`, *optional*, defaults to `False`):
            With `use_gated_mlp`, a LayerNorm on the gated hidden before `fc2` (EVA-02-B/L; timm's `scale_mlp`).
        use_rope (`bool`, *optional*, defaults to `False`):
            2-D axial rotary position embeddings on the queries and keys of the patch tokens; prefix tokens (class
            tokens, registers) are not rotated, so they carry no position.
        rope_type (`str`, *optional*, defaults to `"eva02"`):
            `"eva02"`: positions `arange(n) / n * rope_reference_grid` per axis, interleaved pairs (EVA-02).
            `"dinov3"`: patch centres normalised per axis to [-1, 1] and scaled by 2 pi, rotate-half layout (DINOv3;
            timm's `rope_type='dinov3'`).
        rope_theta (`float`, *optional*, defaults to 10000.0):
            Base of the rotary frequencies (DINOv3: 100).
        rope_reference_grid (`int`, *optional*, defaults to 16):
            EVA-02 rotary positions of an axis with `n` patches are `arange(n) / n * rope_reference_grid` (EVA-02's
            pretraining grid), so any grid spans the same range and the authors' 30x30 table is reproduced exactly.
        use_absolute_position_embeddings (`bool`, *optional*, defaults to `True`):
            Learned position table `pos_embed` added to the tokens. DINOv3 has none: its positions are the rotary
            embedding's alone.
        num_register_tokens (`int`, *optional*, defaults to 0):
            Register tokens (DINOv2-reg, DINOv3) between the class tokens and the patches: learned `reg_token`
            without position rows. They take part in attention but are left out of the CAMs and the decoder.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated-normal weight init.
        position_embedding_interpolation (`str`, *optional*):
            How patch position rows are resized to another input grid: `"bicubic_scale_factor"` (the DINO-style
            bicubic resize the authors' step 1 uses; needed for parity at new sizes), `"bicubic"` (bicubic to the
            target size) or `"bilinear"` (bilinear to the target size, as the authors' step 2). `None` picks the
            authors' choice for each model.
        aaf_reduction (`int`, *optional*, defaults to 8):
            Adaptive Attention Fusion: reduction of the head-weight bottleneck (K = layers x heads -> K / reduction).
        aaf_feat_reduction (`int`, *optional*, defaults to 8):
            Adaptive Attention Fusion: reduction of the per-head feature projection (head_dim -> head_dim / it).
        aaf_pooling (`str`, *optional*, defaults to `"max"`):
            Pooling of each head's features over tokens, `"max"` (released runs) or `"avg"`.
        fine_cam_scale (`float`, *optional*, defaults to 1.0):
            Factor on the fine CAM (and so on its image score). 1.0 is the paper's model. The fine score is about
            the coarse score divided by the patch count (the class token's attention to a patch averages 1 / N), so a
            small model whose coarse scores are a few units gets fine scores near 0 and a fine loss stuck at ln 2;
            a factor of about N restores the coarse scale. CAMs are min-max normalised before use, so only the fine
            loss (and the fusion weights it trains) changes. The offline demo's option; off for the paper presets.
        decoder_hidden_size (`int`, *optional*, defaults to 384):
            Width of the step-2 mask-transformer decoder.
        decoder_num_hidden_layers (`int`, *optional*, defaults to 2):
            Decoder depth.
        decoder_num_attention_heads (`int`, *optional*, defaults to 6):
            Decoder attention heads.
        decoder_intermediate_size (`int`, *optional*, defaults to 1536):
            Decoder MLP width.
        decoder_hidden_dropout_prob (`float`, *optional*, defaults to 0.1):
            Decoder dropout (attention probabilities, projections and MLP), as in the released runs.
        decoder_drop_path_rate (`float`, *optional*, defaults to 0.0):
            Decoder stochastic depth.
        decoder_layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of the decoder's LayerNorms (PyTorch's default, as the authors' decoder).
        decoder_class_embedding_std (`float`, *optional*):
            Standard deviation of the truncated-normal initialisation of the decoder's learned class embeddings;
            `None` uses `initializer_range` (0.02, the authors' decoder). A small model trained briefly can need more
            (the offline demo uses 1.0): at 0.02 the class embeddings are small beside what the decoder's attention
            adds to them, so every class leaves the decoder with nearly the same mask embedding
            (docs/step2-diagnosis.md).
        use_gradient_clipping (`bool`, *optional*, defaults to `True`):
            Use the gradient-clipping loss of the step-2 decoder; `False` gives plain cross-entropy.
        clip_start_value (`float`, *optional*, defaults to 1.2):
            Clipping starts once the batch's mean per-pixel loss is at most this value.
        clip_window_size (`int`, *optional*, defaults to 120):
            Side in pixels of the windows whose mean loss caps each pixel's loss.
        loss_average (`str`, *optional*, defaults to `"all_pixels"`):
            `"all_pixels"` averages every loss over all pixels with ignored ones counted as zeros (the authors' way);
            `"valid_pixels"` averages over non-ignored pixels only; `"classes"` takes each class's mean pixel loss
            (non-ignored pixels) and averages those over the classes present in the batch, so a class weighs the same
            whatever its pixel count (clipping then compares means over non-ignored pixels).
        loss_class_balance (`float`, *optional*, defaults to 1.0):
            With `loss_average="classes"`: each class's mean loss weighs (its pixel count) ** (1 - this); 1 weighs
            the classes alike, 0 gives the mean over non-ignored pixels, 0.5 is in between. Must be in [0, 1].
        semantic_loss_ignore_index (`int`, *optional*, defaults to 255):
            Label value ignored by the step-2 loss.
        auxiliary_ensemble_weight (`float`, *optional*, defaults to 0.0):
            Step-2 inference: with a weight w > 0, `logits` without `labels` are log((P + w P_aux) / (1 + w)), P the
            softmax of the final decoder output and P_aux that of the tokens before the last decoder block (the
            authors' `--backbone multi --weight 0.8`); training (with `labels`) always uses the final output.
    """

    model_type = "weaktr"

    image_size: int | list[int] | tuple[int, int] = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 384
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    drop_path_rate: float = 0.1
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    # Encoder variants of the authors' step-2 backbones (OnlineRetraining/segm/model/): DINOv2-S sets layerscale_value=1.0;
    # EVA-02-S sets key_bias=False, use_gated_mlp=True (intermediate_size 1024, hidden_act "silu") and use_rope=True.
    key_bias: bool = True
    layerscale_value: float | None = None
    use_gated_mlp: bool = False
    use_mlp_norm: bool = False
    use_rope: bool = False
    rope_type: str = "eva02"
    rope_theta: float = 10000.0
    rope_reference_grid: int = 16
    # DINOv2-reg / DINOv3: register tokens; DINOv3 has no learned position table (rotary positions only).
    use_absolute_position_embeddings: bool = True
    num_register_tokens: int = 0
    initializer_range: float = 0.02
    position_embedding_interpolation: str | None = None
    # Step 1: Adaptive Attention Fusion (released runs: K = 72 -> 9, head_dim 64 -> 8, max pooling).
    aaf_reduction: int = 8
    aaf_feat_reduction: int = 8
    aaf_pooling: str = "max"
    fine_cam_scale: float = 1.0
    # Step 2: mask-transformer decoder (Segmenter's, as released: 2 layers, 384 wide, dropout 0.1).
    decoder_hidden_size: int = 384
    decoder_num_hidden_layers: int = 2
    decoder_num_attention_heads: int = 6
    decoder_intermediate_size: int = 1536
    decoder_hidden_dropout_prob: float = 0.1
    decoder_drop_path_rate: float = 0.0
    decoder_layer_norm_eps: float = 1e-5
    decoder_class_embedding_std: float | None = None
    # Step 2: gradient clipping (start once mean loss <= 1.2; 120 px windows = 4 per side of a 480 crop).
    use_gradient_clipping: bool = True
    clip_start_value: float = 1.2
    clip_window_size: int = 120
    loss_average: str = "all_pixels"
    loss_class_balance: float = 1.0
    semantic_loss_ignore_index: int = 255
    # Step 2 inference: the authors' decoder ensemble (0.8 in their evaluation; 0 = the final output alone).
    auxiliary_ensemble_weight: float = 0.0

    def __post_init__(self, **kwargs):
        if isinstance(self.image_size, list):
            self.image_size = tuple(self.image_size)
        super().__post_init__(**kwargs)
        if self.label2id is None or len(self.label2id) != len(self.id2label):
            self.label2id = {name: i for i, name in self.id2label.items()}
        self._validate()

    @property
    def image_grid(self):
        """(rows, cols) of the patch grid that the position-embedding table is built for."""
        height, width = (self.image_size, self.image_size) if isinstance(self.image_size, int) else self.image_size
        return height // self.patch_size, width // self.patch_size

    @property
    def encoder_variant(self):
        """Which `ENCODER_VARIANTS` layout the encoder has: `"dinov3"`, `"eva02"`, `"dinov2"` or `"vit"` (plain).
        DeiT-III, a ViT with LayerScale, has the `"dinov2"` layout."""
        if self.use_rope and self.rope_type == "dinov3":
            return "dinov3"
        if self.use_rope or self.use_gated_mlp or not self.key_bias:
            return "eva02"
        return "dinov2" if self.layerscale_value is not None else "vit"

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    def _validate(self):
        positive = (
            "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "aaf_reduction", "aaf_feat_reduction", "decoder_hidden_size",
            "decoder_num_hidden_layers", "decoder_num_attention_heads", "decoder_intermediate_size",
            "clip_window_size", "num_labels", "rope_reference_grid",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"WeakTrConfig.{name} must be a positive integer, got {value!r}.")
        sizes = (self.image_size,) if isinstance(self.image_size, int) else tuple(self.image_size)
        if len(sizes) not in (1, 2) or any(not isinstance(s, int) or s < self.patch_size for s in sizes):
            raise ValueError(
                f"WeakTrConfig.image_size must be an int or (height, width) of ints >= patch_size "
                f"({self.patch_size}), got {self.image_size!r}."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"WeakTrConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.decoder_hidden_size % self.decoder_num_attention_heads:
            raise ValueError(
                f"WeakTrConfig.decoder_hidden_size ({self.decoder_hidden_size}) must be divisible by "
                f"decoder_num_attention_heads ({self.decoder_num_attention_heads})."
            )
        fusion_channels = self.num_hidden_layers * self.num_attention_heads
        if fusion_channels // self.aaf_reduction < 1:
            raise ValueError(
                f"WeakTrConfig.aaf_reduction ({self.aaf_reduction}) must be at most num_hidden_layers x "
                f"num_attention_heads ({fusion_channels})."
            )
        if self.head_dim // self.aaf_feat_reduction < 1:
            raise ValueError(
                f"WeakTrConfig.aaf_feat_reduction ({self.aaf_feat_reduction}) must be at most the head dimension "
                f"({self.head_dim})."
            )
        choices = (
            ("aaf_pooling", AAF_POOLINGS),
            ("loss_average", LOSS_AVERAGES),
            ("position_embedding_interpolation", POSITION_INTERPOLATIONS + (None,)),
            ("rope_type", ROPE_TYPES),
        )
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(f"WeakTrConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if not 0.0 <= self.loss_class_balance <= 1.0:
            raise ValueError(f"WeakTrConfig.loss_class_balance must be in [0, 1], got {self.loss_class_balance!r}.")
        for name in ("drop_path_rate", "hidden_dropout_prob", "attention_probs_dropout_prob",
                     "decoder_hidden_dropout_prob", "decoder_drop_path_rate"):  # fmt: skip
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"WeakTrConfig.{name} must be in [0, 1), got {value!r}.")
        if not self.key_bias and not self.qkv_bias:
            raise ValueError(
                "WeakTrConfig.key_bias=False means query and value biases without a key bias, which needs "
                "qkv_bias=True; for no biases at all set qkv_bias=False and leave key_bias at True."
            )
        if self.use_rope and self.head_dim % 4:
            raise ValueError(
                f"WeakTrConfig.use_rope needs a head dimension divisible by 4 (two axes of rotated pairs), got "
                f"{self.head_dim} = hidden_size / num_attention_heads."
            )
        if self.layerscale_value is not None and (
            isinstance(self.layerscale_value, bool) or not isinstance(self.layerscale_value, (int, float))
        ):
            raise ValueError(
                f"WeakTrConfig.layerscale_value must be a number (LayerScale's initial value) or None (no LayerScale), "
                f"got {self.layerscale_value!r}."
            )
        registers = self.num_register_tokens
        if not isinstance(registers, int) or isinstance(registers, bool) or registers < 0:
            raise ValueError(f"WeakTrConfig.num_register_tokens must be an integer >= 0, got {registers!r}.")
        if not self.use_absolute_position_embeddings and not self.use_rope:
            raise ValueError(
                "WeakTrConfig.use_absolute_position_embeddings=False leaves the encoder without any position "
                "information; set use_rope=True (DINOv3) or keep the learned table."
            )
        if self.use_mlp_norm and not self.use_gated_mlp:
            raise ValueError("WeakTrConfig.use_mlp_norm is the LayerNorm inside the gated MLP: set use_gated_mlp=True.")
        if self.rope_theta <= 0:
            raise ValueError(f"WeakTrConfig.rope_theta must be positive, got {self.rope_theta!r}.")
        if not self.fine_cam_scale > 0:
            raise ValueError(f"WeakTrConfig.fine_cam_scale must be positive, got {self.fine_cam_scale!r}.")
        if not self.auxiliary_ensemble_weight >= 0:
            raise ValueError(
                f"WeakTrConfig.auxiliary_ensemble_weight must be a number >= 0 (0 = no ensemble), got "
                f"{self.auxiliary_ensemble_weight!r}."
            )
        if self.clip_start_value <= 0:
            raise ValueError(f"WeakTrConfig.clip_start_value must be positive, got {self.clip_start_value!r}.")


__all__ = ["ENCODER_VARIANTS", "ROPE_TYPES", "WeakTrConfig"]
