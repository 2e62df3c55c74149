"""The zoo's models: every model class of transformers' auto mappings, built tiny, with a labelled batch it accepts.

Each class is built from its default config shrunk generically, in place (widths, depths, heads, vocabulary,
positions, image and audio sizes, experts; nested sub-configs too; per-layer lists cut to one layer of each kind;
no dropout or other randomness; no cache), plus the few :data:`OVERRIDES` a family needs, in float64 with eager
attention and eager experts. Their batches are made in :mod:`zoo_batches` (:mod:`zoo_tasks` for vision-language
models, CTC, segmentation and audio frames); the brute force and the verdicts are in :mod:`zoo`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto import modeling_auto

MAPPINGS = {
    "causal_lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "sequence_classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "token_classification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "seq2seq_lm": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "masked_lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "image_classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "question_answering": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    "multiple_choice": "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES",
    "speech_seq2seq": "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
    "audio_classification": "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
    "image_text_to_text": "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",  # batches of these four: zoo_tasks.py
    "ctc": "MODEL_FOR_CTC_MAPPING_NAMES",
    "semantic_segmentation": "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES",
    "audio_frame_classification": "MODEL_FOR_AUDIO_FRAME_CLASSIFICATION_MAPPING_NAMES",
}
# sizes of the tiny models
HIDDEN, FFN, HEADS, HEAD_DIM, LAYERS, VOCAB, POSITIONS, LABELS = 16, 32, 2, 8, 2, 64, 64, 3
BATCH, SEQ, TARGET_SEQ, CHOICES = 4, 8, 6, 3
IMAGE, PATCH = 32, 8
SPECIAL_IDS = 8  # token ids below this are reserved for special tokens; the batch's tokens are drawn above


@dataclass(frozen=True)
class Case:
    """One architecture of one auto mapping, with an optional variant (extra settings the issue names)."""

    mapping: str
    model_type: str
    class_name: str
    variant: str = ""

    @property
    def id(self) -> str:
        return f"{self.mapping}-{self.class_name}" + (f"+{self.variant}" if self.variant else "")


def cases() -> list[Case]:
    """Return every (mapping, class) of :data:`MAPPINGS`, each class once per mapping, in the mappings' order."""
    found = []
    for mapping, attribute in MAPPINGS.items():
        seen = set()
        for model_type, names in getattr(modeling_auto, attribute).items():
            for name in (names,) if isinstance(names, str) else names:
                if name not in seen:
                    seen.add(name)
                    found.append(Case(mapping, model_type, name))
    return found


# Variants: the settings the issue names, each on top of its base architecture.
VARIANTS = {
    "router_loss": "output_router_logits=True: the router's auxiliary loss is added to the model's loss",
    "final_logits_bias": "a nonzero final_logits_bias added after the head",
    "final_logits_bias_bf16": "a nonzero final_logits_bias, trained in bf16 (exact within bf16, or refused)",
    "lm_head_bias": "ESM's lm_head.bias (added after lm_head.decoder) set nonzero",
    "softcap_config_only": "final_logit_softcapping set in the config, which the classifier does not apply",
}


def named_cases() -> list[Case]:
    """Return the cases the issue names: router losses, logit offsets, soft caps and bf16 with an offset."""
    return [
        Case("causal_lm", "mixtral", "MixtralForCausalLM", "router_loss"),
        Case("causal_lm", "qwen2_moe", "Qwen2MoeForCausalLM", "router_loss"),
        Case("seq2seq_lm", "marian", "MarianMTModel", "final_logits_bias"),
        Case("seq2seq_lm", "bart", "BartForConditionalGeneration", "final_logits_bias"),
        Case("causal_lm", "recurrent_gemma", "RecurrentGemmaForCausalLM"),
        Case("causal_lm", "xlstm", "xLSTMForCausalLM"),
        Case("masked_lm", "esm", "EsmForMaskedLM", "lm_head_bias"),
        Case("sequence_classification", "gemma2", "Gemma2ForSequenceClassification", "softcap_config_only"),
        Case("token_classification", "gemma2", "Gemma2ForTokenClassification", "softcap_config_only"),
        Case("seq2seq_lm", "marian", "MarianMTModel", "final_logits_bias_bf16"),
    ]


