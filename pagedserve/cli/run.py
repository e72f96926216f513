"""`pagedserve run [MODEL] [PROMPT]`: one answer, or a chat, streamed to the terminal."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from pagedserve.engine import ContextLengthError, PromptTooLongError
from pagedserve.engine_args import add_engine_args, engine_config_from_args, flag_of
from pagedserve.outputs import RequestOutput

logger = logging.getLogger(__name__)

# One user, one answer at a time: the KV cache holds this many sequences of the full context
# (Ollama's num_ctx x num_parallel), not the server's share of free memory.
RUN_KV_SEQUENCES = 2  # the KV cache holds this many sequences of the full context
RUN_ENGINE_FLAGS = ("kv_cache_memory", "max_model_len", "kv_layout", "dtype", "kv_cache_dtype",
                    "device", "tensor_parallel_size", "num_threads", "async_scheduling",
                    "enforce_eager", "gpu_memory_utilization")


CHAT_HELP = """Available commands:
  /clear        forget the conversation so far
  /bye          leave (Ctrl-D does too)
  /?, /help     this help
Ctrl-C stops an answer; the chat goes on.
Use \"\"\" to begin and end a message of several lines.
"""

EPILOG = """examples:
  pagedserve run "Why is the sky blue?"               the bundled SmolLM2-135M answers once
  pagedserve run llama3.2:1b "Hi" --max-tokens 64     a model from ~/.ollama/models
  pagedserve run Qwen/Qwen2.5-0.5B-Instruct           chat with a Hugging Face cached model
  cat notes.txt | pagedserve run smollm2 "Summarize:" the piped text follows the prompt
  printf 'Hi\\nAnd then?\\n' | pagedserve run smollm2  a chat read from stdin, a turn a line
  pagedserve run smollm2 "Tell me a joke" --seed 42  the same joke every time

A single argument with spaces in it is a prompt for the default model; a single word is a
model name, so ask one word with the model first: pagedserve run smollm2 "Hi"
"""

def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run", help="answer a prompt, or chat, in the terminal",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Answer PROMPT with MODEL, streaming the text as it comes. Without PROMPT, "
        "chat: the conversation is kept (its oldest turns dropped once it outgrows the "
        "context), /bye leaves, Ctrl-C interrupts an answer but not the chat. MODEL is a name "
        "(smollm2:135m, llama3.2, ORG/NAME) or a path (see `pagedserve list`); the default is "
        "the bundled smollm2:135m.",
        epilog=EPILOG,
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help="model name or path")
    p.add_argument("prompt", nargs="?", metavar="PROMPT", help="answer this once and exit")
    g = p.add_argument_group("sampling (default: the model's own defaults)")
    g.add_argument("--max-tokens", type=int, help="most tokens per answer")
    g.add_argument("--temperature", type=float, help="0 is greedy")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--seed", type=int,
                   help="same seed, same answer (default: answers vary from run to run)")
    g.add_argument("--stop", action="append", help="stop at this text (repeatable)")
    g.add_argument("--system", help="system prompt (replaces the model's)")
    add_engine_args(p.add_argument_group("engine"), RUN_ENGINE_FLAGS, default_help={
        "kv_cache_memory": f"room for {RUN_KV_SEQUENCES} sequences of the full context, at most "
                           "a quarter of free memory",
        "max_model_len": "the model's"})
    p.add_argument("--stats", action="store_true",
                   help="print token counts and speed after each answer (on stderr)")
    p.set_defaults(func=cmd_run)


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Only what the user gave: the model's defaults fill in the rest."""
    overrides = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
    }
    return {k: v for k, v in overrides.items() if v is not None}


def invalid_flag(args: argparse.Namespace) -> str | None:
    """What is wrong with the sampling and engine flags, named as flags; None when nothing.

    Checked before the model loads, by the same SamplingParams and EngineConfig that check
    them later, so that `--temperature -1` does not wait for a load to fail."""
    from pagedserve.sampling_params import SamplingParams

    if args.max_tokens is not None and args.max_tokens < 1:  # 0 is the API's "prompt only"
        return f"--max-tokens must be >= 1, got {args.max_tokens}"
    try:
        SamplingParams(**sampling_overrides(args))
        engine_config_from_args(args, kv_cache_sequences=RUN_KV_SEQUENCES)
    except ValueError as exc:
        message = str(exc)  # starts with the field's name
        field = message.split(" ", 1)[0]
        flag = flag_of(field) if field in args.engine_fields else (
            "--" + field.replace("_", "-") if hasattr(args, field) else None)
        return flag + message[len(field):] if flag else message
    return None


