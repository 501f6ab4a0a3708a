"""Registration as a user meets it, against a real server: errors name the user's own file (never the
server's temporary copies), and a folder holding one adapter (a ``deft train`` output folder, a folder
with one PEFT directory or one file) registers as that adapter (and reads locally as it)."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import grpc
import pytest
import torch
from conftest import DEFT_EXECUTABLE
from deft_client import DeftClient, DeftError
from deft_client.proto import adapters_pb2, adapters_pb2_grpc
from deft_server.uploads import MAX_FILE_NAME_CHARS, UNNAMED_UPLOAD, upload_label

from deft_runtime.adapter import AdapterKind, Decomposition
from deft_runtime.errors import AdapterFormatError
from deft_runtime.formats import load_adapter, save_adapter
from deft_runtime.testing import random_adapter
from deft_runtime.train.output import ADAPTER_FILE, PEFT_DIR, write_output

LAYER = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
CODE = grpc.StatusCode


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory.start("--max-upload-size", "4MiB")


@pytest.fixture(scope="module")
def client(server):
    with DeftClient(server.address, timeout=120) as c:
        yield c


def _deft(kind: AdapterKind = AdapterKind.DEFT, seed: int = 4):
    mode = None if kind is AdapterKind.LORA else Decomposition.RELU
    return random_adapter(kind, {LAYER: (64, 64)}, rank=2, decomposition=mode, seed=seed)


def _pickle(path: Path) -> Path:
    torch.save({"w": torch.ones(2)}, path)
    return path


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _peft_with_broken_weights(folder: Path) -> Path:
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2}')
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    return folder


def _assert_no_server_paths(message: str, server) -> None:
    for leak in ("upload-", ".part", str(server.data_dir), "/tmp/", "tmp/"):
        assert leak not in message, f"{leak!r} leaked into {message!r}"


BAD_FILES = {
    # what the user passes → what the message must name it
    "pickle-renamed": (lambda d: _pickle(d / "mine.safetensors"), "mine.safetensors is a pickle"),
    "garbage": (lambda d: _write(d / "junk.safetensors", b"\x00" * 2000), "junk.safetensors"),
    "tar-without-config": (
        lambda d: _tar(d / "dog.tar", {"readme.md": b"hi"}),
        "dog.tar holds no adapter: expected a PEFT directory",
    ),
    "peft-broken-weights": (
        lambda d: _peft_with_broken_weights(d / "dog-peft"),
        "dog-peft/adapter_model.safetensors",
    ),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_errors_name_the_users_file_not_the_servers_copy(client, server, tmp_path, case):
    make, named = BAD_FILES[case]
    with pytest.raises(DeftError) as info:
        client.register_adapter(f"bad-{case}", make(tmp_path))
    assert info.value.code is CODE.INVALID_ARGUMENT, info.value
    assert named in info.value.message
    _assert_no_server_paths(info.value.message, server)


def test_a_client_that_sends_no_file_name_reads_the_upload(server, tmp_path):
    """Clients from before AdapterUpload.file_name: the message says "the upload", still no temp path."""
    data = _pickle(tmp_path / "x.bin").read_bytes()
    header = adapters_pb2.AdapterUpload(name="nameless", size_bytes=len(data))
    chunks = [adapters_pb2.RegisterAdapterChunk(header=header), adapters_pb2.RegisterAdapterChunk(data=data)]
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as info:
        adapters_pb2_grpc.AdapterServiceStub(channel).RegisterAdapter(iter(chunks), timeout=60)
    assert info.value.code() is CODE.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{UNNAMED_UPLOAD} is a pickle")
    _assert_no_server_paths(info.value.details(), server)


def test_http_uploads_name_the_file_of_the_form(server, tmp_path):
    import httpx2

    data = _pickle(tmp_path / "x.bin").read_bytes()
    response = httpx2.post(
        f"{server.http_url}/v1/adapters",
        data={"name": "over-http"},
        files={"file": ("my-lora.safetensors", data)},
        timeout=120,
    )
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert message.startswith("my-lora.safetensors is a pickle")
    _assert_no_server_paths(message, server)


def test_file_names_are_labels_bounded_and_without_control_characters():
    assert upload_label("dog.safetensors") == "dog.safetensors"
    assert upload_label("  ") == UNNAMED_UPLOAD
    assert upload_label("a\nb\x1b[31m") == "a?b?[31m"
    long = upload_label("n" * 10_000)
    assert len(long) == MAX_FILE_NAME_CHARS + 1 and long.endswith("…")


def _training_output(out: Path) -> Path:
    write_output(out, _deft(), {}, log_file=None, validation_dir=None, base_model_name="tiny-sdxl")
    assert (out / ADAPTER_FILE).is_file() and (out / PEFT_DIR / "adapter_config.json").is_file()
    return out


def test_a_training_output_folder_registers_its_adapter(client, tmp_path):
    info = client.register_adapter("trained", _training_output(tmp_path / "dog-adapter"))
    assert (info.kind, info.source_format, info.target_count) == ("deft", "deft", 1)
    assert info.sha256 == _sha256(tmp_path / "dog-adapter" / ADAPTER_FILE)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _deft_in(folder: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The real ``deft`` executable, run in ``folder``."""
    return subprocess.run(
        [str(DEFT_EXECUTABLE), *args],
        cwd=folder,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_load_adapter_and_deft_inspect_read_a_training_output_folder(tmp_path):
    out = _training_output(tmp_path / "dog-adapter")
    adapter = load_adapter(out)
    assert adapter.kind is AdapterKind.DEFT and list(adapter.layers) == [LAYER]
    done = _deft_in(tmp_path, "inspect", "./dog-adapter")
    assert done.returncode == 0, done.stderr
    assert "deft" in done.stdout and "rank" in done.stdout
    save_adapter(_deft(seed=9), out / "second.deft.safetensors")
    with pytest.raises(
        AdapterFormatError, match=r"dog-adapter holds 2 adapters \(adapter.deft.safetensors, second"
    ):
        load_adapter(out, label="dog-adapter")


def test_the_cli_registers_a_training_output_folder(server, tmp_path):
    out = _training_output(tmp_path / "dog-adapter")
    done = _deft_in(tmp_path, "adapters", "register", "dog", "./dog-adapter", DEFT_SERVER=server.address)
    assert done.returncode == 0, done.stderr
    assert "registered dog" in done.stdout and "deft" in done.stdout
    assert out.is_dir()


def test_a_folder_holding_one_adapter_registers_it(client, tmp_path):
    """One PEFT directory among other files, or one adapter file among other files."""
    with_peft = tmp_path / "with-peft"
    save_adapter(_deft(), with_peft / "dog", format="peft")
    (with_peft / "notes.txt").write_text("trained on my dog")
    with_file = tmp_path / "with-file"
    save_adapter(_deft(AdapterKind.LORA), with_file / "dog.deft.safetensors")
    (with_file / "preview.png").write_bytes(b"not really a png")
    assert client.register_adapter("one-peft", with_peft).source_format == "peft"
    assert client.register_adapter("one-file", with_file).kind == "lora"


def test_a_folder_with_no_adapter_or_several_lists_what_it_found(client, tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    _pickle(empty / "weights.bin")
    several = tmp_path / "several"
    save_adapter(_deft(seed=1), several / "a.deft.safetensors")
    save_adapter(_deft(seed=2), several / "b.deft.safetensors")
    save_adapter(_deft(seed=3), several / "c", format="peft")
    with pytest.raises(DeftError) as none_found:
        client.register_adapter("none", empty)
    message = none_found.value.message
    assert none_found.value.code is CODE.INVALID_ARGUMENT
    assert "holds no adapter" in message and "notes.txt" in message and "weights.bin" in message
    assert "pickle" in message
    with pytest.raises(DeftError) as too_many:
        client.register_adapter("many", several)
    assert too_many.value.code is CODE.INVALID_ARGUMENT
    assert "holds 3 adapters (a.deft.safetensors, b.deft.safetensors, c/)" in too_many.value.message
    assert {"none", "many"}.isdisjoint(a.name for a in client.list_adapters())