# ---- tiny configs ----------------------------------------------------------------------------------------------

# config fields shrunk to a value, wherever they are (top level or a sub-config)
SIZES = {
    **dict.fromkeys(
        (
            "hidden_size d_model n_embd model_dim embedding_size word_embed_proj_dim emb_dim d_embed embed_dim "
            "embedding_dim dim hidden_dim lru_width output_hidden_size attention_hidden_size cross_hidden_size "
            "true_hidden_size intra_bottleneck_size hidden_size_global encoder_hidden_size decoder_hidden_size "
            "audio_hidden_size projection_dim pooler_hidden_size projector_hidden_size classifier_proj_size "
            "xvector_output_dim codevector_dim proj_codevector_dim output_dim d_latents input_embedding_size "
            "output_embedding_size entity_emb_size adapter_out_dim vision_output_dim out_hidden_size "
            "backbone_hidden_size d_rel cross_attention_hidden_size"
        ).split(),
        HIDDEN,
    ),
    **dict.fromkeys(
        (
            "intermediate_size ffn_dim encoder_ffn_dim decoder_ffn_dim d_ff n_inner dim_feedforward "
            "moe_intermediate_size shared_expert_intermediate_size dense_intermediate_size expert_ffn_hidden_size "
            "ffn_hidden_size intermediate_size_mlp dim_ff feed_forward_size dff d_inner mlp_dim "
            "moe_shared_expert_intermediate_size shared_experts_intermediate_size shared_intermediate_size "
            "speech_encoder_intermediate_size"
        ).split(),
        FFN,
    ),
    **dict.fromkeys(
        (
            "num_hidden_layers n_layer n_layers num_layers encoder_layers decoder_layers num_decoder_layers "
            "num_encoder_layers num_blocks speech_encoder_layers conf_num_hidden_layers"
        ).split(),
        LAYERS,
    ),
    **dict.fromkeys(
        (
            "num_attention_heads n_head n_heads encoder_attention_heads decoder_attention_heads num_heads "
            "index_n_heads linear_num_value_heads linear_num_key_heads mamba_n_heads swa_num_attention_heads "
            "cross_num_attention_heads attention_heads num_encoder_attention_heads num_decoder_attention_heads "
            "speech_encoder_attention_heads mamba_num_heads linear_num_heads"
        ).split(),
        HEADS,
    ),
    **dict.fromkeys(
        (
            "head_dim v_head_dim qk_head_dim index_head_dim linear_key_head_dim linear_value_head_dim d_kv d_head "
            "dim_head attention_head_size attention_head_dim mamba_d_head mamba_head_dim mamba_headdim swa_head_dim "
            "cross_head_dim linear_head_dim kv_channels"
        ).split(),
        HEAD_DIM,
    ),
    **dict.fromkeys("qk_rope_head_dim qk_nope_head_dim rotary_dim".split(), HEAD_DIM // 2),
    **dict.fromkeys("kv_lora_rank q_lora_rank o_lora_rank".split(), HEAD_DIM),
    **dict.fromkeys(
        (
            "vocab_size decoder_vocab_size src_vocab_size tgt_vocab_size vocab_size_per_layer_input unpadded_vocab_size"
        ).split(),
        VOCAB,
    ),
    **dict.fromkeys(
        (
            "max_position_embeddings n_positions n_ctx max_seq_len max_target_positions max_2d_position_embeddings "
            "max_text_positions max_length"
        ).split(),
        POSITIONS,
    ),
    **dict.fromkeys("num_experts num_local_experts n_routed_experts moe_num_experts".split(), 4),
    **dict.fromkeys("num_experts_per_tok num_experts_per_token moe_topk moe_k".split(), 2),
    "o_groups": 1,
    **dict.fromkeys("n_groups mamba_n_groups".split(), 1),
    "num_kv_shared_layers": 0,
    **dict.fromkeys("n_group topk_group first_k_dense_replace".split(), 1),
    **dict.fromkeys("sliding_window sliding_window_size attention_window_size".split(), 4),
    **dict.fromkeys("mamba_d_state ssm_state_size state_size".split(), 4),
    **dict.fromkeys("index_topk".split(), 4),
    "expert_capacity": BATCH * 32,  # no token dropped
    "num_conv_pos_embeddings": 4,
    "num_conv_pos_embedding_groups": 2,
    "mask_time_length": 2,
    "mask_feature_length": 2,
    "num_codevectors_per_group": 4,
    "image_size": IMAGE,
    "patch_size": PATCH,
    "window_size": 4,
    "num_mel_bins": 8,
    "input_feat_per_channel": 8,
    "feature_size": 8,
    "max_source_positions": 16,
    "chunk_size": 4,
    "mamba_chunk_size": 4,
    "mamba_d_ssm": HIDDEN,
    "time_step_rank": 4,
    "mamba_dt_rank": 4,
    "num_filters": 8,
    "conv_channels": 8,
    "subsampling_conv_channels": 8,
    "relative_attention_max_distance": 16,
    "num_landmarks": 4,
    "num_latents": 4,
    "num_groups": 2,
    "feature_projection_input_dim": 16,
    "segment_means_seq_len": 8,
}
# list-valued fields: (rule, value)
LIST_SIZES = {
    "depths": 1,
    "hidden_sizes": HIDDEN,
    "embed_dims": HIDDEN,
    "num_attention_heads": HEADS,  # per-stage lists
    "num_heads": HEADS,
    "conv_dim": 8,
    "tdnn_dim": 8,
    "stage_numb_of_layers": 1,
    "block_repeats": 1,
    "num_block_repeats": 1,
    "stage_num_blocks": 1,
    "neck_hidden_sizes": HIDDEN,
    "mlp_ratios": 2,
}
ZERO_RANDOMNESS = re.compile(r"(drop|jitter|_noise|mask_time_prob|mask_feature_prob)")
KV_HEADS = (
    "num_key_value_heads num_kv_heads multi_query_group_num num_query_groups cross_num_key_value_heads "
    "swa_num_key_value_heads"
).split()


MAMBA_HEADS = (
    ("expand", "head_dim", "num_heads"),
    ("mamba_expand", "mamba_head_dim", "mamba_num_heads"),
    ("mamba_expand", "mamba_d_head", "mamba_n_heads"),
    ("mamba_expand", "mamba_headdim", "n_mamba_heads"),
)
PER_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")


def shrink(config: PretrainedConfig, depth: int = 0) -> None:
    """Shrink ``config`` and its sub-configs in place: every size field, per-layer lists, no randomness."""
    fields = {k: v for k, v in vars(config).items() if not k.startswith("_")}
    heads = fields.get("num_attention_heads")
    layers_before = next((fields[k] for k in PER_LAYER_COUNTS if isinstance(fields.get(k), int)), None)
    for key, value in fields.items():
        if isinstance(value, PretrainedConfig):
            if depth < 4:
                shrink(value, depth + 1)
            continue
        new = _shrunk(key, value, heads)
        if new is not value:
            _set(config, key, new)
    if layers_before and layers_before > LAYERS:
        _keep_layers(config, layers_before, [k for k in PER_LAYER_COUNTS if fields.get(k) == layers_before])
    for key in ("conv_dim", "conv_kernel", "conv_stride"):  # a two-layer feature extractor: 400 samples, 39 frames
        if isinstance(getattr(config, key, None), (list, tuple)) and len(getattr(config, key)) > 2:
            _set(config, key, {"conv_dim": [8, 8], "conv_kernel": [10, 3], "conv_stride": [5, 2]}[key])
            if hasattr(config, "num_feat_extract_layers"):
                _set(config, "num_feat_extract_layers", 2)
    for key in ("tdnn_kernel", "tdnn_dilation"):
        if isinstance(getattr(config, key, None), (list, tuple)) and isinstance(
            getattr(config, "tdnn_dim", None), list
        ):
            _set(config, key, list(getattr(config, key))[: len(config.tdnn_dim)])
    if "num_experts_per_tok" in fields and fields["num_experts_per_tok"] is None and fields.get("n_routed_experts"):
        _set(config, "num_experts_per_tok", 2)  # DeepSeek-V2's default routes to None of its experts
    if "vocab_size" in fields and fields["vocab_size"] is None:
        _set(config, "vocab_size", VOCAB)
    if isinstance(fields.get("stage_names"), list) and isinstance(getattr(config, "num_hidden_layers", None), int):
        if len(fields["stage_names"]) > config.num_hidden_layers + 1:  # a backbone's stages follow its depth
            names = ["stem"] + [f"stage{i}" for i in range(1, config.num_hidden_layers + 1)]
            _set(config, "stage_names", names)
            _set(config, "_out_features", names[-1:])
            _set(config, "_out_indices", [len(names) - 1])
    if "num_key_value_heads" in fields and fields["num_key_value_heads"] is None and isinstance(heads, int):
        _set(config, "num_key_value_heads", HEADS)
    if "head_dim" in fields and fields["head_dim"] is None and isinstance(heads, int):
        _set(config, "head_dim", HEAD_DIM)
    for expand, head_dim, heads_key in MAMBA_HEADS:  # Mamba-2 mixers: heads * head_dim = expand * hidden
        values = [vars(config).get(k) for k in (expand, head_dim, heads_key, "hidden_size")]
        if vars(config).get("mamba_d_ssm"):  # Falcon-H1 sizes its mixer by mamba_d_ssm instead
            continue
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values) and values[1]:
            _set(config, heads_key, max(1, values[0] * values[3] // values[1]))
    if isinstance(vars(config).get("qk_rope_head_dim"), int):  # multi-head latent attention: rope on a part
        _set(config, "head_dim", config.qk_rope_head_dim)
        if hasattr(config, "qk_head_dim"):
            _set(config, "qk_head_dim", config.qk_rope_head_dim + (getattr(config, "qk_nope_head_dim", 0) or 0))
    for key in ("initializer_range", "init_std"):  # a head large enough that the penalty visibly moves the update
        if isinstance(getattr(config, key, None), float):
            _set(config, key, 0.3)
    if hasattr(config, "classifier_dropout") or depth == 0:
        _set(config, "classifier_dropout", 0.0)
    if hasattr(config, "use_cache"):  # training needs no cache (and xLSTM's, Bamba's, ... do not fit tiny sizes)
        _set(config, "use_cache", False)


def _shrunk(key: str, value: Any, heads: Any) -> Any:
    """Return the shrunk value of one config field (``value`` itself when the field is not a size)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float) and ZERO_RANDOMNESS.search(key):
        return 0.0
    if isinstance(value, (list, tuple)) and value and ZERO_RANDOMNESS.search(key):
        if all(isinstance(v, float) for v in value):
            return [0.0] * len(value)
    if isinstance(value, int) and key in KV_HEADS:  # grouped queries stay grouped
        return 1 if isinstance(heads, int) and value < heads else HEADS
    if isinstance(value, int) and key == "expert_capacity":
        return SIZES[key]
    if isinstance(value, int) and key in SIZES:
        return min(value, SIZES[key])
    if (
        isinstance(value, (list, tuple))
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        if key in LIST_SIZES:
            return [LIST_SIZES[key]] * len(value)
        if key in SIZES:
            return [min(v, SIZES[key]) for v in value]
    if isinstance(value, int) and key.endswith("layer_period"):
        return 2
    if isinstance(value, int) and key.endswith("layer_offset"):
        return 1
    return value


def _set(config: PretrainedConfig, key: str, value: Any) -> None:
    try:
        setattr(config, key, value)
    except Exception:  # noqa: BLE001 - a field the config will not take as shrunk keeps its value
        pass


def _keep_layers(config: PretrainedConfig, before: int, counts: list[str]) -> None:
    """Keep a few of ``before`` layers, one of each kind the per-layer lists name, and cut every per-layer field.

    Per-layer lists (``layer_types``, ``mlp_layer_types``, flags) keep the chosen layers' entries; lists of layer
    indices (``mlp_only_layers``) and dicts keyed by layer index are renumbered; a cycling pattern shorter than the
    depth (``block_types``) keeps one of each kind.
    """
    fields = {k: v for k, v in vars(config).items() if not k.startswith("_")}
    per_layer = {k: list(v) for k, v in fields.items() if isinstance(v, (list, tuple)) and len(v) == before}
    kinds = [k for k, v in per_layer.items() if all(isinstance(x, str) for x in v)]
    indices = {k: list(v) for k, v in fields.items() if k not in per_layer and _is_layer_index_list(k, v, before)}
    keep: list[int] = sorted({v[0] for v in indices.values() if v})  # one layer of each listed kind
    signatures = set()
    for index in range(before):
        signature = tuple(per_layer[k][index] for k in kinds)
        if signature not in signatures:
            signatures.add(signature)
            keep.append(index)
    for index in range(before):  # at least LAYERS layers
        if len(keep) >= LAYERS:
            break
        if index not in keep:
            keep.append(index)
    keep = sorted(keep)
    for key in counts:
        _set(config, key, len(keep))
    for key, value in per_layer.items():
        _set(config, key, [value[i] for i in keep])
    for key, value in fields.items():
        if key in per_layer:
            continue
        if (
            isinstance(value, (list, tuple))
            and value
            and all(isinstance(v, str) for v in value)
            and len(value) < before
        ):
            _set(config, key, list(dict.fromkeys(value)))  # a cycling pattern: one of each kind
            if len(dict.fromkeys(value)) > len(keep):
                for count in counts:
                    _set(config, count, len(dict.fromkeys(value)))
        elif key in indices:
            _set(config, key, [keep.index(v) for v in value if v in keep])
        elif isinstance(value, dict) and value and all(str(k).lstrip("-").isdigit() for k in value):
            _set(config, key, {type(k)(keep.index(int(k))): v for k, v in value.items() if int(k) in keep})


def _is_layer_index_list(key: str, value: Any, before: int) -> bool:
    """Whether a config field lists layer indices (``mlp_only_layers``, ``attn_layer_indices``, ...)."""
    if not isinstance(value, (list, tuple)) or not value or len(value) == before:
        return False
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < before for v in value):
        return False
    return "layer" in key or "idx" in key or "index" in key or "indexes" in key


# per-architecture settings the generic shrink cannot guess
OVERRIDES: dict[str | tuple[str, str], dict] = {
    "reformer": dict(
        axial_pos_shape=(2, 4),
        axial_pos_embds_dim=(8, 8),
        local_attn_chunk_length=4,
        lsh_attn_chunk_length=4,
        attn_layers=["local", "local"],
        num_buckets=2,
    ),
    ("reformer", "causal_lm"): dict(is_decoder=True),
    "longformer": dict(attention_window=[4, 4]),
    "led": dict(attention_window=[4, 4]),
    "big_bird": dict(attention_type="original_full"),
    "bigbird_pegasus": dict(attention_type="original_full"),
    "layoutlmv3": dict(coordinate_size=2, shape_size=4),  # 4 * coordinate + 2 * shape = hidden
    "levit": dict(patch_size=16, image_size=64),  # its stem downsamples 16 times whatever patch_size says
    "mobilevitv2": dict(image_size=64),
    "canine": dict(initializer_range=0.02),
    "lilt": dict(hidden_size=24, channel_shrink_ratio=1),  # six layout embeddings share the width
    "efficientnet": dict(width_coefficient=0.1, hidden_dim=128),  # hidden_dim is round_filters(1280)
    "perceiver": dict(num_self_attention_heads=1, num_cross_attention_heads=1),
    "zamba": dict(attention_hidden_size=2 * HIDDEN),  # its shared block attends over [hidden, embeddings]
    "zamba2": dict(attention_hidden_size=2 * HIDDEN),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], attention_layers=["global", "local"]),
}


def tiny_config(case: Case) -> PretrainedConfig:
    """Return the class's default config, shrunk (:func:`shrink`), with :data:`OVERRIDES` and its variant applied."""
    model_class = getattr(transformers, case.class_name)
    try:
        config = model_class.config_class()
    except Exception:  # noqa: BLE001 - a config class that needs arguments: the auto mapping's default
        config = AutoConfig.for_model(case.model_type)
    shrink(config)
    if case.mapping != "question_answering":  # a start and an end column
        for sub in [config, *_sub_configs(config)]:
            if hasattr(sub, "num_labels"):
                _set(sub, "num_labels", LABELS)
    for key, value in {
        **OVERRIDES.get(case.model_type, {}),
        **OVERRIDES.get((case.model_type, case.mapping), {}),
    }.items():
        _set(config, key, value)
    _reserve_special_ids(config)
    if case.mapping in ("image_text_to_text",):
        import zoo_tasks

        zoo_tasks.adjust_config(case, config)
    if case.variant == "router_loss":
        config.output_router_logits = True
        config.router_aux_loss_coef = 0.5
    if case.variant == "softcap_config_only":
        config.final_logit_softcapping = 2.0
    return config


def _sub_configs(config: PretrainedConfig, depth: int = 0) -> list[PretrainedConfig]:
    found = []
    for value in vars(config).values():
        if isinstance(value, PretrainedConfig) and depth < 4:
            found += [value, *_sub_configs(value, depth + 1)]
    return found


def _reserve_special_ids(config: PretrainedConfig) -> None:
    """Remap special token ids to ``0 .. SPECIAL_IDS-1`` (one new id per old one, shared by all sub-configs), so that
    they fit the vocabulary and the batch's ordinary tokens never hit them; set a pad and a decoder start token."""
    mapping: dict[int, int] = {}

    def remap(old):
        if isinstance(old, (list, tuple)):
            return [remap(v) for v in old]
        if not isinstance(old, int) or isinstance(old, bool) or old < 0:
            return old
        if old not in mapping:
            mapping[old] = len(mapping) % (SPECIAL_IDS - 1)
        return mapping[old]

    for sub in [config, *_sub_configs(config)]:
        for key, value in sorted(vars(sub).items()):
            if key.endswith(("_token_id", "_token_index", "_token_ids")) or key in ("pad_id", "tag_pad_id"):
                _set(sub, key, remap(value))
    for sub in [config, *_sub_configs(config)]:
        declared = "pad_token_id" in vars(sub) or sub is config
        if declared and getattr(sub, "pad_token_id", None) is None:
            _set(sub, "pad_token_id", SPECIAL_IDS - 1)
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "decoder_start_token_id", None) is None:
        _set(config, "decoder_start_token_id", getattr(config, "bos_token_id", None) or config.pad_token_id or 0)


# ---- models --------------------------------------------------------------------------------------------


def build(case: Case, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Return the case's model from :func:`tiny_config`, eager attention and experts, in ``dtype``, variant applied."""
    config = tiny_config(case)
    model_class = getattr(transformers, case.class_name)
    torch.manual_seed(0)
    try:
        model = model_class._from_config(config, attn_implementation="eager", experts_implementation="eager")
    except (TypeError, ValueError):
        model = model_class._from_config(config, attn_implementation="eager")
    model = model.to(dtype)
    generator = torch.Generator().manual_seed(2)
    if case.variant.startswith("final_logits_bias"):
        (name, offset), *_ = [
            (n, t) for n, t in [*model.named_buffers(), *model.named_parameters()] if n.endswith("final_logits_bias")
        ]
        with torch.no_grad():
            offset.copy_(0.5 * torch.randn(offset.shape, generator=generator, dtype=torch.float64))
    if case.variant == "lm_head_bias":
        with torch.no_grad():
            model.lm_head.bias.copy_(
                0.5 * torch.randn(model.lm_head.bias.shape, generator=generator, dtype=torch.float64)
            )
    if case.model_type == "xmod":
        model.set_default_language(model.config.languages[0])
    model.train()
    return model


def _vocab(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None) or VOCAB)


def _sub(config, *names):
    """Return the first of ``config``'s sub-configs named ``names`` that exists, else ``config``."""
    for name in names:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            return sub
    return config


def first_line(error: BaseException) -> str:
    """Return the exception's class and the first line (at most 300 characters) of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}".strip()
