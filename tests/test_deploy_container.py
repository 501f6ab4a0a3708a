"""The container: the Dockerfile's structure (no Docker engine runs here, so it is parsed, not built),
the build context left by .dockerignore, and the health-check module the image runs, for real.

The Dockerfile is read by a small parser of its instructions (line continuations, comments, exec and
shell forms, ``ARG`` defaults substituted into ``FROM``); .dockerignore by a matcher that follows
Docker's rules (patterns anchored at the context root, ``**`` for any number of folders, ``!`` to
re-include, the last matching line wins, an excluded folder excludes everything under it).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
HEALTHCHECK = [sys.executable, "-m", "deft_server.healthcheck"]


# ------------------------------------------------------------------------------------ Dockerfile parser


@dataclass
class Instruction:
    keyword: str
    value: str  # the arguments, continuation lines joined

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON array of ``CMD``/``ENTRYPOINT``/``HEALTHCHECK CMD`` style arguments, if used."""
        text = self.value.strip()
        if not text.startswith("["):
            return None
        parsed = json.loads(text)
        assert isinstance(parsed, list) and all(isinstance(x, str) for x in parsed), text
        return parsed

    def flags_and_args(self) -> tuple[dict[str, str], list[str]]:
        """``--flag=value`` options first (as in COPY/RUN/HEALTHCHECK), then the remaining words."""
        words = self.value.split()
        flags: dict[str, str] = {}
        while words and words[0].startswith("--"):
            name, _, value = words.pop(0)[2:].partition("=")
            flags[name] = value
        return flags, words


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def index(self, keyword: str) -> int:
        indexes = [n for n, i in enumerate(self.instructions) if i.keyword == keyword]
        assert indexes, f"stage {self.name or self.base} has no {keyword}"
        return indexes[-1]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', instruction.value):
                values[key] = value.strip('"')
        return values


def substitute(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), text)


