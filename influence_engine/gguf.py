"""GGUF files as models: dequantised once by transformers into an ordinary Hugging Face directory, cached.

transformers reads GGUF (``from_pretrained(dir, gguf_file=NAME)``, with the ``gguf`` and ``accelerate``
packages: the ``gguf`` extra) and dequantises every tensor to float32. The loaded model keeps a quantizer that
refuses ``save_pretrained``, so the weights are copied into a fresh model built from the same config, which
saves as a plain directory with the tokenizer (and its chat template).

The cache key is the sha256 of the whole file (streamed: ~0.4 s per 100 MB here), so a file renamed, copied or
touched maps to the same directory and a changed file never reuses a stale one. The directory is written under
a temporary name and renamed into place: a killed conversion leaves nothing half-written behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ModelError, first_line

GGUF_HINT = "pip install 'influence-audit[gguf]'"
_CHUNK = 8 << 20


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """True for a path that names a GGUF file (by its suffix; the file may not exist)."""
    return str(path).lower().endswith(".gguf")


def gguf_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 of the file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_extra(path: Path) -> None:
    missing = []
    for name in ("gguf", "accelerate"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ModelError(f"--model {path}: reading a GGUF file needs the {' and '.join(missing)} package"
                         f"{'s' if len(missing) > 1 else ''}", hint=GGUF_HINT)


def _architecture(path: Path) -> str:
    """``general.architecture`` from the file's header (no tensors read); a one-line error for a file that is not
    GGUF or an architecture transformers cannot load."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except Exception as exc:
        raise ModelError(f"--model {path}: not a readable GGUF file ({first_line(exc)[:200]})",
                         hint="give a .gguf model file, or a Hugging Face model directory") from None
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelError(f"--model {path}: GGUF architecture {arch!r} is not one transformers can load "
                         f"({', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})",
                         hint="convert the model to a Hugging Face directory with its original tools, or upgrade "
                              "transformers")
    return arch


def convert_gguf(path: str | os.PathLike[str], cache_root: str | os.PathLike[str], *, log=None) -> Path:
    """The Hugging Face directory for the GGUF file ``path``: ``cache_root/gguf-<stem>-<sha256[:16]>``, converted
    on first use (``log(message)`` is told when a conversion starts and ends)."""
    src = Path(path).expanduser()
    if not src.is_file():
        raise ModelError(f"--model {src}: no such file", hint="give a .gguf file or a Hugging Face model directory")
    digest = gguf_fingerprint(src)
    root = Path(cache_root).expanduser().resolve()
    final = root / f"gguf-{src.stem[:60]}-{digest[:16]}"
    if (final / "config.json").is_file():
        return final
    _check_extra(src)
    arch = _architecture(src)
    if log is not None:
        log(f"converting {src.name} ({arch}, {src.stat().st_size / 2**20:.0f} MiB) to a Hugging Face directory "
            f"under {root} (once)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(what: str, loader, **kw):
        try:
            return loader.from_pretrained(str(src.parent), gguf_file=src.name, local_files_only=True, **kw)
        except Exception as exc:
            raise ModelError(f"--model {src}: transformers could not load the GGUF {what} ({arch}): "
                             f"{first_line(exc)[:200]}", hint="convert the model to a Hugging Face directory "
                             "with its original tools, or upgrade transformers") from None

    tokenizer = load("tokenizer", AutoTokenizer)
    loaded = load("model", AutoModelForCausalLM, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = loaded.state_dict()
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    fresh.tie_weights()
    if missing or unexpected:
        raise ModelError(f"--model {src}: the GGUF weights do not fill the {type(fresh).__name__} "
                         f"({len(missing)} tensors missing, {len(unexpected)} unexpected: "
                         f"{', '.join((list(missing) + list(unexpected))[:3])})",
                         hint="convert the model with its original tools")
    del loaded, state
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gguf-", dir=root))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "gguf.json").write_text(json.dumps({"source": str(src.resolve()), "sha256": digest,
                                                   "bytes": src.stat().st_size, "architecture": arch}, indent=1))
        from .atomic import umask_mode

        tmp.chmod(umask_mode(0o777))
        try:
            os.rename(tmp, final)
        except OSError:  # another process converted the same file first: use theirs
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if log is not None:
        log(f"converted: {final}")
    return final
