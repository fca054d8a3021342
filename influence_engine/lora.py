"""LoRA adapters: audit a fine-tune through the weights it trained.

A PEFT LoRA fine-tune freezes the base model and trains, for each adapted Linear layer ``W``, two small layers:
``y = W x + s · B (A x)`` with ``A`` (``lora_A``, ``r × in``) and ``B`` (``lora_B``, ``out × r``). Their
gradients are what the fine-tune changed, so they are what influence is measured through: with an adapter
directory as ``--model`` the tracked layers are every ``lora_A``/``lora_B`` (preset ``lora``, the default
``auto``). Each is an ordinary Linear layer inside the adapted model, so the passes, factors and scores are those
of any other layer: ``lora_A``'s input is the base layer's input ``x``, ``lora_B``'s is ``A x`` (after LoRA's
dropout, the identity in evaluation mode), and the scaling ``s`` is in their output gradients. ``--layers mlp``
(or any preset or regular expression) tracks base layers instead (``....base_layer``).

The base model comes from ``adapter_config.json``'s ``base_model_name_or_path``: a local directory (absolute, or
relative to the adapter directory or the working directory), never a download. ``peft`` is an optional extra,
imported only when an adapter is loaded (models.py, which loads models; this module only reads adapter configs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ModelError

if TYPE_CHECKING:  # torch is imported only when a model is loaded
    from torch import nn

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def base_model_dir(adapter: Path) -> Path:
    """The local base model directory an adapter names, or a one-line error."""
    cfg_path = adapter / ADAPTER_CONFIG
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{cfg_path}: not readable JSON ({exc})", hint="re-save the adapter") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported",
                         hint="only LoRA adapters can be audited")
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{cfg_path}: no base_model_name_or_path",
                         hint="set it to the base model's local directory")
    for candidate in (Path(base), adapter / base):
        if (candidate / "config.json").is_file():
            return candidate
    raise ModelError(f"{cfg_path}: base model {base!r} is not a local model directory (nothing is downloaded)",
                     hint="save the base model locally and set base_model_name_or_path to its directory")


def unwrap(peft_model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` (its LoRA layers injected): what the engine runs."""
    inner = peft_model.base_model
    return getattr(inner, "model", inner)


def layers_for(model_dir: str | os.PathLike[str], layers: str) -> str:
    """``--layers`` resolved for a model directory without loading it: ``auto`` is ``lora`` for an adapter
    directory and ``mlp`` otherwise (as :func:`~influence_engine.presets.resolve_layers` decides on the loaded
    model)."""
    if layers != "auto":
        return layers
    return "lora" if is_adapter_dir(model_dir) else "mlp"
