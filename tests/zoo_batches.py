"""The zoo's batches: a labelled batch each model accepts, whose training-mode loss is finite and deterministic.

:func:`make_batch` tries the shapes a family's main input takes (:func:`_main_input_candidates`), with the labels of
its mapping's task, and keeps the first that works; the mappings of :data:`zoo_tasks.TASKS` make their candidates in
:mod:`zoo_tasks`.
"""

from __future__ import annotations

import torch
from torch import nn
from zoo_models import BATCH, CHOICES, IMAGE, LABELS, SEQ, SPECIAL_IDS, TARGET_SEQ, Case, _sub, _vocab, first_line


def _main_input_candidates(model: nn.Module, generator: torch.Generator, size: int) -> list[dict[str, torch.Tensor]]:
    """Return candidate values of the model's main input (shapes differ across families), in order of likelihood."""
    config = model.config
    name = model.main_input_name
    dtype = model.dtype
    vocab = _vocab(config)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    if name in ("input_ids",):
        return [{"input_ids": torch.randint(SPECIAL_IDS, vocab, (size, SEQ), generator=generator)}]
    if name == "pixel_values":
        vision = _sub(config, "vision_config", "backbone_config")
        channels = int(getattr(vision, "num_channels", 3) or 3)
        image = getattr(vision, "image_size", IMAGE)
        height, width = (image, image) if isinstance(image, int) else tuple(image)[-2:]
        return [{"pixel_values": randn(size, channels, height, width)}, {"pixel_values": randn(size, 3, IMAGE, IMAGE)}]
    if name == "input_values":
        length = getattr(config, "max_length", None) or 16
        mels = getattr(config, "num_mel_bins", None) or 8
        return [
            {"input_values": randn(size, 400)},
            {"input_values": randn(size, length, mels)},
            {"input_values": randn(size, 1, 400)},
            {"input_values": randn(size, 1600)},
        ]
    if name == "input_features":
        mels = getattr(config, "num_mel_bins", None) or getattr(config, "feature_size", None) or 8
        channels = getattr(config, "input_channels", None) or 1
        per_channel = (getattr(config, "input_feat_per_channel", None) or mels) * channels
        frames = 2 * (getattr(config, "max_source_positions", None) or 16)
        projected = getattr(config, "feature_projection_input_dim", None) or 2 * mels
        return [
            {"input_features": randn(size, mels, frames)},
            {"input_features": randn(size, 32, per_channel)},
            {"input_features": randn(size, 32, mels)},
            {"input_features": randn(size, 32, projected)},
        ]
    if name == "inputs":  # Perceiver: token ids or pixels, depending on the class
        image = getattr(config, "image_size", IMAGE)
        return [
            {"inputs": torch.randint(SPECIAL_IDS, vocab, (size, SEQ), generator=generator)},
            {"inputs": randn(size, 3, image, image)},
        ]
    return [{name: torch.randint(SPECIAL_IDS, vocab, (size, SEQ), generator=generator)}]


def _labels(case: Case, model: nn.Module, inputs: dict, generator: torch.Generator, size: int) -> dict:
    """Return the label fields of the case's task for a batch of ``size``."""
    vocab = _vocab(model.config)
    ids = inputs.get("input_ids")
    # the seq2seq mappings also hold decoder-only models (audio LMs): their labels are their input ids
    decoder_only = not getattr(model.config, "is_encoder_decoder", False) and ids is not None
    if case.mapping == "causal_lm" or (case.mapping in ("seq2seq_lm", "speech_seq2seq") and decoder_only):
        labels = ids.clone()
        labels[:, :2] = -100
        labels[0, 5] = -100
        return {"labels": labels}
    if case.mapping in ("token_classification",):
        labels = torch.randint(0, LABELS, ids.shape, generator=generator)
        labels[:, 0] = -100
        labels[1, 4:] = -100
        return {"labels": labels}
    if case.mapping == "masked_lm":
        labels = torch.randint(SPECIAL_IDS, vocab, ids.shape, generator=generator)
        labels[:, ::2] = -100
        return {"labels": labels}
    if case.mapping in ("seq2seq_lm", "speech_seq2seq"):
        labels = torch.randint(SPECIAL_IDS, vocab, (size, TARGET_SEQ), generator=generator)
        labels[1, 4:] = -100
        return {"labels": labels}
    if case.mapping == "question_answering":
        return {
            "start_positions": torch.randint(0, SEQ, (size,), generator=generator),
            "end_positions": torch.randint(0, SEQ, (size,), generator=generator),
        }
    return {"labels": torch.randint(0, LABELS, (size,), generator=generator)}


