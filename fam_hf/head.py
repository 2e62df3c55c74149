"""Finding a model's head (the linear layer from penultimate features to logits) and reading its weight.

Knows the names transformers gives heads, the wrappers PEFT puts around them, and nothing about losses or
training. The weight it returns is the one the forward pass actually used, so it must be read while the
layer runs (see :mod:`fam_hf.probe`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Attributes that hold classification heads, tried in order. A container resolves to its ``out_proj`` (RoBERTa,
# BART) or to the last linear layer of a Sequential (ResNet).
CLASSIFIER_NAMES = ("score", "classifier", "classification_head", "qa_outputs", "cls_head", "head")


def find_head(model: nn.Module, name: str | None = None) -> tuple[str, nn.Module]:
    """Return ``(dotted_name, module)`` of the model's head, or the module called ``name``.

    Without a name it tries, in order, the classification heads transformers uses (``score``, ``classifier``,
    ``classifier.out_proj``, ``classification_head.out_proj``, the last linear layer of a ``classifier``
    Sequential) and then ``get_output_embeddings()`` for language models. PEFT wrappers are looked through.
    """
    base = _base_model(model)
    if name is not None:
        module = _get_submodule(model, base, name)
        if module is None:
            raise ValueError(
                f"fam_layer={name!r} names no module of {type(base).__name__}. "
                f"Linear layers that could be the head: {linear_candidates(base)}."
            )
        if not is_linear_like(module):
            inner = [f"{name}.{n}" for n, m in module.named_modules() if n and is_linear_like(m)]
            hint = f" Linear layers inside it: {inner[-5:]}." if inner else ""
            raise ValueError(
                f"fam_layer={name!r} is a {type(module).__name__}, not a linear layer. Relative flatness is defined "
                f"for a linear head z = W phi + b; set fam_layer to the layer that produces the logits.{hint}"
            )
        return name, module

    for attr in CLASSIFIER_NAMES:
        found = getattr(base, attr, None)
        if isinstance(found, nn.Module):
            resolved = _resolve_container(attr, found)
            if resolved is not None:
                return resolved
    get_output = getattr(base, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if isinstance(output, nn.Module) and is_linear_like(output):
        return _name_of(base, output), output
    by_width = _last_linear_of_width(base, _head_width(base))
    if by_width is not None:
        logger.info("FAM: no head under the usual names; %r is the last linear layer of the head's width.", by_width[0])
        return by_width
    raise ValueError(
        f"No head found in {type(base).__name__}: none of {CLASSIFIER_NAMES} is a linear layer and "
        "get_output_embeddings() returned none. Name the linear layer that produces the logits with "
        f"fam_layer (FAMTrainingArguments) or head= ; candidates: {linear_candidates(base)}."
    )


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return the ``(weight, bias)`` the module's forward applies, weight as ``(outputs, inputs)``.

    Looks through PEFT: the active copy of a ``modules_to_save`` head, and ``base + sum of LoRA deltas`` for a
    LoRA-adapted head. Call it during the forward pass: under FSDP or ZeRO-3 the weight is only whole then.
    """
    active = _active_module(module)
    if _is_lora_layer(active):
        base_weight, bias = linear_weight(active.get_base_layer())
        if not active.disable_adapters and not active.merged:
            for adapter in active.active_adapters:
                if adapter in active.lora_A:
                    base_weight = base_weight + active.get_delta_weight(adapter)
        return base_weight, bias
    if isinstance(active, nn.Linear):
        return active.weight, active.bias
    if type(active).__name__ == "Conv1D" and getattr(active, "weight", None) is not None:
        return active.weight.T, active.bias  # transformers' Conv1D stores (inputs, outputs)
    raise ValueError(
        f"The head is a {type(active).__name__}, not a linear layer; relative flatness needs z = W phi + b. "
        "Set fam_layer to the nn.Linear that produces the logits."
    )


def check_effective_weight(module: nn.Module, name: str, penalize: bool) -> None:
    """Refuse a head whose PEFT adapter makes its weight something other than ``base + sum of LoRA deltas``.

    DoRA rescales each column of ``base + B A`` to a learned magnitude, a weight :func:`linear_weight` does not
    reproduce; measuring (``penalize=False``) only warns that the flatness is that of ``base + B A``.
    """
    active = _active_module(module)
    if not _is_lora_layer(active) or active.disable_adapters or active.merged:
        return
    dora = [a for a in active.active_adapters if getattr(active, "use_dora", {}).get(a, False)]
    if not dora:
        return
    message = (
        f"The head {name!r} has a DoRA adapter ({dora[0]!r}): its weight is a learned magnitude times the normalized "
        "columns of base + B A, which fam_hf does not reproduce, so the penalty would be the relative flatness of "
        "another weight. Use LoRA without use_dora on the head, put the head in PEFT's modules_to_save, or keep "
        "DoRA on the backbone only with fam_gradient='full'."
    )
    if penalize:
        raise ValueError(message)
    logger.warning("%s Measuring only (fam_lambda=0): relative_flatness is that of base + B A.", message)


