"""The `pagedserve` command line: help, list/show snapshots, ps against a server, pull/rm, and
`run` one-shot and as a chat read from a pipe (a fake LLM for the chat logic, the real bundled
model for the end-to-end runs)."""

from __future__ import annotations

import io
import json
import re
import socket
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import test_registry

from pagedserve.arg_types import parse_bytes as parse_size
from pagedserve.cli import build_parser, main
from pagedserve.cli.run import ChatSession, pipe_reader
from pagedserve.hub.bundled import bundled_model_path
from pagedserve.outputs import RequestOutput

# the stores of test_registry.py, as fixtures here too
home = test_registry.home
ollama_models = test_registry.ollama_models
hf_cache = test_registry.hf_cache
smollm_digest = test_registry.smollm_digest
SYSTEM = test_registry.SYSTEM


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def anonymize(text: str, digest: str) -> str:
    return text.replace(str(bundled_model_path()), "<bundled>").replace(digest, "<sha256>")


# ---------------------------------------------------------------------------------------------
# Help


def test_every_command_explains_itself_with_an_example(capsys) -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse's own
    for name in ("run", "list", "show", "ps", "pull", "rm", "cp"):
        help_text = commands[name].format_help()
        assert "example" in help_text, name
        assert f"pagedserve {name}" in help_text or name == "list", name
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "pagedserve list" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# list and show: snapshots

LIST_SNAPSHOT = """\
NAME                  SOURCE        FORMAT        QUANT   FAMILY   PARAMS   SIZE     WHERE
smol:latest           ollama        gguf          Q4_1    llama    135M     98 MB    ~/.ollama/models/blobs/sha256-<sha256>
someone/smol:q4       ollama        gguf          Q4_1    llama    135M     98 MB    ~/.ollama/models/blobs/sha256-<sha256>
tiny-org/tiny-llama   huggingface   safetensors   F32     llama    140K     561 KB   ~/.cache/huggingface/hub/models--tiny-org--tiny-llama/snapshots/0000000000000000000000000000000000000000
smollm2:135m          bundled       gguf          Q4_1    llama    135M     98 MB    <bundled>
"""


def test_list_snapshot(ollama_models, hf_cache, smollm_digest, capsys) -> None:
    rc, out, _ = run_cli(capsys, "list")
    assert rc == 0
    assert anonymize(out, smollm_digest) == LIST_SNAPSHOT


def test_list_json(ollama_models, capsys) -> None:
    rc, out, _ = run_cli(capsys, "list", "--json")
    rows = json.loads(out)
    assert rc == 0
    assert [(r["name"], r["source"], r["quantization"]) for r in rows] == [
        ("smol:latest", "ollama", "Q4_1"), ("someone/smol:q4", "ollama", "Q4_1"),
        ("smollm2:135m", "bundled", "Q4_1")]


SHOW_SNAPSHOT = """\
  Model
    name              smol:latest
    source            ollama
    path              ~/.ollama/models/blobs/sha256-<sha256>
    format            gguf
    architecture      llama
    family            llama
    parameters        135M
    context length    8192
    quantization      Q4_1
    size              98 MB

  Parameters
    max_tokens            48
    num_ctx               1024
    repetition_penalty    1.1
    stop                  "<|im_end|>"
    stop                  "User:"
    temperature           0.3
    top_k                 20

  System
    You are a terse assistant. Answer in one sentence.

  Template
    {% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system
    You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
    ' }}{% endif %}{{'<|im_start|>' + message['role'] + '
    ' + message['content'] + '<|im_end|>' + '
    '}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant
    ' }}{% endif %}

  Ollama template (informational: pagedserve renders the jinja one above)
    {{ if .System }}<|im_start|>system
    {{ .System }}<|im_end|>
    {{ end }}{{ .Prompt }}
"""


def test_show_snapshot(ollama_models, home, smollm_digest, capsys) -> None:
    rc, out, _ = run_cli(capsys, "show", "smol")
    assert rc == 0
    assert anonymize(out.replace(str(home), "~"), smollm_digest) == SHOW_SNAPSHOT


