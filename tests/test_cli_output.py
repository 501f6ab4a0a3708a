"""What the ``deft`` executable prints: listings that never cut a name (``--wide``, piped, ``--json``),
``--help`` in one style with nothing cut at 80 columns, ``--version``, and the connection's messages."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import typer.main
from conftest import DEFT_EXECUTABLE, ROOT
from deft_cli.app import app
from deft_cli.connection import with_default_port

from deft_runtime import __version__
from deft_runtime.adapter import AdapterKind, Decomposition
from deft_runtime.formats import save_adapter
from deft_runtime.testing import random_adapter

LONG = "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"
LAYERS = {LONG: (64, 64), "mid_block.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64)}


def deft(*args: str, columns: int = 80, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "COLUMNS": str(columns), **env}
    environment.pop("DEFT_SERVER", None)
    return subprocess.run(
        [str(DEFT_EXECUTABLE), *args], capture_output=True, text=True, timeout=300, env=environment
    )


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory) -> Path:
    adapter = random_adapter(AdapterKind.DEFT, LAYERS, rank=2, decomposition=Decomposition.RELU)
    return save_adapter(adapter, tmp_path_factory.mktemp("a") / "long-names.deft.safetensors")


# ---------------------------------------------------------------------------------------- listings


def test_inspect_prints_whole_layer_names_when_piped_or_wide_and_json(adapter_file):
    piped = deft("inspect", str(adapter_file))
    assert piped.returncode == 0, piped.stderr
    assert all(name in piped.stdout for name in LAYERS), piped.stdout
    wide = subprocess.run(  # a terminal 60 columns wide, with --wide: still whole names
        ["script", "-qec", f"{DEFT_EXECUTABLE} inspect --wide {adapter_file}", "/dev/null"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "60"},
    )
    if wide.returncode == 0:  # `script` (util-linux) gives it a terminal; absent elsewhere
        assert LONG in re.sub(r"\x1b\[[0-9;]*m", "", wide.stdout), wide.stdout
    data = json.loads(deft("inspect", "--json", str(adapter_file)).stdout)
    assert set(data["layers"]) == set(LAYERS)
    assert data["layers"][LONG] == {"rank": 2, "scale": 1.0, "tensors": {"P": [64, 2], "R": [2, 64]}}


@pytest.fixture(scope="module")
def server(server_factory, adapter_file):
    server = server_factory.start()
    assert deft("adapters", "register", "long", str(adapter_file), "--server", server.address).returncode == 0
    return server


def test_adapters_list_and_show_print_whole_values_and_json(server):
    listed = deft("adapters", "list", "--server", server.address)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if " long " in line)
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", row), listed.stdout  # the date on the row, unwrapped
    infos = json.loads(deft("adapters", "list", "--json", "--server", server.address).stdout)
    assert [(i["name"], i["ranks"], i["state"], i["owner"]) for i in infos] == [("long", [2], "ready", "")]
    shown = deft("adapters", "show", "long", "--server", server.address)
    assert shown.returncode == 0, shown.stderr
    lines = dict(line.split(": ", 1) for line in shown.stdout.splitlines())
    assert lines["ranks"] == "2" and lines["owner"] == "public" and "state_reason" not in lines
    assert lines["sha256"] == infos[0]["sha256"] and len(lines["sha256"]) == 64
    one = json.loads(deft("adapters", "show", "long", "--json", "--server", server.address).stdout)
    assert one == infos[0]


def test_keys_list_json_never_shows_secrets(tmp_path):
    pytest.importorskip("pydantic_settings")
    created = deft("keys", "create", "acme", "--max-adapters", "3", "--data-dir", str(tmp_path))
    assert created.returncode == 0, created.stderr
    keys = json.loads(deft("keys", "list", "--json", "--data-dir", str(tmp_path)).stdout)
    assert [(k["tenant"], k["admin"], k["limits"]["max_adapters"], k["revoked_at"]) for k in keys] == [
        ("acme", False, 3, None)
    ]
    assert not {"salt", "digest"} & set(keys[0]) and created.stdout.split()[-1] not in json.dumps(keys)


def test_the_readme_explains_every_adapter_state():
    from deft_client.proto import adapters_pb2

    states = {
        n.removeprefix("ADAPTER_STATE_").lower()
        for n in (v.name for v in adapters_pb2.AdapterState.DESCRIPTOR.values)
        if not n.endswith("UNSPECIFIED")
    }
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("**Adapter states.**") :].split("\n\n", 1)[0]
    assert states == set(re.findall(r"`(\w+)`:", section)), section


# ------------------------------------------------------------------------------------------ --help


def _commands(command, path=()):
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*path, name))
    else:
        yield path, command


def test_every_help_is_plain_uncut_and_in_one_style_at_80_columns():
    for path, command in _commands(typer.main.get_command(app)):
        out = deft(*path, "--help")
        assert out.returncode == 0, (path, out.stderr)
        text = out.stdout
        assert "…" not in text, (path, text)
        if path == ("serve",):  # generated by deft_server.cli, with its own [DEFT_VAR; default] style
            assert not re.search(r"<\w+>|\{\w+\}", text), text
            continue
        flags = [opt for p in command.params for opt in getattr(p, "opts", []) if opt.startswith("--")]
        assert all(flag in text for flag in flags), (path, text)
        for odd in ("<bool>", "<str>", "<int>", "<path>", "<list", "{", "(default"):
            assert odd not in text, (path, odd, text)


def test_defaults_are_shown_and_model_defaults_to_what_serve_serves():
    pytest.importorskip("pydantic_settings")
    from deft_server.config import ServerSettings

    text = " ".join(deft("train", "--help", columns=200).stdout.split())
    for shown in (
        "training image size [default: the base's, 1024 for SDXL]",
        "[default: qr; none for lora]",
        "injection scale s = alpha / rank [default: s = 1]",
        "replace an existing --out (and a stale run directory)",
        "cpu | cuda | cuda:N [default: auto]",
    ):
        assert shown in text, shown
    served = ServerSettings.model_fields["model"].default
    for command in ("train", "export-onnx"):
        assert f"[default: {served}]" in " ".join(deft(command, "--help", columns=200).stdout.split())


def test_version_flag():
    out = deft("--version")
    assert out.returncode == 0 and out.stdout.strip() == __version__


# ------------------------------------------------------------------------------------ connections


def test_a_host_without_port_means_deft_serves_port():
    assert with_default_port("localhost") == "localhost:50051"
    assert with_default_port("10.0.0.5") == "10.0.0.5:50051"
    assert with_default_port("[::1]") == "[::1]:50051"
    for kept in ("localhost:7000", "[::1]:7000", "unix:/tmp/deft.sock", "dns:///deft.internal:443"):
        assert with_default_port(kept) == kept


def test_refused_connection_says_how_to_start_a_server():
    out = deft("adapters", "list", "--server", "127.0.0.1:1")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "start a server with `deft serve`" in " ".join(out.stderr.split()), out.stderr
    bare = deft("adapters", "list", "--server", "localhost")
    assert ":443" not in bare.stderr
    assert bare.returncode == 0 or "localhost:50051" in bare.stderr, bare.stderr  # 0: a server runs there


def test_a_file_error_is_a_message_not_a_traceback(adapter_file, tmp_path):
    (tmp_path / "file").write_text("x")
    out = deft("convert", str(adapter_file), str(tmp_path / "file" / "out.deft.safetensors"))
    assert out.returncode == 1 and out.stderr.startswith("error: ") and "Traceback" not in out.stderr, (
        out.stderr
    )
