"""Loading models from local files, never the network: a saved Hugging Face causal LM directory, or a PEFT LoRA
adapter directory over its local base model (see lora.py). ``check_model_dir`` reads no weights: the audit's
preflight calls it before anything starts."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelError, first_line
from .lora import base_model_dir, is_adapter_dir, unwrap


def check_model_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as a directory holding a saved model (``config.json``) or a PEFT adapter; a one-line ModelError
    otherwise. Reads no weights: the audit's preflight calls it before anything starts."""
    p = Path(path)
    if not p.is_dir():
        raise ModelError(f"--model {p}: no such directory", hint="give a local Hugging Face model directory")
    if not (p / "config.json").exists() and not is_adapter_dir(p):
        raise ModelError(f"--model {p}: no config.json", hint="save the model with save_pretrained()")
    return p


def load_pretrained(path: str | os.PathLike[str], *, trust_remote_code: bool = False, tokenizer_only: bool = False):
    """Load a local Hugging Face causal LM and its tokenizer, never touching the network. A PEFT LoRA adapter
    directory loads its (local) base model with the adapter's layers injected (see lora.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise ModelError(f"--model {p}: no such directory", hint="give a local Hugging Face model directory")
    if is_adapter_dir(p) and not tokenizer_only:
        return load_adapter(p, trust_remote_code=trust_remote_code)
    if not tokenizer_only:
        check_model_dir(p)
    def load(what: str, loader, hint: str):
        try:
            return loader.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
        except Exception as exc:
            raise ModelError(f"--model {p}: the {what} could not be loaded: {first_line(exc)}", hint=hint) from None

    model = None if tokenizer_only else load("model", AutoModelForCausalLM,
                                             "check that the weights are complete (re-save the model)")
    tokenizer = load("tokenizer", AutoTokenizer, "save the tokenizer into the model directory")
    if len(tokenizer) < 2:  # transformers builds an empty tokenizer when the directory has no tokenizer files
        raise ModelError(f"--model {p}: no usable tokenizer ({len(tokenizer)} tokens)",
                         hint="save the tokenizer into the model directory (tokenizer.save_pretrained)")
    return model, tokenizer


def load_adapter(path: str | os.PathLike[str], *, trust_remote_code: bool = False):
    """The base model with the adapter's LoRA layers injected (not merged), and the tokenizer (the adapter's own
    when it ships one, else the base model's)."""
    adapter = Path(path)
    base = base_model_dir(adapter)
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelError(f"--model {adapter} is a LoRA adapter, which needs the optional package peft",
                         hint="pip install 'influence-audit[lora]'") from None
    model, tokenizer = load_pretrained(base, trust_remote_code=trust_remote_code)
    if (adapter / "tokenizer_config.json").is_file():
        _, tokenizer = load_pretrained(adapter, trust_remote_code=trust_remote_code, tokenizer_only=True)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except Exception as exc:
        raise ModelError(f"--model {adapter}: the adapter could not be applied to {base}: {first_line(exc)}",
                         hint="check that the adapter was trained on this base model") from None
    return unwrap(peft_model), tokenizer