def test_show_hugging_face_model(hf_cache, capsys) -> None:
    rc, out, _ = run_cli(capsys, "show", "tiny-org/tiny-llama")
    assert rc == 0
    assert "    source            huggingface\n" in out
    assert "    format            safetensors\n" in out
    assert "    context length    512\n" in out
    assert "    max_tokens     100\n    temperature    0.6\n    top_p          0.9\n" in out
    assert "  Template\n    (none: the model has no chat template" in out


def test_show_parts(ollama_models, capsys) -> None:
    assert run_cli(capsys, "show", "smol", "--system")[1] == SYSTEM + "\n"
    assert run_cli(capsys, "show", "smol", "--parameters")[1].splitlines()[0] == (
        "max_tokens          48")
    assert run_cli(capsys, "show", "smol", "--template")[1].startswith("{% for message in")


def test_show_parts_a_model_does_not_have_say_so(home) -> None:
    """The bundled model has no parameters or system prompt: a note on stderr, not silence;
    stdout stays empty for scripts."""
    done = _run_cli_process(home, "show", "smollm2", "--parameters")
    assert (done.returncode, done.stdout) == (0, "")
    assert done.stderr == "smollm2:135m sets no default parameters: pagedserve's defaults apply\n"
    done = _run_cli_process(home, "show", "smollm2", "--system")
    assert (done.returncode, done.stdout) == (0, "")
    assert done.stderr == ("smollm2:135m has no system prompt of its own; its chat template may "
                           "add one to a conversation without one (--template shows it)\n")


def test_show_errors_are_one_clear_line(ollama_models, smollm_digest, capsys) -> None:
    rc, out, err = run_cli(capsys, "show", "nosuch")
    assert (rc, out) == (1, "")
    assert err.startswith("Error: model 'nosuch' not found; looked at:")
    (ollama_models / "blobs" / f"sha256-{smollm_digest}").unlink()
    rc, _, err = run_cli(capsys, "show", "smol")
    assert rc == 1
    assert err.startswith(f"Error: blob sha256-{smollm_digest} is missing")
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# ps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ps_without_a_server(capsys) -> None:
    port = _free_port()
    rc, out, err = run_cli(capsys, "ps", "--host", f"127.0.0.1:{port}")
    assert (rc, out) == (1, "")
    assert err == (f"Error: no server is running at http://127.0.0.1:{port}; start one with "
                   "`pagedserve serve`, or give its address with --host\n")


PS_BODY = json.dumps({"models": [{
        "name": "smollm2:135m", "model": "smollm2:135m", "size": 98_362_432,
        "digest": "sha256:b179c9523d0e6a0f98a330c7562b6827", "size_vram": 0,
        "context_length": 4096, "expires_at": "2126-11-26T23:40:00.123456+00:00",
        "details": {"format": "gguf", "family": "llama", "quantization_level": "Q4_1",
                    "dtype": "bfloat16"}}]})
PS_TABLE = (
    "NAME           ID             SIZE    PROCESSOR   DTYPE      CONTEXT   UNTIL\n"
    "smollm2:135m   b179c9523d0e   98 MB   100% CPU    bfloat16   4096      Forever\n")