def _split_model_and_prompt(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """`run "Why is the sky blue?"`: one argument with whitespace is a prompt, not a model."""
    if args.prompt is None and args.model is not None and any(c.isspace() for c in args.model):
        return None, args.model
    return args.model, args.prompt


def cmd_run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except KeyboardInterrupt:  # while loading, or an answer of a one-shot run
        print(file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from pagedserve.hub.registry import ModelNotFoundError
    from pagedserve.hub.store import ModelIntegrityError
    from pagedserve.llm import LLM
    from pagedserve.loader import ModelLoadError

    if (problem := invalid_flag(args)) is not None:
        print(f"Error: {problem}", file=sys.stderr)
        return 2
    model, prompt = _split_model_and_prompt(args)
    stdin_is_tty = sys.stdin.isatty()
    if prompt is not None and not stdin_is_tty:
        piped = _read_all(sys.stdin)
        if piped.strip():
            prompt = f"{prompt}\n\n{piped}"
    try:
        engine_config = engine_config_from_args(args, kv_cache_sequences=RUN_KV_SEQUENCES)
        started = time.monotonic()
        llm = LLM(model, engine_config=engine_config, progress=sys.stderr.isatty())
        logger.debug("model loaded in %.1f s", time.monotonic() - started)
        params = llm.default_params(**sampling_overrides(args))
    except ModelNotFoundError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        if prompt is None and model is not None and not any(c in model for c in ":/\\"):
            # `run Hi`: one word, read as a model name; a prompt needs the model before it
            quoted = model.replace('"', '\\"')
            print(f'If "{quoted}" was meant as a prompt, name the model first: '
                  f'pagedserve run smollm2 "{quoted}"', file=sys.stderr)
        return 1
    except (ModelIntegrityError, ModelLoadError, ValueError) as exc:
        logger.debug("cannot load %s", model, exc_info=True)  # --verbose: the traceback
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    session = ChatSession(llm, params, system=args.system, out=sys.stdout,
                          stats=args.stats)
    if prompt is not None:
        try:
            session.ask(prompt)
        except ContextLengthError as exc:
            print(f"Error: {context_overflow_message(exc, llm)}", file=sys.stderr)
            return 1
        return 0
    session.loop(tty_reader() if stdin_is_tty else pipe_reader(sys.stdin),
                 interactive=stdin_is_tty)
    return 0


def _read_all(stream: TextIO) -> str:
    try:
        return stream.read()
    except OSError:  # no stdin at all (a daemon, or pytest's capture)
        return ""


LineReader = Callable[[str], str | None]  # prompt -> the next line typed or piped; None: end


def tty_reader() -> LineReader:
    """Lines typed at the terminal, with readline editing where available. Ctrl-C raises
    KeyboardInterrupt out of a call and leaves the reader usable."""
    try:
        import readline  # noqa: F401 - input() edits lines once it is imported
    except ImportError:
        pass

    def read(prompt: str) -> str | None:
        try:
            return input(prompt)
        except EOFError:
            print()
            return None

    return read


def pipe_reader(stream: TextIO) -> LineReader:
    def read(prompt: str) -> str | None:  # the prompt is for terminals only
        line = stream.readline()
        return line.rstrip("\n") if line else None

    return read


class ChatSession:
    """A conversation with one model: history, streaming, Ctrl-C stopping one answer.

    When the history outgrows the context, the oldest turns are dropped (the system prompt
    stays), as Ollama does, leaving room for an answer: ``max_tokens`` when the parameters set
    it, else a quarter of the context.
    """

    def __init__(self, llm: Any, params: Any, system: str | None = None,
                 out: TextIO = sys.stdout, stats: bool = False) -> None:
        self.llm = llm
        self.params = params
        self.system = system
        self.out = out
        self.stats = stats
        self.history: list[dict[str, str]] = []
        self._told_about_dropping = False

    def messages(self, turns: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
        """The system prompt, then ``turns`` (default: the whole history)."""
        prefix = [{"role": "system", "content": self.system}] if self.system else []
        return prefix + (self.history if turns is None else turns)

    def ask(self, text: str) -> str:
        """Send one user message, stream the answer, keep both in the history.

        Raises ContextLengthError, with the message left out of the history, when the message
        does not fit the context even alone."""
        self.history.append({"role": "user", "content": text})
        try:
            self._make_room()
            answer, _ = self._stream(self.messages())
        except ValueError:  # ContextLengthError, or a message the template refuses
            self.history.pop()
            raise
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def _make_room(self) -> None:
        """Drop the oldest turns until the conversation leaves room for an answer; raise
        ContextLengthError, dropping nothing, when the newest message cannot fit even alone."""
        limit = self.llm.max_model_len
        max_tokens = getattr(self.params, "max_tokens", None)
        alone = len(self.llm.render_chat(self.messages(self.history[-1:])))
        if alone + (max_tokens or 1) > limit:
            raise ContextLengthError(limit, alone, max_tokens or 1)
        room = max_tokens or max(1, limit // 4)
        dropped = 0
        while (len(self.history) > 1
               and len(self.llm.render_chat(self.messages())) + room > limit):
            del self.history[:2]  # the oldest user message and its answer
            dropped += 1
        if dropped and not self._told_about_dropping:
            self._told_about_dropping = True
            print(f"(The conversation outgrew the context of {limit} tokens: its oldest turns "
                  "are dropped from now on, the system prompt is kept. /clear starts afresh.)",
                  file=sys.stderr)

    def _stream(self, messages: list[dict[str, str]]) -> tuple[str, RequestOutput | None]:
        parts: list[str] = []
        last: RequestOutput | None = None
        started = time.monotonic()
        stream = self.llm.stream_chat(messages, self.params)
        try:
            for output in stream:
                last = output
                if output.delta_text:
                    parts.append(output.delta_text)
                    self.out.write(output.delta_text)
                    self.out.flush()
        except KeyboardInterrupt:
            # the generator's own cleanup aborts too; abort() of a finished id is harmless
            stream.close()
            if last is not None:
                self.llm.abort(last.request_id)
            self.out.write("\n[interrupted]")
        self.out.write("\n")
        self.out.flush()
        if self.stats and last is not None:
            _print_stats(last, time.monotonic() - started)
        return "".join(parts), last

    def loop(self, read_line: LineReader, interactive: bool) -> None:
        """Read user turns until /bye or the end of input."""
        if interactive:
            print("Send a message (/? for help)", file=sys.stderr)
        while True:
            try:
                text = read_message(read_line)
            except KeyboardInterrupt:
                print("\nUse Ctrl + d or /bye to exit.", file=sys.stderr)
                continue
            if text is None:
                return
            if not text.strip():
                continue
            command = text.strip().split()[0].lower() if text.startswith("/") else None
            if command in ("/bye", "/exit", "/quit"):
                return
            if command == "/clear":
                self.history.clear()
                print("Cleared the conversation.", file=sys.stderr)
                continue
            if command in ("/?", "/help"):
                print(CHAT_HELP, file=sys.stderr, end="")
                continue
            if command is not None and " " not in text.strip():
                print(f"Unknown command {command!r}; /? lists them.", file=sys.stderr)
                continue
            try:
                self.ask(text)
            except ContextLengthError as exc:
                print(f"Error: {context_overflow_message(exc, self.llm)}", file=sys.stderr)
                continue
            if interactive:
                self.out.write("\n")


def context_overflow_message(exc: ContextLengthError, llm: Any) -> str:
    """What did not fit, and the way out: a shorter prompt or a longer context."""
    limit = exc.max_model_len
    prompt = getattr(exc, "num_prompt_tokens", None)
    if isinstance(exc, PromptTooLongError):  # refused by its length before tokenizing
        what = (f"the prompt is {exc.num_chars} characters, more than a context of {limit} "
                "tokens can hold")
    elif prompt > limit:
        what = f"the prompt is {prompt} tokens, more than the context of {limit} tokens"
    elif prompt == limit:
        what = f"the prompt fills the context of {limit} tokens, leaving no room for an answer"
    else:
        what = (f"the prompt ({prompt} tokens) and the answer's max_tokens ({exc.max_tokens}) "
                f"need {prompt + exc.max_tokens} tokens, more than the context of {limit}")
    own = llm.engine.model_config.max_position_embeddings
    if limit < own:
        way = (f"shorten it, or give a longer context: --max-model-len N (up to {own}, the "
               "model's own), or num_ctx in the model's parameters")
        if llm.engine.info.kv_capacity_tokens <= limit:
            way += ", with a larger --kv-cache-memory"
    else:
        way = f"shorten it: {own} tokens is the model's own context"
    if prompt is not None and prompt < limit:
        way += ", or lower --max-tokens"
    return f"{what}; {way}"


def read_message(read_line: LineReader) -> str | None:
    """One message: a line, or the lines between one starting and one ending with \"\"\"."""
    line = read_line(">>> ")
    if line is None or not line.lstrip().startswith('"""'):
        return line
    body = [line.lstrip()[3:]]
    while not body[-1].rstrip().endswith('"""'):
        more = read_line("... ")
        if more is None:
            break
        body.append(more)
    body[-1] = body[-1].rstrip().removesuffix('"""')
    return "\n".join(body).strip("\n")


def _print_stats(last: RequestOutput, wall: float) -> None:
    parts = [f"prompt tokens {last.num_prompt_tokens} ({last.num_cached_tokens} cached)",
             f"output tokens {last.num_output_tokens}"]
    metrics = last.metrics
    if metrics is not None and metrics.time_to_first_token is not None:
        parts.append(f"first token {metrics.time_to_first_token:.2f} s")
        if metrics.last_token_time and metrics.first_token_time and last.num_output_tokens > 1:
            decode = metrics.last_token_time - metrics.first_token_time
            if decode > 0:
                parts.append(f"{(last.num_output_tokens - 1) / decode:.1f} tokens/s")
    parts.append(f"total {wall:.2f} s, finish {last.finish_reason}")
    print(", ".join(parts), file=sys.stderr)
