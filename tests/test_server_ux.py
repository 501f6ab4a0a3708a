"""What a newcomer sees of ``deft serve``, against real server processes: a taken port is one message
naming the flag to change (no traceback, no gRPC debug hint); the log has no library noise, one access
line per request and no prompt text unless ``--log-prompts``; a prompt longer than the text encoder's 77
tokens comes back with a warning (gRPC result, stream and HTTP)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from deft_client import DeftClient, DeftError, Result
from deft_server.access_log import AccessEntry

#: a prompt of ~300 tokens for the tiny CLIP tokenizers (limit 77); "zebra" marks its text in the logs
LONG_PROMPT = "a zebra crossing " * 40
ACCESS_LINE = re.compile(r"deft_server\.access: generate (.*)$", re.MULTILINE)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something listens on (as another server would)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.mark.parametrize("flag", ["--port", "--metrics-port", "--http-port"])
def test_a_taken_port_is_one_message_naming_its_flag(server_factory, taken_port, flag):
    server = server_factory.start(flag, str(taken_port), wait=False, via_cli=True)  # the real `deft serve`
    assert server.wait(120) == 2
    log = server.log()
    assert f"port {taken_port} is in use" in log and f"pass {flag} PORT" in log, log
    for noise in ("Traceback", "Event loop is closed", "never awaited", "GRPC_VERBOSITY", "Failed to bind"):
        assert noise not in log, log
    if flag == "--port":
        assert "(or --port 0" not in log  # the gRPC port cannot be turned off
    else:
        assert f"(or {flag} 0 to turn it off)" in log


def _access_lines(server, label: str) -> list[dict[str, str]]:
    """The access-log lines of requests labelled ``label``, as key -> raw value."""
    lines = [m.group(1) for m in ACCESS_LINE.finditer(server.log())]
    parsed = [dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)) for line in lines]
    return [p for p in parsed if p.get("label") == label]


def _wait_access(server, label: str, timeout: float = 30) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while not (lines := _access_lines(server, label)):
        assert time.monotonic() < deadline, f"no access line for {label}:\n{server.log()}"
        time.sleep(0.05)
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory.start()


def test_a_long_prompt_is_truncated_with_a_warning_and_not_logged(server):
    with DeftClient(server.address, timeout=300) as c:
        result = c.generate_result(LONG_PROMPT, steps=2, seed=1, request_id="long-1")
        short = c.generate_result("a zebra", steps=2, seed=1, request_id="short-1")
        streamed = [e for e in c.generate_stream(LONG_PROMPT, steps=2, seed=1) if isinstance(e, Result)]
    (warning,) = result.warnings
    assert "prompt truncated" in warning and "77" in warning and "shorten" in warning
    assert streamed[-1].warnings == result.warnings
    assert short.warnings == ()
    line = _wait_access(server, "long-1")
    assert line["warnings"] == "1" and _wait_access(server, "short-1")["warnings"] == "0"
    log = server.log()
    assert "zebra" not in log  # neither diffusers' truncation line nor the access log quote prompts
    assert "truncated to the text encoder's 77 tokens (text not logged)" in log


def test_one_access_line_per_request_with_its_fields(server):
    with DeftClient(server.address, timeout=300) as c:
        image = c.generate("a zebra", steps=3, seed=2, request_id="fields-1", num_images=2)[0]
        with pytest.raises(DeftError):
            c.generate("a zebra", steps=100000, request_id="refused-1")
    line = _wait_access(server, "fields-1")
    assert line["status"] == "ok" and line["steps"] == "3" and line["images"] == "2"
    assert line["size"] == f"{image.width}x{image.height}" and line["adapters"] == "0"
    assert len(line["id"]) == 32 and float(line["latency_s"]) > 0
    assert "tenant" not in line and "prompt" not in line  # no tenants on this server; no prompts logged
    refused = _wait_access(server, "refused-1")
    assert refused["status"] == "invalid_argument" and "id" not in refused


def test_no_library_noise_in_the_log(server):
    log = server.log()
    for noise in ("torchvision", "Loading pipeline components", "Loading weights", "it/s]"):
        assert noise not in log, log


def test_loading_a_model_outside_the_server_prints_nothing(server, tiny_model_cache):
    """The path of the CLI's local commands (train, export-onnx): load_pipeline in a fresh process."""
    code = f"from deft_runtime.models import load_pipeline; load_pipeline('tiny-sdxl', cache_dir={str(tiny_model_cache)!r})"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""


def test_http_result_carries_the_warning(server):
    body = json.dumps({"prompt": LONG_PROMPT, "steps": 2, "seed": 3}).encode()
    request = urllib.request.Request(
        server.http_url + "/v1/images/generations", body, {"Content-Type": "application/json"}
    )
    reply = json.load(urllib.request.urlopen(request, timeout=300))
    (warning,) = reply["warnings"]
    assert "prompt truncated" in warning


def test_log_prompts_opts_in(server_factory):
    logged = server_factory.start("--log-prompts")
    with DeftClient(logged.address, timeout=300) as c:
        c.generate("a quagga", steps=1, request_id="opt-in", negative_prompt="blurry")
    line = _wait_access(logged, "opt-in")
    assert json.loads(line["prompt"]) == "a quagga" and json.loads(line["negative_prompt"]) == "blurry"


def test_access_line_quotes_what_could_be_misread():
    entry = AccessEntry(
        tenant="acme", server_id="ab12", label="my job=7", steps=4, width=8, height=8, images=1
    )
    line = entry.line("ok", 0.12345, log_prompts=False)
    assert line.startswith('generate id=ab12 label="my job=7" tenant=acme status=ok steps=4 size=8x8')
    assert line.endswith("latency_s=0.123 warnings=0")
    entry.prompt, entry.negative_prompt = "ok", ""  # prompts are free text: always JSON strings
    assert entry.line("ok", 0.1, log_prompts=True).endswith('warnings=0 prompt="ok" negative_prompt=""')


def _long_request(address: str, outcome: list[object], started: threading.Event, stream: bool) -> None:
    """One request far longer than the grace period; ``outcome`` gets its error (or result)."""
    with DeftClient(address, timeout=600) as c:
        try:
            if stream:
                for event in c.generate_stream("a zebra", steps=5000, seed=4):
                    started.set()
                    outcome.append(event)
            else:
                outcome.append(c.generate_result("a zebra", steps=5000, seed=5))
        except DeftError as e:
            outcome.append(e)


def test_grace_period_running_out_says_so(server_factory):
    drained = server_factory.start("--grace-period", "1", "--max-steps", "5000")
    outcomes: list[list[object]] = [[], []]
    started = threading.Event()
    threads = [
        threading.Thread(target=_long_request, args=(drained.address, outcomes[i], started, i == 0))
        for i in range(2)
    ]
    for thread in threads:
        thread.start()
    assert started.wait(120)
    time.sleep(0.5)  # the unary request is admitted too
    drained.send(signal.SIGTERM)
    for thread in threads:
        thread.join(120)
    assert drained.wait(60) == 0
    for outcome in outcomes:
        error = outcome[-1]
        assert isinstance(error, DeftError), outcome[-1:]
        assert error.code is grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in error.message and "grace period (1s, --grace-period)" in error.message
        assert "Cancelling all calls" not in error.message
    log = drained.log()
    assert "grace period of 1s over: failing the 2 requests still running" in log
    for noise in ("Exception not handled", "CancelledError", "Traceback"):
        assert noise not in log, log
    assert "stopped" in log