@pytest.fixture
def ps_server():
    """A stand-in server answering GET /api/ps with PS_BODY; its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            assert self.path == "/api/ps"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(PS_BODY.encode())

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_ps_asks_the_server(ps_server, capsys) -> None:
    rc, out, _ = run_cli(capsys, "ps", "--host", ps_server)
    assert (rc, out) == (0, PS_TABLE)


def test_ps_prints_the_table_and_nothing_else(ps_server, home) -> None:
    done = _run_cli_process(home, "ps", "--host", ps_server)
    assert (done.returncode, done.stdout, done.stderr) == (0, PS_TABLE, "")  # no httpx log line


def test_version(home) -> None:
    from pagedserve.version import __version__

    for flag in ("--version", "-v"):  # -v as in Ollama; --verbose is the logs'
        done = _run_cli_process(home, flag)
        assert (done.returncode, done.stdout) == (0, f"pagedserve version {__version__}\n")


# ---------------------------------------------------------------------------------------------
# pull and rm


def test_pull_then_rm(ollama_models, home, smollm_gguf, capsys) -> None:
    rc, out, _ = run_cli(capsys, "pull", str(smollm_gguf), "--name", "mine:v1")
    assert rc == 0
    assert out.startswith("pulled ") and " as mine:v1:latest" not in out
    assert "as mine:v1 (sha256 verified)" in out
    rc, out, _ = run_cli(capsys, "list")
    assert out.splitlines()[1].split()[:2] == ["mine:v1", "pagedserve"]
    rc, out, err = run_cli(capsys, "rm", "mine:v1", "smol")
    assert rc == 1  # smol lives in Ollama's store: never removed from there
    assert out == "deleted 'mine:v1' (1 blob freed)\n"
    assert "'smol' is not in pagedserve's store" in err
    assert (ollama_models / "manifests" / "registry.ollama.ai" / "library" / "smol").is_dir()


def test_pull_errors(home, capsys) -> None:
    rc, _, err = run_cli(capsys, "pull", "nobody/nothing")
    assert rc == 1 and err.startswith("Error: cannot download nobody/nothing from Hugging Face")
    rc, _, err = run_cli(capsys, "pull", "some/where/else/too")
    assert rc == 1 and "no file, Ollama model, Hugging Face repository" in err


def test_pull_of_an_ollama_library_name_offline_is_one_line(home, monkeypatch) -> None:
    """Not in the Ollama store: downloaded from the registry, which is unreachable here."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("PAGEDSERVE_REGISTRY", f"http://127.0.0.1:{port}")
    done = _run_cli_process(home, "pull", "llama3.2:1b")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.startswith(
        f"Error: cannot reach the registry 127.0.0.1:{port} (http://127.0.0.1:{port}): ")
    assert done.stderr.endswith("check the network, or set PAGEDSERVE_REGISTRY to a registry "
                                "you can reach\n")
    assert done.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# run: the chat logic with a fake LLM


class FakeLLM:
    """Answers "echo: <last message>" in two deltas and records what it was asked."""

    instances: list[FakeLLM] = []

    def __init__(self, model=None, engine_config=None, **kwargs) -> None:
        self.model = model
        self.engine_config = engine_config
        self.calls: list[list[dict]] = []
        self.aborted: list[str] = []
        self.interrupt_next = False
        FakeLLM.instances.append(self)

    max_model_len = 10_000
    engine = types.SimpleNamespace(model_config=types.SimpleNamespace(
        max_position_embeddings=10_000), info=types.SimpleNamespace(kv_capacity_tokens=20_000))

    def default_params(self, **overrides):
        return {"defaults": True, **overrides}

    def render_chat(self, messages):
        """A token per word, and two per message for the template."""
        return [0] * sum(2 + len(m["content"].split()) for m in messages)

    def stream_chat(self, messages, params):
        self.calls.append([dict(m) for m in messages])
        request_id = f"req-{len(self.calls)}"
        yield RequestOutput(request_id, "echo: ", [1])
        if self.interrupt_next:
            self.interrupt_next = False
            raise KeyboardInterrupt
        yield RequestOutput(request_id, messages[-1]["content"], [2], finished=True,
                            finish_reason="stop")

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


@pytest.fixture
def fake_llm(monkeypatch: pytest.MonkeyPatch) -> type[FakeLLM]:
    FakeLLM.instances = []
    monkeypatch.setitem(sys.modules, "pagedserve.llm", types.SimpleNamespace(LLM=FakeLLM))
    return FakeLLM


def test_chat_keeps_history_and_obeys_commands() -> None:
    llm, out = FakeLLM(), io.StringIO()
    session = ChatSession(llm, params=None, system="Be brief.", out=out)
    lines = io.StringIO('Hi\n\n/?\n"""first\nsecond"""\n/clear\nAgain\n/bye\nnot read\n')
    session.loop(pipe_reader(lines), interactive=False)
    assert out.getvalue() == "echo: Hi\necho: first\nsecond\necho: Again\n"
    system = {"role": "system", "content": "Be brief."}
    assert llm.calls == [
        [system, {"role": "user", "content": "Hi"}],
        [system, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "echo: Hi"},
         {"role": "user", "content": "first\nsecond"}],
        [system, {"role": "user", "content": "Again"}],  # after /clear
    ]


