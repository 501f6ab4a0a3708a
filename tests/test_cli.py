"""The `deft` command line on local adapter files."""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Annotated

import pytest
import typer
from deft_cli.app import app
from typer.testing import CliRunner

from deft_runtime.adapter import AdapterKind, Decomposition
from deft_runtime.formats import load_adapter, save_adapter
from deft_runtime.testing import random_adapter

runner = CliRunner()
SHAPES = {"attn.to_q": (8, 8), "attn.to_v": (8, 6)}


def test_inspect_prints_kind_ranks_and_layers(tmp_path):
    path = save_adapter(
        random_adapter(AdapterKind.DEFT, SHAPES, rank=2, decomposition=Decomposition.QR),
        tmp_path / "a.deft.safetensors",
    )
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "deft (qr) adapter on 2 layers, ranks [2]" in result.output
    assert "attn.to_v" in result.output


def test_convert_to_peft_and_back(tmp_path):
    adapter = random_adapter(AdapterKind.PARA, SHAPES, rank=2, decomposition=Decomposition.QR)
    src = save_adapter(adapter, tmp_path / "a.deft.safetensors")
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "peft"), "--to", "peft"])
    assert result.exit_code == 0, result.output
    back = load_adapter(tmp_path / "peft")
    assert back.kind is AdapterKind.PARA
    for name, layer in adapter.layers.items():
        assert back.layers[name].P.equal(layer.P)


def test_errors_exit_non_zero_with_the_reason(tmp_path):
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"\x80\x04.")
    result = runner.invoke(app, ["inspect", str(bad)])
    assert result.exit_code == 1
    assert "never unpickles" in result.output
    result = runner.invoke(app, ["convert", str(bad), str(tmp_path / "y"), "--to", "onnx"])
    assert result.exit_code == 1 and "--to must be 'deft', 'peft' or 'diffusers'" in result.output


