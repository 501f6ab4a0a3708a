"""A catalogue of hostile adapter files and upload archives, each with the typed error it must raise.

Shared by the unit tests (``tests/test_hostile_files.py`` loads each case with ``load_adapter`` /
``extract_archive``) and usable by end-to-end suites, which upload :func:`upload_bytes` of a case and
expect INVALID_ARGUMENT (or RESOURCE_EXHAUSTED for :class:`UploadTooLarge`). Every case names the
field its message must mention, so "a typed error" also means "an error that says what to fix".
"""

from __future__ import annotations

import gzip
import io
import json
import random
import struct
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from deft_runtime.adapter import AdapterKind
from deft_runtime.errors import (
    AdapterDtypeError,
    AdapterFormatError,
    AdapterShapeError,
    DeftError,
    NonFiniteAdapter,
    RankError,
)
from deft_runtime.formats.native import to_native
from deft_runtime.testing import random_adapter

NESTED = "[" * 100_000 + "]" * 100_000  # json.loads raises RecursionError on this
MODULES = ("down.attn1.to_q", "mid.attn2.to_k")


@dataclass(frozen=True)
class Case:
    """``build(folder)`` writes the hostile input under ``folder`` and returns the path to load."""

    id: str
    build: Callable[[Path], Path]
    error: type[DeftError]
    match: str  # a regex the message must match (it names the field or the value)


# ---------------------------------------------------------------- writers


def json_text(value: object, **raw: str) -> str:
    """``json.dumps(value)`` with each string ``"@name"`` replaced by the raw JSON text ``raw[name]``."""
    text = json.dumps(value)
    for name, replacement in raw.items():
        text = text.replace(json.dumps(f"@{name}"), replacement)
    return text