def test_ctrl_c_stops_the_answer_not_the_chat() -> None:
    llm, out = FakeLLM(), io.StringIO()
    llm.interrupt_next = True
    session = ChatSession(llm, params=None, out=out)
    session.loop(pipe_reader(io.StringIO("Tell me a long story\nShorter\n")), interactive=False)
    assert llm.aborted == ["req-1"]
    assert out.getvalue() == "echo: \n[interrupted]\necho: Shorter\n"
    assert llm.calls[1][1] == {"role": "assistant", "content": "echo: "}  # the partial answer


def test_a_long_chat_drops_its_oldest_turns_and_says_so_once(capsys) -> None:
    llm, out = FakeLLM(), io.StringIO()
    llm.max_model_len = 40  # a quarter (10 tokens) stays free for the answer
    session = ChatSession(llm, params=None, system="Be brief.", out=out)
    turns = [f"turn {i} " + "word " * 4 for i in range(5)]  # 8 tokens a message
    session.loop(pipe_reader(io.StringIO("".join(t + "\n" for t in turns))), interactive=False)
    assert out.getvalue().count("\n") == 5  # every turn answered
    system = {"role": "system", "content": "Be brief."}
    for call in llm.calls:
        assert call[0] == system  # the system prompt is never dropped
        assert len(llm.render_chat(call)) + 10 <= 40
    assert llm.calls[-1][1:] == [  # the oldest turns went first
        {"role": "user", "content": turns[3]}, {"role": "assistant", "content": "echo: "
                                                 + turns[3]}, {"role": "user", "content": turns[4]}]
    err = capsys.readouterr().err
    assert err.count("The conversation outgrew the context of 40 tokens") == 1

    # a message that cannot fit even alone is refused; the conversation so far stays
    before = list(session.history)
    session.loop(pipe_reader(io.StringIO("word " * 40 + "\n")), interactive=False)
    assert session.history == before
    assert capsys.readouterr().err == (
        "Error: the prompt is 46 tokens, more than the context of 40 tokens; shorten it, or "
        "give a longer context: --max-model-len N (up to 10000, the model's own), or num_ctx "
        "in the model's parameters\n")


