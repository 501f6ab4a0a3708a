"""Packaging: import names, optional extras really optional, every subpackage installed."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ["grpc", "peft", "triton", "prometheus_client", "pydantic_settings", "accelerate"]
OPTIONAL += ["fastapi", "uvicorn"]  # the http extra


def test_core_imports_without_optional_extras():
    """`import deft_runtime` (and the adapter core) must not touch server/trainer/Triton dependencies."""
    blocker = "; ".join(f"sys.modules[{name!r}] = None" for name in OPTIONAL)
    code = (
        f"import sys; {blocker}; import deft_runtime, deft_runtime.formats, deft_runtime.compile, "
        "deft_runtime.models, deft_cli.app; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT / "tests")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_every_python_package_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    top_level = {name: ROOT / name for name in ("deft_files", "deft_runtime")}
    dirs = {**top_level, **{k: ROOT / v for k, v in config["package-dir"].items()}}
    found = set()
    for top, directory in dirs.items():
        for init in directory.rglob("__init__.py"):
            rel = init.parent.relative_to(directory).parts
            found.add(".".join((top, *rel)))
    assert found == listed, f"pyproject packages differ: missing {found - listed}, stale {listed - found}"


def test_five_import_names_resolve_to_this_checkout():
    import deft_cli
    import deft_client
    import deft_server

    import deft_files
    import deft_runtime

    assert Path(deft_files.__file__).is_relative_to(ROOT / "deft_files")
    assert Path(deft_runtime.__file__).is_relative_to(ROOT / "deft_runtime")
    assert Path(deft_server.__file__).is_relative_to(ROOT / "server")
    assert Path(deft_client.__file__).is_relative_to(ROOT / "clients" / "python")
    assert Path(deft_cli.__file__).is_relative_to(ROOT / "cli")


def test_the_deft_script_is_the_composition_layer():
    """The console script runs the composition layer, ``deft_cli``."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert config == {"deft": "deft_cli.app:app"}


def test_serve_without_the_server_extra_says_what_to_install():
    """``deft serve`` loads the server only when it runs; without the extra it names the extra."""
    blocker = "; ".join(f"sys.modules[{name!r}] = None" for name in OPTIONAL)
    code = f"import sys; {blocker}; from deft_cli.app import app; app(['serve'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT / "tests")
    assert out.returncode == 1, out.stderr
    assert "deft serve needs the server extra: pip install 'deft[server]'" in " ".join(out.stderr.split())