def logical_lines(text: str) -> list[str]:
    """Instructions one per line: comments and blank lines dropped, ``\\`` continuations joined."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are ignored
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"
    return lines


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(the global ARG defaults, the stages in order)."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(path.read_text()):
        keyword, _, value = line.partition(" ")
        keyword, value = keyword.upper(), value.strip()
        if keyword == "FROM":
            words = substitute(value, global_args).split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            assert len(words) in (1, 3), f"unexpected FROM: {line}"
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before the first FROM, found {keyword}"
            name, _, default = value.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, value))
    return global_args, stages


def stage_args(stage: Stage, global_args: dict[str, str]) -> dict[str, str]:
    """ARG defaults visible inside ``stage`` (its own ARGs, and re-declared global ones)."""
    values: dict[str, str] = {}
    for instruction in stage.all("ARG"):
        name, eq, default = instruction.value.partition("=")
        values[name] = default if eq else global_args.get(name, "")
    return values


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    assert DOCKERFILE.is_file(), "no Dockerfile at the repository root"
    return parse_dockerfile(DOCKERFILE)


@pytest.fixture(scope="module")
def runtime(dockerfile) -> Stage:
    return dockerfile[1][-1]


# --------------------------------------------------------------------------------- .dockerignore matcher


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax (Go filepath.Match plus ``**``) as a regex over '/'-separated paths."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):  # "**/" : zero or more folders
                out += "(?:.*/)?"
                i += 1
            else:
                out += ".*"
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.index("]", i)
            out += "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]"
            i = end
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def load_dockerignore(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = line[1:].strip() if include else line
        pattern = re.sub(r"/+", "/", pattern).strip("/")
        rules.append((include, _pattern_regex(pattern)))
    return rules


def excluded(rules: list[tuple[bool, re.Pattern[str]]], relpath: str) -> bool:
    """Whether ``relpath`` (relative to the context root) is left out of the build context."""
    parts = relpath.strip("/").split("/")
    result = False
    for include, regex in rules:
        # a pattern matching a parent folder covers everything inside it
        if any(regex.match("/".join(parts[: n + 1])) for n in range(len(parts))):
            result = not include
    return result


@pytest.fixture(scope="module")
def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    assert DOCKERIGNORE.is_file(), "no .dockerignore at the repository root"
    return load_dockerignore(DOCKERIGNORE)


def test_dockerignore_matcher_follows_docker_rules(tmp_path) -> None:
    ignore = tmp_path / ".dockerignore"
    ignore.write_text("# comment\n/build\n**/__pycache__\n*.md\n!README.md\ndocs/*/tmp\n")
    rules = load_dockerignore(ignore)
    assert excluded(rules, "build/lib/x.py") and excluded(rules, "a/b/__pycache__/m.pyc")
    assert excluded(rules, "__pycache__/m.pyc") and excluded(rules, "CHANGES.md")
    assert not excluded(rules, "README.md") and not excluded(rules, "docs/CHANGES.md")
    assert excluded(rules, "docs/en/tmp/x") and not excluded(rules, "docs/tmp/x")
    assert not excluded(rules, "src/build.py")


# ---------------------------------------------------------------------------------------- structure


def test_multi_stage_on_a_cuda_runtime_base(dockerfile) -> None:
    _, stages = dockerfile
    assert len(stages) >= 2, "expected a build stage and a runtime stage"
    runtime = stages[-1]
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", runtime.base), runtime.base
    build = next((s for s in stages[:-1] if s.name), None)
    assert build is not None, "the build stage needs a name for COPY --from"
    # the venv is copied across stages: it only works with the same python at the same path
    assert build.base == runtime.base, "build and runtime stages must share the base image (same python)"
    copies = [i.flags_and_args() for i in runtime.all("COPY")]
    venvs = [args for flags, args in copies if flags.get("from") == build.name]
    assert venvs, "the runtime stage copies nothing from the build stage"
    venv_dir = venvs[0][0]
    assert f"{venv_dir}/bin" in runtime.env().get("PATH", ""), "the venv's bin/ must be on PATH"


def test_torch_pin_matches_the_makefile(dockerfile) -> None:
    global_args, stages = dockerfile
    build = stages[0]
    spec = stage_args(build, global_args).get("TORCH_SPEC", "")
    makefile = (ROOT / "Makefile").read_text()
    pinned = re.search(r"^TORCH_SPEC\s*\?=\s*(\S+)", makefile, re.M)
    assert pinned, "the Makefile no longer pins TORCH_SPEC"
    assert spec == pinned[1], f"Dockerfile torch {spec!r} != Makefile {pinned[1]!r}"
    assert any("${TORCH_SPEC}" in i.value for i in build.all("RUN")), "TORCH_SPEC is never installed"


def test_runs_deft_serve_as_a_non_root_user(runtime) -> None:
    users = runtime.all("USER")
    assert users, "the runtime stage never sets USER (it would run as root)"
    user = users[-1].value.split(":")[0]
    assert user not in ("root", "0"), f"USER {user} is root"
    assert runtime.index("USER") < runtime.index("ENTRYPOINT"), "USER must come before ENTRYPOINT"
    entrypoint = runtime.all("ENTRYPOINT")[-1].exec_form
    assert entrypoint == ["deft", "serve"], f"ENTRYPOINT {entrypoint}"
    # the user is created in the image with a fixed uid (Kubernetes runAsUser / fsGroup use it)
    assert any(re.search(rf"useradd .*\b{user}\b", i.value) for i in runtime.all("RUN"))
    assert runtime.all("STOPSIGNAL")[-1].value == "SIGTERM"


def test_listens_on_all_interfaces_with_data_volume_and_ports(runtime) -> None:
    env = runtime.env()
    assert env.get("DEFT_HOST") == "0.0.0.0", "the server must listen beyond loopback in a container"
    assert env.get("DEFT_DATA_DIR") == "/data"
    volumes = " ".join(i.value for i in runtime.all("VOLUME"))
    assert "/data" in volumes
    exposed = {p.split("/")[0] for i in runtime.all("EXPOSE") for p in i.value.split()}
    assert {"50051", "9400"} <= exposed, exposed
    # exposed ports are the ones the server actually uses (defaults or the DEFT_* values set here)
    assert env.get("DEFT_PORT", "50051") in exposed and env.get("DEFT_METRICS_PORT", "9400") in exposed


def test_healthcheck_runs_the_grpc_health_module(runtime) -> None:
    checks = runtime.all("HEALTHCHECK")
    assert checks, "no HEALTHCHECK"
    flags, words = checks[-1].flags_and_args()
    assert words and words[0] == "CMD", checks[-1].value
    command = Instruction("CMD", checks[-1].value.split("CMD", 1)[1]).exec_form
    assert command is not None, "use the exec form (no shell needed in the image)"
    assert command[command.index("-m") + 1] == "deft_server.healthcheck", command
    assert (ROOT / "server" / "healthcheck.py").is_file()
    # the model loads before the server is healthy: the start period must allow for it
    start = flags.get("start-period", "0s")
    assert start.endswith("s") and float(start[:-1]) >= 120, f"--start-period {start} is too short"


def test_copy_sources_exist_and_are_in_the_context(runtime, dockerfile, ignore_rules) -> None:
    _, stages = dockerfile
    sources: list[str] = []
    for stage in stages:
        for instruction in stage.all("COPY") + stage.all("ADD"):
            flags, args = instruction.flags_and_args()
            if "from" in flags:
                continue
            sources += args[:-1]
    assert sources, "nothing is copied from the build context"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not excluded(ignore_rules, source), f"COPY {source}: excluded by .dockerignore"
        if (ROOT / source).is_dir():
            files = [p for p in (ROOT / source).rglob("*.py") if "__pycache__" not in p.parts]
            assert files and not any(excluded(ignore_rules, str(p.relative_to(ROOT))) for p in files)
    # every package the project installs must be copied in (a new package would break the image)
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dirs = setuptools.get("package-dir", {})
    for package in setuptools["packages"]:
        top = package.split(".")[0]
        folder = package_dirs.get(top, top)
        assert any(folder == s.rstrip("/") or folder.startswith(s.rstrip("/") + "/") for s in sources), (
            f"package {package} ({folder}/) is not copied into the build stage"
        )
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("readme")
    assert readme is None or readme in sources, "pyproject's readme must be copied for the build"


def test_dockerignore_keeps_local_state_out(ignore_rules) -> None:
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "server/__pycache__/app.cpython-311.pyc",
        ".pytest_cache/v/cache/nodeids",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/CACHEDIR.TAG",
        "deft.egg-info/PKG-INFO",
        "benchmarks/results/run.json",
        "benchmarks/out/x.png",
        "tests/conftest.py",
        "build/lib/x.py",
    ):
        assert excluded(ignore_rules, path), f".dockerignore lets {path} into the build context"
    for path in ("pyproject.toml", "README.md", "server/app.py", "deft_runtime/__init__.py"):
        assert not excluded(ignore_rules, path), f".dockerignore drops {path}, which the build needs"


def test_installed_extras_exist(dockerfile) -> None:
    global_args, stages = dockerfile
    extras_defined = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named: list[str] = []
    for stage in stages:
        variables = stage_args(stage, global_args)
        for run in stage.all("RUN"):
            for group in re.findall(r"\.\[([^\]]+)\]", substitute(run.value, variables)):
                named += [e.strip() for e in group.split(",")]
    assert "server" in named, "the image must install the server extra"
    assert {"postgres", "triton"} <= set(named), named
    missing = [e for e in named if e not in extras_defined]
    assert not missing, f"extras not defined in pyproject.toml: {missing}"


# ----------------------------------------------------------------------------- the health-check module


def healthcheck(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HEALTHCHECK, *args], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT
    )


def test_healthcheck_fails_clearly_on_a_closed_port() -> None:
    from conftest import free_port

    port = free_port()  # nothing listens there once the probing socket is closed
    done = healthcheck("--address", f"127.0.0.1:{port}", "--timeout", "5")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("unhealthy: cannot reach") and f"127.0.0.1:{port}" in lines[0]


def test_healthcheck_reports_not_serving() -> None:
    """A health service that answers NOT_SERVING (as deft's does while loading or draining)."""
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        done = healthcheck("--address", f"127.0.0.1:{port}")
        assert done.returncode == 1
        assert done.stderr.strip() == f"unhealthy: server at 127.0.0.1:{port} is NOT_SERVING"
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert healthcheck("--address", f"127.0.0.1:{port}").returncode == 0
    finally:
        server.stop(None)


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory.start("--token", "secret")  # health checks need no token


def test_healthcheck_passes_against_a_serving_deft_server(server) -> None:
    import os

    for service in ("", "deft.v1.GenerationService", "deft.v1.AdapterService"):
        done = healthcheck("--address", server.address, "--service", service)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
    # with no --address it asks 127.0.0.1 on $DEFT_PORT, the server's own port variable in the image
    done = healthcheck(env={**os.environ, "DEFT_PORT": str(server.port)})
    assert done.returncode == 0, done.stderr
    unknown = healthcheck("--address", server.address, "--service", "deft.v1.Nope")
    assert unknown.returncode == 1
    assert (
        unknown.stderr.strip()
        == f"unhealthy: {server.address} has no health status for service 'deft.v1.Nope'"
    )