def test_run_one_shot_and_options(fake_llm, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    rc, out, _ = run_cli(capsys, "run", "smol", "Why?", "--max-tokens", "5", "--temperature",
                         "0", "--kv-cache-memory", "64MiB", "--stop", "\n")
    assert (rc, out) == (0, "echo: Why?\n")
    llm = fake_llm.instances[0]
    assert llm.model == "smol"
    assert llm.engine_config.kv_cache_memory == 64 * 2**20
    assert llm.engine_config.kv_cache_sequences == 2  # one user's share when not given
    assert llm.calls == [[{"role": "user", "content": "Why?"}]]


def test_run_with_one_argument_that_is_a_prompt(fake_llm, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    rc, out, _ = run_cli(capsys, "run", "Why is the sky blue?")
    assert (rc, out) == (0, "echo: Why is the sky blue?\n")
    assert fake_llm.instances[0].model is None  # the bundled default


def test_run_appends_piped_text_to_the_prompt(fake_llm, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("some notes\n"))
    rc, out, _ = run_cli(capsys, "run", "smol", "Summarize:")
    assert out == "echo: Summarize:\n\nsome notes\n\n"


def test_run_chats_over_a_pipe(fake_llm, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("one\ntwo\n"))
    rc, out, _ = run_cli(capsys, "run", "smol")
    assert (rc, out) == (0, "echo: one\necho: two\n")
    assert len(fake_llm.instances[0].calls[1]) == 3


def test_run_reports_a_missing_model(home, monkeypatch, capsys) -> None:
    from pagedserve.hub.registry import ModelNotFoundError

    def refuse(model=None, engine_config=None, **kwargs):
        raise ModelNotFoundError(f"model {model!r} not found; looked at: ...")

    monkeypatch.setitem(sys.modules, "pagedserve.llm", types.SimpleNamespace(LLM=refuse))
    rc, out, err = run_cli(capsys, "run", "nosuch", "Hi")
    assert (rc, out) == (1, "")
    assert err == "Error: model 'nosuch' not found; looked at: ...\n"


@pytest.mark.parametrize("text, size", [("512", 512), ("64MiB", 64 << 20), ("2G", 2 << 30),
                                        ("1.5 GiB", 3 << 29)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


# ---------------------------------------------------------------------------------------------
# serve resolves through the same registry


def test_serve_takes_the_registry_entry(ollama_models) -> None:
    from pagedserve.cli.serve import resolve_model

    card = resolve_model("smol", None)
    assert (card.name, card.source, card.system) == ("smol:latest", "ollama", SYSTEM)
    assert card.sampling_defaults["temperature"] == 0.3
    assert card.sampling_defaults["stop"] == ["<|im_end|>", "User:"]
    assert card.path == str(ollama_models / "blobs" / Path(card.path).name)


# ---------------------------------------------------------------------------------------------
# run with the real engine: the bundled GGUF served from an Ollama store


@pytest.fixture
def tiny_ollama(home, tiny_llama_gguf) -> str:
    """The tiny random GGUF as an Ollama model (loads in a blink; answers are noise)."""
    import hashlib

    models = home / ".ollama" / "models"
    digest = hashlib.sha256(tiny_llama_gguf.read_bytes()).hexdigest()
    test_registry.add_ollama_model(models, "tiny", [
        (test_registry.MEDIA_MODEL, test_registry.add_blob(models, tiny_llama_gguf, digest)),
        (test_registry.MEDIA_PARAMS, test_registry.add_blob(
            models, json.dumps({"num_predict": 6, "temperature": 0}).encode())),
    ])
    return "tiny"


def _cli_env(home: Path) -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.update(HOME=str(home), OLLAMA_MODELS=str(home / ".ollama" / "models"),
               HF_HOME=str(home / ".cache" / "huggingface"), PYTHONUNBUFFERED="1")
    return env


@pytest.mark.slow
def test_llm_takes_the_ollama_params_and_system(ollama_models) -> None:
    from pagedserve.config import EngineConfig
    from pagedserve.llm import LLM

    # the exact model (as transformers computes it): with the CPU kernels' int8-rounded
    # activations this borderline greedy answer turns from Paris to "creative thinking"
    llm = LLM("smol", engine_config=EngineConfig(kv_cache_memory=64 << 20, dtype="float32",
                                                  native_kernels=False))
    params = llm.default_params()
    assert (params.temperature, params.top_k, params.max_tokens) == (0.3, 20, 48)
    assert params.repetition_penalty == 1.1 and "User:" in params.stop
    assert llm.default_params(temperature=0).temperature == 0  # a request's value wins
    hi = [{"role": "user", "content": "Hi"}]
    assert SYSTEM in llm.tokenizer.decode(llm.render_chat(hi), skip_special_tokens=False)
    own = [{"role": "system", "content": "Be a pirate."}, *hi]  # what run --system sends
    prompt = llm.tokenizer.decode(llm.render_chat(own), skip_special_tokens=False)
    assert "Be a pirate." in prompt and SYSTEM not in prompt

    # the chat the CLI runs, over the real engine: two turns, the second sees the first
    out = io.StringIO()
    session = ChatSession(llm, llm.default_params(temperature=0, max_tokens=12), out=out)
    session.loop(pipe_reader(io.StringIO("What is the capital of France?\nAnd of Italy?\n")),
                 interactive=False)
    first, second = out.getvalue().splitlines()[:2]
    assert "Paris" in first
    assert second.strip()
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2


@pytest.mark.slow
def test_run_a_chat_through_a_pipe(tiny_ollama, home) -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "pagedserve", "run", tiny_ollama, "--kv-cache-memory", "8MiB"],
        input="Hello world\n/clear\nThe cat sat\n/bye\nnever read\n", capture_output=True,
        text=True, env=_cli_env(home), timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 2  # two answers, one line each
    assert "Cleared the conversation." in done.stderr


@pytest.mark.slow
def test_interactive_chat_in_a_terminal(ollama_models, home) -> None:
    """Through a pseudo-terminal: the >>> prompt; Ctrl-C stops an answer, and at the prompt
    only prints a hint; the chat goes on until /bye."""
    import fcntl
    import os
    import pty
    import select
    import signal
    import subprocess
    import termios
    import time

    def own_terminal() -> None:  # the pty becomes the child's terminal: ^C is SIGINT
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        # as a shell starts it: SIGINT neither ignored nor blocked, whatever the test process
        # inherited (an ignored SIGINT survives exec, and Python then leaves it ignored)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pagedserve", "run", "smol", "--max-tokens", "400",
         "--temperature", "0", "--kv-cache-memory", "64MiB"],
        stdin=follower, stdout=follower, stderr=follower, env=_cli_env(home),
        preexec_fn=own_terminal,
    )
    os.close(follower)
    seen = b""

    def read_some(deadline: float) -> None:
        nonlocal seen
        assert time.monotonic() < deadline, f"timed out; the terminal shows {seen[-500:]!r}"
        if select.select([leader], [], [], 0.2)[0]:
            seen += os.read(leader, 4096)

    def expect(text: bytes, after: int = 0, timeout: float = 120) -> int:
        """Read until ``text`` shows up past offset ``after``; where it ends."""
        deadline = time.monotonic() + timeout
        while text not in seen[after:]:
            read_some(deadline)
        return seen.index(text, after) + len(text)

    try:
        at = expect(b">>> ")
        os.write(leader, b"Write a long story about a brave dragon.\n")
        at = expect(b"dragon.\r\n", at)
        deadline = time.monotonic() + 60
        while len(seen) < at + 20:  # the answer is streaming...
            read_some(deadline)
        os.write(leader, b"\x03")  # ...Ctrl-C stops it
        at = expect(b"[interrupted]", at)
        at = expect(b">>> ", at)
        time.sleep(0.5)  # a person's pace: readline reads the terminal by now
        os.write(leader, b"\x03")  # Ctrl-C at the prompt: a hint, not an exit
        at = expect(b"/bye to exit", at)
        at = expect(b">>> ", at)
        os.write(leader, b"/bye\n")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)