def lora_tensors(modules: tuple[str, ...] = MODULES, r: int = 2, d: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for m in modules:
        out[f"base_model.model.{m}.lora_A.weight"] = torch.randn(r, d, generator=g)
        out[f"base_model.model.{m}.lora_B.weight"] = torch.randn(d, r, generator=g)
    return out


def deft_tensors(
    P_shape: tuple[int, ...] = (8, 2), R_shape: tuple[int, ...] = (2, 8)
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        f"base_model.model.{MODULES[0]}.deft_P": torch.randn(*P_shape, generator=g),
        f"base_model.model.{MODULES[0]}.deft_R": torch.randn(*R_shape, generator=g),
    }


def write_peft(folder: Path, config_text: str, tensors: dict[str, torch.Tensor]) -> Path:
    d = folder / "peft"
    d.mkdir()
    (d / "adapter_config.json").write_text(config_text)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


def peft_lora(
    raw: dict[str, str] | None = None, tensors: Callable[[], dict] = lora_tensors, **config
) -> Callable:
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
    return lambda folder: write_peft(folder, json_text({**base, **config}, **(raw or {})), tensors())


def peft_deft(
    raw: dict[str, str] | None = None, tensors: Callable[[], dict] = deft_tensors, **config
) -> Callable:
    base = {"peft_type": "DEFT", "r": 2, "alpha": None, "decomposition_method": "relu"}
    return lambda folder: write_peft(folder, json_text({**base, **config}, **(raw or {})), tensors())


def raw_safetensors(path: Path, header_text: str, data: bytes = b"") -> Path:
    header = header_text.encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def one_tensor_file(dtype: str, name: str = f"{MODULES[0]}.lora_A.weight") -> Callable:
    header = json.dumps({name: {"dtype": dtype, "shape": [2, 2], "data_offsets": [0, 4]}})
    return lambda folder: raw_safetensors(folder / "a.safetensors", header, b"\x00" * 4)


def native(raw: dict[str, str] | None = None, tensors: dict | None = None, **metadata: str) -> Callable:
    def build(folder: Path) -> Path:
        adapter = random_adapter(AdapterKind.DEFT, {"proj": (8, 8)}, rank=2)
        t, meta = to_native(adapter)
        meta.update(metadata)
        for key, text in (raw or {}).items():
            meta[key] = text
        save_file({**t, **(tensors or {})}, str(folder / "a.deft.safetensors"), metadata=meta)
        return folder / "a.deft.safetensors"

    return build


def diffusers_file(metadata_text: str, modules: tuple[str, ...] = MODULES) -> Callable:
    def build(folder: Path) -> Path:
        tensors = {k.replace("base_model.model.", "unet."): v for k, v in lora_tensors(modules).items()}
        path = folder / "pytorch_lora_weights.safetensors"
        save_file(tensors, str(path), metadata={"lora_adapter_metadata": metadata_text})
        return path

    return build


def kohya_file(alpha: torch.Tensor) -> Callable:
    def build(folder: Path) -> Path:
        g = torch.Generator().manual_seed(0)
        key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        tensors = {
            f"{key}.lora_down.weight": torch.randn(2, 8, generator=g),
            f"{key}.lora_up.weight": torch.randn(8, 2, generator=g),
            f"{key}.alpha": alpha,
        }
        save_file(tensors, str(folder / "kohya.safetensors"))
        return folder / "kohya.safetensors"

    return build


# ---------------------------------------------------------------- the adapter catalogue

F = AdapterFormatError
ADAPTER_CASES: list[Case] = [
    # PEFT LoRA configs: type confusion on every scalar and mapping
    Case("lora-r-string", peft_lora(r="eight"), F, r"'r' must be a positive integer, found 'eight'"),
    Case("lora-r-null", peft_lora(r=None), F, r"'r' must be a positive integer, found None"),
    Case("lora-r-bool", peft_lora(r=True), F, r"'r' must be a positive integer, found True"),
    Case("lora-r-list", peft_lora(r=[2]), F, r"'r' must be a positive integer, found \[2\]"),
    Case("lora-r-fraction", peft_lora(r=2.5), F, r"'r' must be a positive integer, found 2.5"),
    Case("lora-r-zero", peft_lora(r=0), F, r"'r' must be a positive integer, found 0"),
    Case("lora-r-nested", peft_lora(r="@n", raw={"n": NESTED}), F, r"nested too deeply"),
    Case("lora-alpha-string", peft_lora(lora_alpha="x"), F, r"'lora_alpha' must be a number, found 'x'"),
    Case("lora-alpha-null", peft_lora(lora_alpha=None), F, r"'lora_alpha' must be a number, found None"),
    Case("lora-alpha-bool", peft_lora(lora_alpha=False), F, r"'lora_alpha' must be a number, found False"),
    Case("lora-alpha-nan", peft_lora(lora_alpha=float("nan")), NonFiniteAdapter, r"'lora_alpha' is nan"),
    Case(
        "lora-alpha-1e309",
        peft_lora(lora_alpha="@x", raw={"x": "1e309"}),
        NonFiniteAdapter,
        r"'lora_alpha' is inf",
    ),
    Case("lora-alpha-huge", peft_lora(lora_alpha=1e30), F, r"'lora_alpha' is 1e\+30, outside"),
    Case("lora-rslora-string", peft_lora(use_rslora="yes"), F, r"'use_rslora' must be true or false"),
    Case("lora-dora-string", peft_lora(use_dora="false"), F, r"'use_dora' must be true or false"),
    Case("lora-peft-type-list", peft_lora(peft_type=["LORA"]), F, r"'peft_type' must be a string"),
    Case(
        "lora-rank-pattern-list", peft_lora(rank_pattern=["to_q"]), F, r"'rank_pattern' must be a JSON object"
    ),
    Case(
        "lora-alpha-pattern-string",
        peft_lora(alpha_pattern="to_q"),
        F,
        r"'alpha_pattern' must be a JSON object",
    ),
    Case(
        "lora-rank-pattern-value",
        peft_lora(rank_pattern={"to_q": "4"}),
        F,
        r"rank_pattern\['to_q'\] must be a positive integer",
    ),
    Case(
        "lora-alpha-pattern-nan",
        peft_lora(alpha_pattern={"to_q": float("nan")}),
        NonFiniteAdapter,
        r"alpha_pattern\['to_q'\] is nan",
    ),
    Case(
        "lora-alpha-pattern-list",
        peft_lora(alpha_pattern={"to_q": [1]}),
        F,
        r"alpha_pattern\['to_q'\] must be a number",
    ),
    Case(
        "lora-pattern-invalid-regex",
        peft_lora(rank_pattern={"to_(q": 4}),
        F,
        r"rank_pattern key 'to_\(q' is not a valid regex",
    ),
    Case(
        "lora-pattern-backreference",
        peft_lora(rank_pattern={r"(q)\3": 4}),
        F,
        r"rank_pattern key .* backreference",
    ),
    Case(
        "lora-pattern-lookahead",
        peft_lora(alpha_pattern={"(?=to)to_q": 4}),
        F,
        r"alpha_pattern key .* lookaround",
    ),
    Case(
        "lora-pattern-too-long",
        peft_lora(rank_pattern={"a" * 300: 4}),
        F,
        r"rank_pattern key 'a{20,}.*300 characters.*at most 256",
    ),
    Case(
        "lora-pattern-too-many",
        peft_lora(rank_pattern={f"m{i}": 2 for i in range(5000)}),
        F,
        r"rank_pattern has 5000 keys.*at most 4096",
    ),
    Case(
        "lora-pattern-too-big",
        peft_lora(rank_pattern={"(a{100}){100}": 4}),
        F,
        r"rank_pattern key .* too complex",
    ),
    Case(
        "lora-config-list", lambda f: write_peft(f, "[1, 2]", lora_tensors()), F, r"must hold a JSON object"
    ),
    Case("lora-config-nested", lambda f: write_peft(f, NESTED, lora_tensors()), F, r"nested too deeply"),
    Case(
        "lora-A-1d",
        peft_lora(
            tensors=lambda: {**lora_tensors(), f"base_model.model.{MODULES[0]}.lora_A.weight": torch.zeros(8)}
        ),
        AdapterShapeError,
        r"lora_A.weight must be a matrix, found shape \(8,\)",
    ),
    Case(
        "lora-B-0d",
        peft_lora(
            tensors=lambda: {
                **lora_tensors(),
                f"base_model.model.{MODULES[0]}.lora_B.weight": torch.zeros(()),
            }
        ),
        AdapterShapeError,
        r"lora_B.weight must be a matrix, found shape \(\)",
    ),
    Case(
        "lora-rank-0-tensors",
        peft_lora(
            rank_pattern={"to_q": 1},
            tensors=lambda: {
                **lora_tensors(),
                f"base_model.model.{MODULES[0]}.lora_A.weight": torch.zeros(0, 8),
                f"base_model.model.{MODULES[0]}.lora_B.weight": torch.zeros(8, 0),
            },
        ),
        F,
        r"has rank 0",
    ),
    # PEFT DEFT configs and tensors
    Case(
        "deft-rank-0-tensors",
        peft_deft(alpha=4, tensors=lambda: deft_tensors(P_shape=(8, 0), R_shape=(0, 8))),
        RankError,
        r"rank 0",
    ),
    Case("deft-alpha-string", peft_deft(alpha="x"), F, r"'alpha' must be a number, found 'x'"),
    Case("deft-alpha-list", peft_deft(alpha=[1]), F, r"'alpha' must be a number, found \[1\]"),
    Case("deft-alpha-nan", peft_deft(alpha=float("nan")), NonFiniteAdapter, r"'alpha' is nan"),
    Case("deft-alpha-huge", peft_deft(alpha=1e300), F, r"'alpha' is 1e\+300, outside"),
    Case("deft-para-string", peft_deft(para="false"), F, r"'para' must be true or false, found 'false'"),
    Case(
        "deft-mode-int",
        peft_deft(decomposition_method=5),
        F,
        r"'decomposition_method' must be a string, found 5",
    ),
    Case(
        "deft-P-1d",
        peft_deft(tensors=lambda: deft_tensors(P_shape=(8,))),
        AdapterShapeError,
        r"deft_P must be a matrix, found shape \(8,\)",
    ),
    Case(
        "deft-P-3d",
        peft_deft(tensors=lambda: deft_tensors(P_shape=(8, 2, 1))),
        AdapterShapeError,
        r"deft_P must be a matrix, found shape \(8, 2, 1\)",
    ),
    Case(
        "deft-R-1d",
        peft_deft(tensors=lambda: deft_tensors(R_shape=(2,))),
        AdapterShapeError,
        r"deft_R must be a matrix, found shape \(2,\)",
    ),
    # safetensors headers
    Case("st-dtype-f8", one_tensor_file("F8_E4M3"), AdapterDtypeError, r"dtype F8_E4M3.*F32, F16, BF16"),
    Case("st-dtype-i64", one_tensor_file("I64"), AdapterDtypeError, r"dtype I64.*F32, F16, BF16"),
    Case("st-dtype-bool", one_tensor_file("BOOL"), AdapterDtypeError, r"dtype BOOL"),
    Case(
        "st-dtype-list",
        lambda f: raw_safetensors(
            f / "a.safetensors",
            json.dumps({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}),
            b"\0" * 4,
        ),
        F,
        r"tensor 'w'.*dtype",
    ),
    Case(
        "st-header-nested",
        lambda f: raw_safetensors(f / "a.safetensors", '{"w": ' + NESTED + "}"),
        F,
        r"nested too deeply",
    ),
    Case(
        "st-entry-number",
        lambda f: raw_safetensors(f / "a.safetensors", '{"w": 5}'),
        F,
        r"tensor 'w'.*must be an object",
    ),
    Case(
        "st-metadata-list",
        lambda f: raw_safetensors(f / "a.safetensors", '{"__metadata__": [1]}'),
        F,
        r"__metadata__ must map strings to strings",
    ),
    Case(
        "st-name-too-long",
        one_tensor_file("F32", name="x" * 5000 + ".lora_A.weight"),
        F,
        r"tensor name 'x{20,}.*5014 characters.*at most 1024",
    ),
    # deft's own format: every scalar of its metadata
    Case(
        "native-scale-nan",
        native(raw={"scales": '{"proj": NaN}'}),
        NonFiniteAdapter,
        r"scales\['proj'\] is nan",
    ),
    Case(
        "native-scale-inf",
        native(raw={"scales": '{"proj": Infinity}'}),
        NonFiniteAdapter,
        r"scales\['proj'\] is inf",
    ),
    Case(
        "native-scale-string-nan",
        native(raw={"scales": '{"proj": "nan"}'}),
        F,
        r"scales\['proj'\] must be a number, found 'nan'",
    ),
    Case(
        "native-scale-huge",
        native(raw={"scales": '{"proj": 1e30}'}),
        F,
        r"scales\['proj'\] is 1e\+30, outside \[-10000, 10000\]",
    ),
    Case(
        "native-scale-null",
        native(raw={"scales": '{"proj": null}'}),
        F,
        r"scales\['proj'\] must be a number, found None",
    ),
    Case("native-scales-list", native(raw={"scales": "[1]"}), F, r"'scales' must be a JSON object"),
    Case("native-scales-nested", native(raw={"scales": NESTED}), F, r"nested too deeply"),
    Case("native-ranks-list", native(raw={"ranks": "[2]"}), F, r"'ranks' must be a JSON object"),
    Case("native-user-list", native(raw={"user": "[]"}), F, r"'user' must be a JSON object"),
    Case("native-fingerprint-nested", native(raw={"fingerprint": NESTED}), F, r"nested too deeply"),
    Case("native-fingerprint-short", native(raw={"fingerprint": '{"proj": [8]}'}), F, r"fingerprint"),
    Case(
        "native-P-1d",
        native(tensors={"proj.P": torch.zeros(8)}),
        AdapterShapeError,
        r"proj.P must be a matrix, found shape \(8,\)",
    ),
    # diffusers' lora_adapter_metadata: the same config checks apply inside it
    Case("diffusers-metadata-list", diffusers_file("[1]"), F, r"lora_adapter_metadata must be a JSON object"),
    Case("diffusers-metadata-nested", diffusers_file(NESTED), F, r"nested too deeply"),
    Case(
        "diffusers-r-string",
        diffusers_file('{"unet.r": "x", "unet.lora_alpha": 2}'),
        F,
        r"'r' must be a positive integer, found 'x'",
    ),
    Case(
        "diffusers-alpha-nan",
        diffusers_file('{"unet.r": 2, "unet.lora_alpha": NaN}'),
        NonFiniteAdapter,
        r"'lora_alpha' is nan",
    ),
    Case(
        "diffusers-pattern-list",
        diffusers_file('{"unet.r": 2, "unet.rank_pattern": [1]}'),
        F,
        r"'rank_pattern' must be a JSON object",
    ),
    Case(
        "diffusers-pattern-invalid",
        diffusers_file('{"unet.r": 2, "unet.alpha_pattern": {"[": 1}}'),
        F,
        r"alpha_pattern key '\[' is not a valid regex",
    ),
    # kohya files: alphas are tensors
    Case("kohya-alpha-nan", kohya_file(torch.tensor(float("nan"))), NonFiniteAdapter, r"alpha.* is nan"),
    Case("kohya-alpha-huge", kohya_file(torch.tensor(1e30)), F, r"alpha.* is 1\.0\d*e\+30, outside"),
    Case(
        "kohya-alpha-vector",
        kohya_file(torch.ones(3)),
        AdapterShapeError,
        r"alpha must be a single number, found shape \(3,\)",
    ),
]


# ---------------------------------------------------------------- type confusion, seeded

CONFUSING_VALUES: list[object] = [
    None, True, False, 0, -1, 2, 2.5, 1e30, float("nan"), float("inf"), 10**40, "", "x", "nan",
    "relu", "LORA", [], [2], [[[]]], {}, {"to_q": "x"}, {"(": 1}, {"to_q": 4}, {"a": [1]},
]  # fmt: skip
_CONFIG_FIELDS = {
    "LORA": ["peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora"],
    "DEFT": ["peft_type", "r", "alpha", "decomposition_method", "para"],
    "native": ["kind", "decomposition", "ranks", "scales", "fingerprint", "user", "format_version"],
}


def confused_case(seed: int) -> Callable[[Path], Path]:
    """A valid PEFT LoRA/DEFT directory or deft file with 1-3 fields replaced by values of other types."""
    rng = random.Random(seed)
    family = rng.choice(list(_CONFIG_FIELDS))
    changes = {
        rng.choice(_CONFIG_FIELDS[family]): rng.choice(CONFUSING_VALUES) for _ in range(rng.randint(1, 3))
    }
    if family == "native":
        as_text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in changes.items()}
        return native(raw=as_text)
    return (peft_lora if family == "LORA" else peft_deft)(**changes)


