"""What the client-family tool tests share: the bundled model's server flags, the weather tool
they call, the schema its calls must validate against, and the question that calls it."""

from __future__ import annotations

MODEL = "smollm2:135m"
ARGS = ["--served-model-name", MODEL, "--kv-cache-memory", "128MiB", "--max-model-len", "2048",
        "--max-num-seqs", "16"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
# what a call must validate against: the tool's schema, taking no keys it does not define
EXACT = {"get_weather": {**WEATHER["function"]["parameters"], "additionalProperties": False}}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]