@pytest.mark.slow
def test_run_a_hugging_face_cached_model(home, tiny_llama_tokenized_dir, monkeypatch,
                                         capsys) -> None:
    test_registry.add_hf_repo(home, "tiny-org/tiny-chat", tiny_llama_tokenized_dir)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    rc, out, err = run_cli(capsys, "run", "tiny-org/tiny-chat", "Hello world", "--max-tokens",
                           "5", "--temperature", "0", "--kv-cache-memory", "4MiB", "--stats")
    assert rc == 0, err
    assert out.endswith("\n")
    assert "output tokens" in err and "prompt tokens" in err


def _run_cli_process(home: Path, *argv: str, stdin: str = "", timeout: float = 120):
    import subprocess

    return subprocess.run([sys.executable, "-m", "pagedserve", *argv], input=stdin,
                          capture_output=True, text=True, env=_cli_env(home), timeout=timeout)


@pytest.mark.slow
def test_run_varies_between_runs_unless_seeded(tiny_ollama, home) -> None:
    hot = ("run", tiny_ollama, "Hello world", "--temperature", "1", "--max-tokens", "24",
           "--kv-cache-memory", "8MiB")
    # three unseeded runs: the random tiny model can sample an answer that prints nothing, and
    # two such runs agree
    unseeded = [_run_cli_process(home, *hot) for _ in range(3)]
    seeded = [_run_cli_process(home, *hot, "--seed", "7") for _ in range(2)]
    for done in unseeded + seeded:
        assert done.returncode == 0, done.stderr
    assert len({done.stdout for done in unseeded}) > 1, [d.stdout for d in unseeded]
    assert seeded[0].stdout == seeded[1].stdout


