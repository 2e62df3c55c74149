"""The zoo's batches for the mappings whose batch is more than a main input and labels of a fixed shape.

- ``image_text_to_text`` (vision-language models): ``pixel_values`` in the layout the family's processor gives
  (:func:`_vision_candidates`: an image per example, a tile per example, Qwen-VL's flattened patches with
  ``image_grid_thw``, Mllama's tiles with aspect ratios, ``image_sizes`` and pixel masks), and ``input_ids`` holding
  as many image tokens (``image_token_id`` / ``image_token_index``) as the model makes image features, counted from
  the model itself (:func:`_count_image_tokens`), between the vision start and end tokens its config names. Labels
  are causal-LM labels, -100 on the image and special tokens (an encoder-decoder gets target token labels).
- ``ctc``: raw audio (or features) and label sequences shorter than the model's output frames, padded with -100.
- ``semantic_segmentation``: images and per-pixel labels (a few pixels at the ignore index).
- ``audio_frame_classification``: audio and one-hot labels per output frame.

Frame counts come from a forward pass without labels; nothing is listed per architecture except in
:data:`VISION_LAYOUTS`' order of trial.
"""

from __future__ import annotations

import inspect
import re
import sys

import torch
import transformers
from torch import nn
from zoo_models import (
    BATCH,
    IMAGE,
    LABELS,
    LAYERS,
    SEQ,
    SPECIAL_IDS,
    TARGET_SEQ,
    Case,
    _set,
    _sub,
    _sub_configs,
    _vocab,
)

TASKS = ("image_text_to_text", "ctc", "semantic_segmentation", "audio_frame_classification")
PROMPT = 2  # text tokens before the image