def head_shape(module: nn.Module) -> tuple[int, int]:
    """Return ``(outputs, inputs)`` of a linear head without reading its weight (which FSDP or ZeRO-3 may hold in
    shards outside the forward pass): from the layer's declared sizes, else from the weight's (full) shape."""
    active = _active_module(module)
    if _is_lora_layer(active):
        active = active.get_base_layer()
    if isinstance(getattr(active, "out_features", None), int) and isinstance(getattr(active, "in_features", None), int):
        return active.out_features, active.in_features
    weight = active.weight
    shape = tuple(getattr(weight, "ds_shape", weight.shape))
    return (shape[1], shape[0]) if type(active).__name__ == "Conv1D" else (shape[0], shape[1])


def is_linear_like(module: nn.Module) -> bool:
    """Return whether ``module`` computes ``x W^T + b`` (nn.Linear, transformers' Conv1D, or PEFT around one)."""
    active = _active_module(module)
    if _is_lora_layer(active):
        active = active.get_base_layer()
    return isinstance(active, nn.Linear) or type(active).__name__ == "Conv1D"


def linear_candidates(model: nn.Module, limit: int = 8) -> list[str]:
    """Return the names of the last ``limit`` linear layers, the likely heads, for error messages."""
    names = [name for name, module in model.named_modules() if name and is_linear_like(module)]
    return names[-limit:]


def _head_width(model: nn.Module) -> int | None:
    """The number of outputs a head of this model has: one logit per choice, a start and an end logit per position,
    else ``num_labels``."""
    name = type(model).__name__
    if name.endswith("ForMultipleChoice"):
        return 1
    if name.endswith("ForQuestionAnswering"):
        return 2
    return getattr(getattr(model, "config", None), "num_labels", None)


def _last_linear_of_width(model: nn.Module, width: int | None) -> tuple[str, nn.Module] | None:
    """The last linear layer with ``width`` outputs (``num_labels``): a classifier's head under another name
    (XLNet's ``logits_proj``, Funnel's ``classifier.linear_out``, XLM's ``sequence_summary.summary``). A guess the
    certificate then checks: a layer whose output is not what the loss reads is refused, never measured."""
    if not isinstance(width, int) or width < 1:
        return None
    found = [(n, m) for n, m in model.named_modules() if n and is_linear_like(m) and head_shape(m)[0] == width]
    return found[-1] if found else None


def _resolve_container(name: str, module: nn.Module) -> tuple[str, nn.Module] | None:
    if is_linear_like(module):
        return name, module
    out_proj = getattr(module, "out_proj", None)
    if isinstance(out_proj, nn.Module) and is_linear_like(out_proj):
        return f"{name}.out_proj", out_proj
    if isinstance(module, nn.Sequential):
        linear = [(f"{name}.{n}", m) for n, m in module.named_children() if is_linear_like(m)]
        if linear:
            return linear[-1]
    return None


def _base_model(model: nn.Module) -> nn.Module:
    """Return the transformers model inside PEFT, DDP or compile wrappers."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            inner = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            inner = model._orig_mod
        else:
            return model
        if inner is model:
            return model
        model = inner


def _get_submodule(model: nn.Module, base: nn.Module, name: str) -> nn.Module | None:
    for root in (base, model):
        try:
            return root.get_submodule(name)
        except AttributeError:
            continue
    return None


def _name_of(root: nn.Module, target: nn.Module) -> str:
    return next((name for name, module in root.named_modules() if module is target), type(target).__name__)


def _active_module(module: nn.Module) -> nn.Module:
    """Return the module a PEFT ``modules_to_save`` wrapper actually runs, or ``module`` itself."""
    copies = getattr(module, "modules_to_save", None)
    if isinstance(copies, nn.ModuleDict) and hasattr(module, "original_module"):
        active = [] if module.disable_adapters else module.active_adapters
        if active and active[0] in copies:
            return copies[active[0]]
        return module.original_module
    return module


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "get_base_layer") and hasattr(module, "get_delta_weight")