def _extra_inputs(case: Case, model: nn.Module, batch: dict, generator: torch.Generator, size: int) -> dict:
    """Return the inputs a few families need besides the main one (an image, codebooks), or their replacements."""
    config = model.config
    if case.model_type == "git":  # a captioning model: its loss skips the image's tokens
        vision = config.vision_config
        shape = (size, vision.num_channels, vision.image_size, vision.image_size)
        return {"pixel_values": torch.randn(*shape, generator=generator).to(model.dtype)}
    if case.model_type in ("musicgen", "musicgen_melody") and case.mapping == "causal_lm":  # one row per codebook
        books = config.num_codebooks
        ids = batch["input_ids"]
        labels = ids.unsqueeze(-1).expand(-1, -1, books).clone()
        return {
            "input_ids": ids.repeat_interleave(books, dim=0),
            "attention_mask": batch["attention_mask"],
            "labels": labels,
        }
    return {}


def make_batch(case: Case, model: nn.Module, seed: int = 1, size: int = BATCH) -> dict[str, torch.Tensor]:
    """Return a labelled batch the model accepts and whose training-mode loss is finite and deterministic.

    The main input's shape is tried from :func:`_main_input_candidates`; sequence classifiers get right padding
    (a decoder classifier must find the last real token), multiple choice a choices dimension.
    """
    failures = []
    for batch in _candidate_batches(case, model, seed, size):
        if isinstance(batch, Exception):
            failures.append(first_line(batch))
            continue
        for drop in ((), ("attention_mask",)):
            trial = {k: v for k, v in batch.items() if k not in drop}
            try:
                first, second = (_loss(model, trial, seed=s) for s in (0, 1))
            except Exception as error:  # noqa: BLE001 - any failure is a reason to try the next shape
                failures.append(first_line(error))
                continue
            if not torch.isfinite(first):
                failures.append(f"the loss is {float(first)}")
                continue
            if not torch.equal(first, second):
                raise RuntimeError("the training-mode loss is random (it differs between two seeds)")
            return trial
    raise RuntimeError(failures[0] if failures else "no input shape fits")


def _candidate_batches(case: Case, model: nn.Module, seed: int, size: int):
    """Yield labelled candidate batches (or the error that stopped one), in order of likelihood."""
    main = _main_input_candidates(model, torch.Generator().manual_seed(seed), size)
    if case.mapping in ("image_text_to_text", "ctc", "semantic_segmentation", "audio_frame_classification"):
        import zoo_tasks

        for batch in zoo_tasks.candidates(case, model, main, torch.Generator().manual_seed(seed + 1), size):
            yield getattr(batch, "error", batch)
        return
    for candidate in main:
        generator = torch.Generator().manual_seed(seed + 1)
        batch = dict(candidate)
        ids = batch.get("input_ids")
        if ids is not None:
            pad = getattr(model.config, "pad_token_id", None)
            mask = torch.ones_like(ids)
            if case.mapping == "sequence_classification" and pad is not None:
                ids[1, 5:] = pad
                ids[2, 6:] = pad
                mask = (ids != pad).long()
            eos = getattr(model.config, "eos_token_id", None)
            if case.mapping in ("sequence_classification", "question_answering") and isinstance(eos, int):
                ids[torch.arange(size), mask.sum(-1) - 1] = eos  # encoder-decoder classifiers read each example's eos

            batch["attention_mask"] = mask
            if case.mapping == "multiple_choice":
                batch = {k: v.unsqueeze(1).expand(-1, CHOICES, -1).clone() for k, v in batch.items()}
                batch["input_ids"][:, 1:] = torch.randint(
                    SPECIAL_IDS, _vocab(model.config), (size, CHOICES - 1, SEQ), generator=generator
                )
        if case.model_type == "longformer" and "input_ids" in batch:  # its QA and choices want three separators
            batch["input_ids"][..., [2, 3, SEQ - 1]] = model.config.sep_token_id
        batch.update(_labels(case, model, candidate, generator, size))
        batch.update(_extra_inputs(case, model, batch, generator, size))
        yield batch


def _loss(model: nn.Module, batch: dict, seed: int = 0, **kwargs) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        output = model(**batch, **kwargs)
    loss = output["loss"] if isinstance(output, dict) or hasattr(output, "keys") else output[0]
    if loss is None or not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise RuntimeError("the model returns no scalar loss for this batch")
    return loss
