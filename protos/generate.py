"""Generate the Python stubs of ``protos/deft/v1/*.proto`` into ``deft_client.proto``.

Usage (from the repository root; ``make protos`` runs the first form)::

    python protos/generate.py              # rewrite clients/python/deft_client/proto/
    python protos/generate.py --out DIR    # write into DIR instead (the test compares the two)

The server and the client both import the stubs from ``deft_client.proto``. protoc writes them as
``deft/v1/<name>_pb2.py`` with absolute imports (``from deft.v1 import …``); this script flattens
them into one package and turns those imports into relative ones, so no top-level ``deft`` package
is needed, and names the message classes' module ``deft_client.proto.<name>_pb2`` (where they really
live, so pickle, and with it Ray, can find them). Descriptor names stay ``deft/v1/<name>.proto`` (what
server reflection reports).

The output embeds the protobuf and grpc versions of the generator, so the committed files are
generated with the grpcio-tools version pinned below (the ``dev`` extra pins the same one).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
PROTO_DIR = PROTO_ROOT / "deft" / "v1"
DEFAULT_OUT = ROOT / "clients" / "python" / "deft_client" / "proto"
GRPC_TOOLS_VERSION = "1.85.1"
INIT = (
    '"""Generated gRPC/protobuf stubs of ``deft.v1`` (``protos/generate.py`` writes them; do not edit)."""\n'
)
_ABSOLUTE_IMPORT = re.compile(r"^from deft\.v1 import (\w+_pb2)", re.MULTILINE)
#: the module name protoc gives the message classes (their ``__module__``, which pickle imports)
_MODULE_NAME = re.compile(r"'deft\.v1\.(\w+_pb2)'")


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def run_protoc(staging: Path) -> None:
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={staging}",
        f"--pyi_out={staging}",
        f"--grpc_python_out={staging}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed (see its message above)")


def generate(out: Path) -> list[Path]:
    """Write the stubs and the package ``__init__.py`` into ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        run_protoc(staging)
        for src in sorted((staging / "deft" / "v1").iterdir()):
            text = _ABSOLUTE_IMPORT.sub(r"from . import \1", src.read_text())
            text = _MODULE_NAME.sub(r"'deft_client.proto.\1'", text)
            (out / src.name).write_text(text)
            written.append(out / src.name)
    (out / "__init__.py").write_text(INIT)
    return [out / "__init__.py", *written]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    from importlib.metadata import version

    installed = version("grpcio-tools")
    if installed != GRPC_TOOLS_VERSION:
        print(
            f"warning: grpcio-tools {installed} is installed; the committed stubs are made with "
            f"{GRPC_TOOLS_VERSION} (pip install grpcio-tools=={GRPC_TOOLS_VERSION})",
            file=sys.stderr,
        )
    for path in generate(args.out):
        print(path.relative_to(args.out.parent) if path.is_relative_to(args.out.parent) else path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