@pytest.mark.slow
def test_run_says_when_a_prompt_outgrows_the_context(tiny_ollama, home) -> None:
    """One-shot: a clear error, exit 1, no traceback. Chat: the oldest turns make room (said
    once); a message too long on its own is refused and the chat goes on."""
    long_text = "the cat sat on the mat " * 150  # about 900 tokens; the tiny model has 512
    done = _run_cli_process(home, "run", tiny_ollama, "Summarize:", "--kv-cache-memory", "8MiB",
                            stdin=long_text)
    assert done.returncode == 1 and done.stdout == ""
    assert "Traceback" not in done.stderr
    assert re.search(r"Error: the prompt is \d+ tokens, more than the context of 512 tokens; "
                     r"shorten it: 512 tokens is the model's own context\n", done.stderr)

    turn = "the cat sat on the mat\n"  # about 57 tokens in the fallback ChatML template
    chat = turn * 6 + long_text[:600] + "\n" + turn
    done = _run_cli_process(home, "run", tiny_ollama, "--max-model-len", "200",
                            "--kv-cache-memory", "8MiB", stdin=chat)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.count("\n") == 7, done.stderr  # every turn answered but the long one
    assert done.stderr.count("The conversation outgrew the context of 200 tokens") == 1
    assert re.search(r"Error: the prompt is \d+ tokens, more than the context of 200 tokens; "
                     r"shorten it, or give a longer context: --max-model-len N \(up to 512, the "
                     r"model's own\), or num_ctx in the model's parameters\n", done.stderr)


@pytest.mark.slow
def test_run_on_cuda_without_a_cuda_torch_says_how_to_get_one(tiny_ollama, home) -> None:
    torch = pytest.importorskip("torch")
    if torch.version.cuda is not None:
        pytest.skip("this torch has CUDA")
    done = _run_cli_process(home, "run", tiny_ollama, "Hello world", "--device", "cuda")
    assert (done.returncode, done.stdout) == (1, "")
    assert "Traceback" not in done.stderr
    assert (f"Error: device 'cuda': this torch ({torch.__version__}) was built without CUDA. "
            "Install a CUDA build into this environment, e.g. `pip install --force-reinstall "
            "torch --index-url https://download.pytorch.org/whl/cu128`") in done.stderr


def test_check_device_names_what_is_wrong() -> None:
    from pagedserve.device import DeviceError, check_device

    check_device("cpu")
    with pytest.raises(DeviceError, match="device must be cpu, cuda or cuda:N, got 'gpu'"):
        check_device("gpu")
    with pytest.raises(DeviceError, match="'mps' is not supported"):
        check_device("mps")


def test_run_with_one_word_suggests_naming_the_model_first(home) -> None:
    done = _run_cli_process(home, "run", "Hi")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.startswith("Error: model 'Hi' not found; looked at:")
    assert done.stderr.endswith('If "Hi" was meant as a prompt, name the model first: '
                                'pagedserve run smollm2 "Hi"\n')
    # a name that is clearly a model's gets no such hint
    assert "meant as a prompt" not in _run_cli_process(home, "run", "nosuch:7b").stderr


@pytest.mark.parametrize("flags, error", [
    (["--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
    (["--threads", "0"], "--threads must be a positive integer, got 0"),
])
def test_run_checks_its_flags_before_loading_the_model(fake_llm, monkeypatch, capsys, flags,
                                                       error) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    rc, out, err = run_cli(capsys, "run", "smol", "Why?", *flags)
    assert (rc, out, err) == (2, "", f"Error: {error}\n")
    assert fake_llm.instances == []  # nothing was loaded


def test_run_with_a_bad_flag_exits_at_once(home) -> None:
    done = _run_cli_process(home, "run", "smollm2", "Hi", "--temperature", "-1")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "Error: --temperature must be >= 0, got -1.0\n"  # no load logged


def test_a_prompt_refused_by_its_length_in_characters_says_so() -> None:
    from types import SimpleNamespace

    from pagedserve.cli.run import context_overflow_message
    from pagedserve.engine import PromptTooLongError

    engine = SimpleNamespace(model_config=SimpleNamespace(max_position_embeddings=8192),
                             info=SimpleNamespace(kv_capacity_tokens=100_000))
    message = context_overflow_message(PromptTooLongError(512, 900_000, 41_472),
                                       SimpleNamespace(engine=engine))
    assert message.startswith("the prompt is 900000 characters, more than a context of 512 "
                              "tokens can hold; shorten it, or give a longer context")