# ---------------------------------------------------------------- archives


def tar_bytes(members: list[tarfile.TarInfo | tuple[str, bytes]], *, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as archive:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                archive.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                archive.addfile(info, io.BytesIO(member[1]))
    return buf.getvalue()


def gzip_of_repeats(prefix: bytes, chunk: bytes, repeats: int, suffix: bytes = b"") -> bytes:
    """A gzip stream of ``prefix + chunk * repeats + suffix``, built in O(len(chunk)) time.

    After a full flush deflate keeps no history, so one compressed copy of ``chunk`` repeated is a
    valid stream: a 4 MiB file that inflates to 4 GiB takes milliseconds to make. The trailer's CRC
    is computed only when the inflated size is small (a reader that stops early never checks it).
    """
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    body = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    tail = c.compress(suffix) + c.flush(zlib.Z_FINISH)
    size = len(prefix) + len(chunk) * repeats + len(suffix)
    crc = 0
    if size <= 256 * 1024**2:
        crc = zlib.crc32(prefix)
        for _ in range(repeats):
            crc = zlib.crc32(chunk, crc)
        crc = zlib.crc32(suffix, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    return header + head + body * repeats + tail + struct.pack("<II", crc, size & 0xFFFFFFFF)


def tar_header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(format=tarfile.GNU_FORMAT)


MiB = 1024**2


def gzip_bomb_member() -> bytes:
    """One member announcing (and holding) 4 GiB of zeros, in about 4 MiB of gzip."""
    return gzip_of_repeats(tar_header("adapter_model.safetensors", 4096 * MiB), b"\0" * MiB, 4096)


def gzip_bomb_long_name() -> bytes:
    """A GNU long-name header whose "name" is 4 GiB of ``a`` (tarfile reads it into memory)."""
    return gzip_of_repeats(
        tar_header("././@LongLink", 4096 * MiB, tarfile.GNUTYPE_LONGNAME), b"a" * MiB, 4096
    )


def gzip_bomb_pax() -> bytes:
    """A pax extended header of 4 GiB."""
    return gzip_of_repeats(tar_header("././@PaxHeader", 4096 * MiB, tarfile.XHDTYPE), b"9" * MiB, 4096)


def many_members(count: int = 200_000) -> bytes:
    """``count`` empty directory entries (a 100 MiB tar in ~0.3 MiB of gzip)."""
    entry = tar_header("d/", 0, tarfile.DIRTYPE)
    per_chunk = 2048
    return gzip_of_repeats(b"", entry * per_chunk, count // per_chunk, b"\0" * 1024)


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@dataclass(frozen=True)
class ArchiveCase:
    id: str
    build: Callable[[], bytes]
    error: type[DeftError]
    match: str


def _upload_too_large() -> type[DeftError]:
    from deft_server.errors import UploadTooLarge

    return UploadTooLarge


ARCHIVE_CASES: list[ArchiveCase] = [
    ArchiveCase(
        "gzip-bomb-4gib-member",
        gzip_bomb_member,
        _upload_too_large(),
        r"unpacks to more than .* limit of 1048576 bytes",
    ),
    ArchiveCase("gzip-bomb-4gib-long-name", gzip_bomb_long_name, F, r"headers"),
    ArchiveCase("gzip-bomb-4gib-pax", gzip_bomb_pax, F, r"headers"),
    ArchiveCase("200k-members", many_members, F, r"more than 16 members"),
    ArchiveCase("parent-dir", lambda: tar_bytes([("../evil", b"x")]), F, r"'../evil' is not a plain file"),
    ArchiveCase("absolute", lambda: tar_bytes([("/abs/evil", b"x")]), F, r"not a plain file"),
    ArchiveCase("too-deep", lambda: tar_bytes([("a/b/c", b"x")]), F, r"not a plain file"),
    ArchiveCase("dot-file", lambda: tar_bytes([(".", b"x")]), F, r"'.' is not a plain file"),
    ArchiveCase(
        "symlink", lambda: tar_bytes([_link("evil", "/etc/passwd", tarfile.SYMTYPE)]), F, r"link or special"
    ),
    ArchiveCase(
        "hardlink", lambda: tar_bytes([("x", b"1"), _link("y", "x", tarfile.LNKTYPE)]), F, r"link or special"
    ),
    ArchiveCase("char-device", lambda: tar_bytes([_link("dev", "", tarfile.CHRTYPE)]), F, r"link or special"),
    ArchiveCase("fifo", lambda: tar_bytes([_link("fifo", "", tarfile.FIFOTYPE)]), F, r"link or special"),
    ArchiveCase(
        "sparse", lambda: tar_header("s", 0, tarfile.GNUTYPE_SPARSE) + b"\0" * 1024, F, r"link or special"
    ),
    ArchiveCase(
        "long-name", lambda: tar_bytes([("n" * 10_000, b"x")]), F, r"'n{20,}.*10000 characters.*at most 255"
    ),
    ArchiveCase("newline-in-name", lambda: tar_bytes([("a\nb", b"x")]), F, r"control character"),
    ArchiveCase("duplicate", lambda: tar_bytes([("a/x", b"1"), ("b/x", b"2")]), F, r"twice"),
    ArchiveCase(
        "too-big", lambda: tar_bytes([("big", b"x" * (MiB + 1))]), _upload_too_large(), r"limit of 1048576"
    ),
    ArchiveCase(
        "bzip2", lambda: __import__("bz2").compress(tar_bytes([("a", b"x")])), F, r"not a readable tar"
    ),
    ArchiveCase(
        "truncated-gzip",
        lambda: gzip.compress(tar_bytes([("a", random.Random(0).randbytes(5000))]))[:3000],
        F,
        r"not a readable tar",
    ),
]
ARCHIVE_CASES += [
    ArchiveCase(
        "gzip-garbage",
        lambda: b"\x1f\x8b\x08\x00" + random.Random(1).randbytes(4000),
        F,
        r"not a readable tar",
    ),
    ArchiveCase("empty", lambda: b"", F, r"not a readable tar"),
    ArchiveCase("truncated-member", lambda: tar_bytes([("a", b"x" * 5000)])[:2048], F, r"not a readable tar"),
    ArchiveCase(
        "plain-4gib-member", lambda: tar_header("big", 4096 * MiB), _upload_too_large(), r"limit of 1048576"
    ),
]
ARCHIVE_LIMIT = MiB


def upload_bytes(path: Path) -> bytes:
    """The bytes a client uploads for a built case: the file, or a tar of a PEFT directory."""
    if path.is_file():
        return path.read_bytes()
    return tar_bytes([(p.name, p.read_bytes()) for p in sorted(path.iterdir())])
