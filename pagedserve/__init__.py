"""pagedserve: vLLM's architecture behind the OpenAI and Ollama APIs, on CPU by default."""

from pagedserve.config import EngineConfig, ModelConfig
from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.sampling_params import SamplingParams

__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch; import it lazily so `pagedserve --help` stays fast.
    if name == "LLM":
        from pagedserve.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "CompletionOutput", "EngineConfig", "ModelConfig", "RequestOutput",
           "SamplingParams", "__version__"]