def test_console_script_is_installed():
    exe = str(Path(sys.executable).parent / "deft")  # the venv's console script; bin/ may not be on PATH
    out = subprocess.run([exe, "version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == __import__("deft_runtime").__version__


# ------------------------------------------------------------------ one declaration per setting


def _click_options(command) -> dict[str, object]:
    import typer.main

    click_command = typer.main.get_command(command) if not hasattr(command, "params") else command
    return {
        opt: p
        for p in click_command.params
        for opt in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]
    }


def test_serve_has_one_flag_per_setting_with_its_variable_and_default():
    pytest.importorskip("pydantic_settings")
    from deft_server.cli import serve_app
    from deft_server.config import ServerSettings

    options = _click_options(serve_app())
    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        assert flag in options, f"ServerSettings.{name} has no {flag}"
        help_text = options[flag].help or ""
        assert f"DEFT_{name.upper()}" in help_text, help_text
        assert field.description and field.description in help_text, f"ServerSettings.{name}: no description"
    assert "[DEFT_ADAPTER_MEMORY; 512MiB]" in options["--adapter-memory"].help
    assert "[DEFT_PORT; 50051]" in options["--port"].help
    assert set(options) - {"--help"} == {"--" + n.replace("_", "-") for n in ServerSettings.model_fields} | {
        f"--no-{n.replace('_', '-')}" for n, f in ServerSettings.model_fields.items() if f.annotation is bool
    }


def test_serve_flags_reach_the_settings_and_only_the_given_ones(monkeypatch):
    pytest.importorskip("pydantic_settings")
    import deft_server.app
    from deft_server.config import ServerSettings

    seen: list[dict] = []
    monkeypatch.setattr(deft_server.app, "main", lambda overrides: seen.append(overrides) or 0)
    args = ["serve", "--max-queue", "7", "--adapter-memory", "1GiB", "--dtype", "float16", "--token", "t"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen == [{"max_queue": 7, "adapter_memory": "1GiB", "dtype": "float16", "token": "t"}]
    settings = ServerSettings(**seen[0])
    assert (settings.max_queue, int(settings.adapter_memory), settings.dtype) == (7, 1 << 30, "float16")
    refused = runner.invoke(app, ["serve", "--dtype", "float8"])
    assert refused.exit_code == 2 and "float8" in refused.output and seen == seen[:1]


def test_fair_planning_flags_reach_the_engine_config(monkeypatch):
    pytest.importorskip("pydantic_settings")
    import deft_server.app
    from deft_server.config import ServerSettings

    seen: list[dict] = []
    monkeypatch.setattr(deft_server.app, "main", lambda overrides: seen.append(overrides) or 0)
    result = runner.invoke(
        app,
        [
            "serve",
            "--mixed-batch-rows",
            "2",
            "--idle-credit-row-steps",
            "40",
            "--batch-order",
            "arrival",
            "--newcomer-slots",
            "3",
            "--compile",
            "--compile-buckets",
        ],
    )
    assert result.exit_code == 0, result.output
    config = ServerSettings(**seen[0]).engine_config()
    assert (config.mixed_batch_rows, config.idle_credit_row_steps, config.newcomer_slots) == (2, 40.0, 3)
    assert (config.batch_order, config.compile, config.compile_buckets) == ("arrival", True, True)
    defaults = ServerSettings().engine_config()
    assert (defaults.batch_order, defaults.compile) == ("longest-wait", False)
    refused = runner.invoke(app, ["serve", "--batch-order", "lifo"])
    assert refused.exit_code != 0 and "fewest-remaining" in refused.output, refused.output
    assert ServerSettings().engine_config().mixed_batch_rows is None  # default: --max-batch-rows
    for field, value in (
        ("mixed_batch_rows", 0),
        ("idle_credit_row_steps", -1),
        ("idle_credit_row_steps", "inf"),
        ("newcomer_slots", -1),
    ):
        with pytest.raises(ValueError, match=field):  # pydantic's ValidationError, at the server's start
            ServerSettings(**{field: value})


def test_a_new_settings_field_becomes_a_flag_of_its_type():
    """The generator on fields the server does not have yet: a bool flag pair, a repeatable list, a
    Literal's choices, a size in units."""
    pytest.importorskip("pydantic_settings")
    import deft_server.cli
    import typer
    from deft_server.cli import serve_parameters
    from pydantic import ByteSize, Field
    from pydantic_settings import BaseSettings, SettingsConfigDict

    class Future(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="DEFT_")
        log_prompts: bool = Field(False, description="log prompt text")
        tenants: list[str] = Field(default_factory=list, description="tenant ids")
        mode: typing.Literal["a", "b"] = Field("a", description="a mode")
        budget: ByteSize = Field(ByteSize(3 << 20), description="a size")

    original = deft_server.cli.ServerSettings
    deft_server.cli.ServerSettings = Future  # type: ignore[misc]
    try:
        parameters = serve_parameters()
    finally:
        deft_server.cli.ServerSettings = original  # type: ignore[misc]
    got: list[dict] = []

    def command(**flags):
        got.append({k: v for k, v in flags.items() if v is not None})

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    one = typer.Typer()
    one.command()(command)
    ok = runner.invoke(
        one, ["--log-prompts", "--tenants", "x", "--tenants", "y", "--mode", "b", "--budget", "2MiB"]
    )
    assert ok.exit_code == 0, ok.output
    assert got == [{"log_prompts": True, "tenants": ["x", "y"], "mode": "b", "budget": "2MiB"}]
    assert runner.invoke(one, ["--no-log-prompts"]).exit_code == 0 and got[-1]["log_prompts"] is False
    assert runner.invoke(one, ["--mode", "c"]).exit_code == 2
    assert "[DEFT_BUDGET; 3MiB]" in (_click_options(one)["--budget"].help or "")


CONNECTED = [
    ["adapters", "register"],
    ["adapters", "list"],
    ["adapters", "show"],
    ["adapters", "delete"],
    ["generate"],
    ["train"],
]


def test_every_command_that_talks_to_a_server_takes_the_same_connection_options():
    import typer.main

    root = typer.main.get_command(app)
    for path in CONNECTED:
        command = root
        for name in path:
            command = command.commands[name]  # type: ignore[attr-defined]
        options = _click_options(command)
        for flag, env in (
            ("--server", "DEFT_SERVER"),
            ("--token", "DEFT_TOKEN"),
            ("--tls-ca", "DEFT_TLS_CA"),
        ):
            assert flag in options and options[flag].envvar == env, (path, flag)


def test_serve_help_through_the_real_executables_lists_the_generated_flags():
    pytest.importorskip("pydantic_settings")
    exe = str(Path(sys.executable).parent / "deft")
    for command, usage in (
        ([exe, "serve", "--help"], "deft serve"),
        ([sys.executable, "-m", "deft_server", "--help"], "python -m deft_server"),
    ):
        out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
        assert out.returncode == 0, out.stderr
        text = " ".join(out.stdout.split())
        assert f"Usage: {usage}" in text and "--max-queue" in text and "[DEFT_MAX_QUEUE; 256]" in text, text


@dataclasses.dataclass(frozen=True)
class Size:
    width: Annotated[int, typer.Option(help="w")] = 8
    height: Annotated[int, typer.Option(help="h")] = 4


def test_option_groups_arrive_as_typed_objects_and_names_cannot_repeat():
    from deft_cli.options import with_options

    got = []

    @with_options(size=Size)
    def command(name: Annotated[str, typer.Argument()], size: Size) -> None:
        got.append((name, size))

    one = typer.Typer()
    one.command()(command)
    result = runner.invoke(one, ["x", "--height", "5"])
    assert result.exit_code == 0, result.output
    assert got == [("x", Size(width=8, height=5))]
    with pytest.raises(TypeError, match="repeat a name"):

        @with_options(a=Size, b=Size)
        def twice(a: Size, b: Size) -> None: ...


def test_export_flag_defaults_are_the_exporters():
    """``deft export-onnx`` repeats two constants so that ``deft --help`` needs no torch import."""
    from deft_cli.export import MIN_OPSET, ExportFlags

    from deft_runtime.export import onnx

    assert MIN_OPSET == onnx.MIN_OPSET == onnx.DEFAULT_OPSET
    defaults = {f.name: f.default for f in dataclasses.fields(ExportFlags)}
    assert (defaults["opset"], defaults["tolerance"]) == (onnx.DEFAULT_OPSET, onnx.DEFAULT_TOLERANCE)