def candidates(case: Case, model: nn.Module, main: list[dict], generator: torch.Generator, size: int = BATCH):
    """Yield labelled candidate batches of the case's task; ``main`` are the zoo's main-input candidates."""
    if case.mapping == "image_text_to_text":
        yield from _vlm_candidates(model, generator, size)
        return
    for inputs in main:
        try:
            logits = _logits(model, inputs)
        except Exception as error:  # noqa: BLE001 - the next shape, or the reason it is unbuildable
            yield _Failed(error)
            continue
        if case.mapping == "ctc":
            frames = logits.shape[1]
            length = max(1, min(5, frames // 3))
            labels = torch.randint(SPECIAL_IDS, _vocab(model.config), (size, length), generator=generator)
            labels[1, length // 2 + 1 :] = -100
            yield {**inputs, "labels": labels}
        elif case.mapping == "semantic_segmentation":
            pixels = next(v for v in inputs.values() if v.dim() == 4)
            labels = torch.randint(0, LABELS, (size, *pixels.shape[-2:]), generator=generator)
            ignore = getattr(model.config, "semantic_loss_ignore_index", None)
            if isinstance(ignore, int) and ignore >= 0:
                labels[0, :2, :3] = ignore
            yield {**inputs, "labels": labels}
        else:  # audio frames: one-hot classes per output frame
            classes = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=generator)
            yield {**inputs, "labels": nn.functional.one_hot(classes, logits.shape[-1]).long()}


class _Failed(dict):
    """A candidate that could not be made: the zoo records its error and tries the next."""

    def __init__(self, error: BaseException):
        super().__init__()
        self.error = error


def _logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        output = model(**inputs)
    return output["logits"]


# ---- vision-language models ---

UNSET_IMAGE_TOKEN = SPECIAL_IDS - 2  # for a config that declares an image token and leaves it unset (BLIP-2)


def adjust_config(case: Case, config) -> None:
    """Fit a vision-language config's vision settings to the tiny images (after :func:`zoo_models.shrink`).

    Multimodal rotary sections sum to the shrunk rotary width, pinpoints and windows fit one tiny image, image token
    counts fit its patches, listed vision layers exist, an unset image token is set.
    """
    if case.mapping != "image_text_to_text":
        return
    source = inspect.getsource(sys.modules[getattr(transformers, case.class_name).__module__])
    for sub in [config, *_sub_configs(config)]:
        fields = vars(sub)
        rope = fields.get("rope_parameters")
        if "mrope_section" in source and isinstance(rope, dict) and "hidden_size" in fields:
            heads = fields.get("num_attention_heads") or 1
            head_dim = fields.get("head_dim") or fields["hidden_size"] // heads
            factor = fields.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0
            half = max(1, int(head_dim * factor) // 2)
            rope["mrope_section"] = [half - 2 * (half // 3), half // 3, half // 3] if half >= 3 else [half, 0, 0]
        patch = fields.get("patch_size") if isinstance(fields.get("patch_size"), int) else None
        merge = fields.get("spatial_merge_size")
        if isinstance(fields.get("window_size"), int) and patch and isinstance(merge, int):
            _set(sub, "window_size", 2 * merge * patch)  # Qwen2.5-VL's windows are in pixels
        if isinstance(fields.get("depth"), int) and fields["depth"] > LAYERS:
            _set(sub, "depth", LAYERS)
        for key in ("fullatt_block_indexes", "deepstack_visual_indexes", "out_hidden_layers_indices"):
            if isinstance(fields.get(key), (list, tuple)):
                _set(sub, key, [LAYERS - 1])
        if "image_grid_pinpoints" in fields:
            _set(sub, "image_grid_pinpoints", [[IMAGE, IMAGE]])
        if isinstance(fields.get("mm_tokens_per_image"), int):
            _set(sub, "mm_tokens_per_image", 4)
        layers = fields.get("vision_feature_layers", fields.get("vision_feature_layer"))
        if isinstance(layers, (list, tuple)):
            key = "vision_feature_layers" if "vision_feature_layers" in fields else "vision_feature_layer"
            _set(sub, key, [-1 - (i % LAYERS) for i in range(len(layers))])
        for key in ("image_token_id", "image_token_index"):
            if key in fields and fields[key] is None and sub is config:
                _set(sub, key, UNSET_IMAGE_TOKEN)


def _image_token(config) -> int | None:
    for sub in (config, getattr(config, "text_config", None)):
        for key in ("image_token_id", "image_token_index"):
            value = getattr(sub, key, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _vision_candidates(model: nn.Module, generator: torch.Generator, size: int) -> list[tuple[str, dict]]:
    """Return ``(layout, vision inputs)`` in the layouts processors give, the ones the forward accepts first."""
    config = model.config
    vision = _sub(config, "vision_config", "vision_tower_config", "visual_config", "encoder")
    accepted = set(inspect.signature(model.forward).parameters)
    channels = int(
        next(
            (
                getattr(vision, k)
                for k in ("num_channels", "in_channels", "in_chans")
                if isinstance(getattr(vision, k, None), int)
            ),
            3,
        )
    )
    image = getattr(vision, "image_size", None) or IMAGE
    height, width = (image, image) if isinstance(image, int) else tuple(image)[-2:]
    patch = getattr(vision, "patch_size", None) or 8
    patch = patch if isinstance(patch, int) else tuple(patch)[-1]

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(model.dtype)

    found = [("image", {"pixel_values": randn(size, channels, height, width)})]
    sizes = torch.tensor([[height, width]] * size)
    if "image_sizes" in accepted:
        found.insert(0, ("image with image_sizes", {**found[0][1], "image_sizes": sizes}))
        found.append(
            ("tiles with image_sizes", {"pixel_values": randn(size, 2, channels, height, width), "image_sizes": sizes})
        )
    if "pixel_attention_mask" in accepted:
        found.insert(
            0,
            (
                "tiles with a pixel mask",
                {
                    "pixel_values": randn(size, 1, channels, height, width),
                    "pixel_attention_mask": torch.ones(size, 1, height, width, dtype=torch.bool),
                },
            ),
        )
    if "image_grid_thw" in accepted or "image_grid_hw" in accepted:  # Qwen-VL: patches, flattened, with a grid
        merge = int(getattr(vision, "spatial_merge_size", None) or getattr(vision, "merge_size", None) or 2)
        side = 2 * merge
        rows = torch.tensor([[1, side, side]] * size)
        key = "image_grid_thw" if "image_grid_thw" in accepted else "image_grid_hw"
        grid = {key: rows if key.endswith("thw") else rows[:, 1:]}
        if "image_merge_sizes" in accepted:
            grid["image_merge_sizes"] = torch.tensor([merge] * size)
        temporals = dict.fromkeys([int(getattr(vision, "temporal_patch_size", None) or 1), 1, 2])
        for temporal in reversed(temporals):
            pixels = randn(size * side * side, channels * temporal * patch * patch)
            found.insert(0, (f"flattened patches ({temporal} frames) with a grid", {"pixel_values": pixels, **grid}))
        found.append(
            ("patches with a grid", {"pixel_values": randn(size * side * side, channels, patch, patch), **grid})
        )
    if "aspect_ratio_ids" in accepted:  # Mllama: images of tiles, with aspect ratios
        found.insert(
            0,
            (
                "tiles with aspect ratios",
                {
                    "pixel_values": randn(size, 1, 1, channels, height, width),
                    "aspect_ratio_ids": torch.ones(size, 1, dtype=torch.long),
                    "aspect_ratio_mask": torch.ones(size, 1, 1, dtype=torch.long),
                },
            ),
        )
    if "high_res_pixel_values" in accepted:  # DeepSeek-VL hybrid: a second, larger image
        high = _sub(config, "high_res_vision_config")
        side = getattr(high, "image_size", None) or IMAGE
        found = [
            (layout, {**inputs, "high_res_pixel_values": randn(size, channels, side, side)}) for layout, inputs in found
        ]
    if "image_attention_mask" in accepted:  # Idefics: images per example, and which tokens see which image
        found.insert(
            0, ("images with an image attention mask", {"pixel_values": randn(size, 1, channels, height, width)})
        )
    if "qformer_input_ids" in accepted:  # InstructBLIP: the instruction, for the Q-Former too
        qformer = _sub(config, "qformer_config")
        ids = torch.randint(SPECIAL_IDS, _vocab(qformer), (size, SEQ), generator=generator)
        found = [
            (layout, {**inputs, "qformer_input_ids": ids, "qformer_attention_mask": torch.ones_like(ids)})
            for layout, inputs in found
        ]
    return found if "pixel_values" in accepted else [("text only", {})]


class _Counted(Exception):
    """Raised by the counting wrapper to stop the forward once it knows how many image features there are."""

    def __init__(self, count: int):
        super().__init__(count)
        self.count = count


def _count_image_tokens(model: nn.Module, batch: dict) -> int:
    """Return how many image features (= image tokens) the model makes of the batch's images, over the batch.

    Counted at the model's own ``get_placeholder_mask`` (the features' size over the embedding width), else read
    from its error on a mismatch ("image tokens do not match, tokens: 1, features: 64").
    """
    owners = [m for m in model.modules() if hasattr(type(m), "get_placeholder_mask")]

    def counting(original):
        def wrapper(*args, **kwargs):
            names = list(inspect.signature(original).parameters)
            bound = dict(zip(names, args), **kwargs)
            features, embeds = bound.get("image_features"), bound.get("inputs_embeds")
            if isinstance(features, (list, tuple)):
                features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
            if isinstance(features, torch.Tensor) and isinstance(embeds, torch.Tensor):
                raise _Counted(features.numel() // embeds.shape[-1])
            return original(*args, **kwargs)

        return wrapper

    for owner in owners:
        owner.get_placeholder_mask = counting(owner.get_placeholder_mask)
    try:
        with torch.no_grad():
            model(**batch)
    except _Counted as counted:
        return counted.count
    except Exception as error:  # noqa: BLE001 - a mismatch names the count
        match = re.search(r"image tokens do not match.*?features:?\s*(\d+)", str(error), re.S)
        if match:
            return int(match.group(1))
        raise
    finally:
        for owner in owners:
            del owner.get_placeholder_mask
    raise RuntimeError("the model made no image features of the batch's images")


def _vlm_candidates(model: nn.Module, generator: torch.Generator, size: int):
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = _vocab(config)
    image_id = _image_token(config)
    accepted = set(inspect.signature(model.forward).parameters)
    starts = [
        getattr(config, k)
        for k in ("vision_start_token_id", "boi_token_id", "boi_token_index", "image_start_token_id")
        if isinstance(getattr(config, k, None), int)
    ][:1]
    ends = [
        getattr(config, k)
        for k in ("vision_end_token_id", "eoi_token_id", "eoi_token_index", "image_end_token_id")
        if isinstance(getattr(config, k, None), int)
    ][:1]
    encoder_decoder = getattr(config, "is_encoder_decoder", False) or getattr(text, "is_encoder_decoder", False)
    for layout, vision in _vision_candidates(model, generator, size):
        words = torch.randint(SPECIAL_IDS, vocab, (size, PROMPT + SEQ), generator=generator)
        per_example = 0
        if image_id is not None:
            try:
                probe = _assemble(words, image_id, 1, starts, ends)
                count = _count_image_tokens(model, {**_with_masks(probe, image_id, accepted, vision), **vision})
            except Exception as error:  # noqa: BLE001
                yield _Failed(
                    RuntimeError(
                        f"{layout}: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
                        if str(error)
                        else f"{layout}: {type(error).__name__}"
                    )
                )
                continue
            if count % size:
                yield _Failed(RuntimeError(f"{layout}: {count} image features for {size} images"))
                continue
            per_example = count // size
        ids = _assemble(words, image_id, per_example, starts, ends)
        batch = {**_with_masks(ids, image_id, accepted, vision), **vision}
        if encoder_decoder:
            labels = torch.randint(SPECIAL_IDS, vocab, (size, TARGET_SEQ), generator=generator)
            labels[1, 4:] = -100
        else:
            labels = ids.clone()
            special = ids < SPECIAL_IDS
            labels[special] = -100
            labels[:, :PROMPT] = -100
            labels[0, -3] = -100
        batch["labels"] = labels
        yield batch


def _assemble(words: torch.Tensor, image_id: int | None, count: int, starts: list, ends: list) -> torch.Tensor:
    """Return ``prompt, [start], image * count, [end], text`` for every example."""
    size = words.shape[0]
    if image_id is None or count == 0:
        return words.clone()
    middle = torch.tensor(starts + [image_id] * count + ends).expand(size, -1)
    return torch.cat([words[:, :PROMPT], middle, words[:, PROMPT:]], dim=1)


def _with_masks(ids: torch.Tensor, image_id: int | None, accepted: set, vision: dict) -> dict:
    """Return ``input_ids`` with the masks that follow them: attention, token types, Mllama's cross-attention."""
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    image = (ids == image_id).long() if image_id is not None else torch.zeros_like(ids)
    if "mm_token_type_ids" in accepted:
        batch["mm_token_type_ids"] = image
    if "token_type_ids" in accepted:
        batch["token_type_ids"] = image
    if "image_attention_mask" in accepted and "pixel_values" in vision:
        batch["image_attention_mask"] = torch.ones(*ids.shape, vision["pixel_values"].shape[1], dtype=torch.long)
    if "cross_attention_mask" in accepted and "aspect_ratio_ids" in vision:
        tiles = vision["pixel_values"].shape[2]
        batch["cross_attention_mask"] = torch.ones(*ids.shape, 1, tiles, dtype=torch.long)
    return batch
