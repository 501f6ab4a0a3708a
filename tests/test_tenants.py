"""Tenants end to end: a real ``deft serve --auth keys`` process on loopback, keys made with the real
``deft keys`` commands against its data folder while it runs.

Two tenants' ``dog`` are two adapters; another tenant's adapter answers exactly like a missing name;
public adapters are for everyone but deleted by admins only; each quota refuses with
RESOURCE_EXHAUSTED naming it; revocation reaches the running server within a second; malformed or
ambiguous credentials are UNAUTHENTICATED; the audit log records it all without a secret.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
from conftest import DEFT_EXECUTABLE, ROOT, free_port
from deft_cli.app import app
from deft_client import DeftClient, DeftError
from deft_client.proto import adapters_pb2, adapters_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from typer.testing import CliRunner

from deft_runtime.adapter import AdapterKind
from deft_runtime.formats import save_adapter
from deft_runtime.testing import random_adapter

pytestmark = pytest.mark.slow
SHAPES = {
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64),
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v": (64, 80),
}
runner = CliRunner()


def deft_keys(data_dir, *args: str) -> str:
    result = runner.invoke(app, ["keys", *args, "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    return result.output


def create_key(data_dir, tenant: str, *flags: str) -> str:
    """A new key's secret (the last line ``deft keys create`` prints)."""
    return deft_keys(data_dir, "create", tenant, *flags).strip().splitlines()[-1]


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory.start("--auth", "keys")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    paths = {}
    for seed in (1, 2, 3):
        paths[seed] = folder / f"a{seed}.deft.safetensors"
        adapter = random_adapter(AdapterKind.DEFT, SHAPES, rank=2, seed=seed, magnitude=2.0)
        save_adapter(adapter, paths[seed])
    return paths


@pytest.fixture(scope="module")
def keys(server):
    return {
        "alice": create_key(server.data_dir, "alice"),
        "bob": create_key(server.data_dir, "bob"),
        "root": create_key(server.data_dir, "root", "--admin"),
    }


def _pixels(images) -> np.ndarray:
    return np.asarray(images[0], dtype=np.int16)


def _refused(call, *args, **kwargs) -> DeftError:
    with pytest.raises(DeftError) as refused:
        call(*args, **kwargs)
    return refused.value


def test_two_tenants_each_get_their_own_dog(server, keys, files):
    request = {"seed": 5, "steps": 2}
    with (
        DeftClient(server.address, token=keys["alice"]) as alice,
        DeftClient(server.address, token=keys["bob"]) as bob,
        DeftClient(server.address, token=keys["root"]) as root,
    ):
        assert alice.register_adapter("dog", files[1]).owner == "alice"
        assert bob.register_adapter("dog", files[2]).owner == "bob"
        image_a = _pixels(alice.generate("a dog", adapters=["dog"], **request))
        image_b = _pixels(bob.generate("a dog", adapters=["dog"], **request))
        # the oracle: each tenant's image is the one its own bytes give under another name
        root.register_adapter("copy-of-alices", files[1], public=True)
        oracle = _pixels(root.generate("a dog", adapters=["copy-of-alices"], **request))
        assert np.abs(image_a - oracle).max() <= 1
        assert np.abs(image_a - image_b).mean() > 5 * max(1, np.abs(image_a - oracle).mean())
        assert {(i.owner, i.name) for i in alice.list_adapters()} == {
            ("alice", "dog"),
            ("", "copy-of-alices"),
        }
        everything = {(i.owner, i.name) for i in root.list_adapters()}
        assert {("alice", "dog"), ("bob", "dog"), ("", "copy-of-alices")} <= everything


def test_another_tenants_adapter_is_indistinguishable_from_a_missing_one(server, keys, files):
    with (
        DeftClient(server.address, token=keys["alice"]) as alice,
        DeftClient(server.address, token=keys["bob"]) as bob,
    ):
        alice.register_adapter("secret-cat", files[3])
        for call, args in (
            (bob.get_adapter, ()),
            (bob.delete_adapter, ()),
            (bob.generate, ("x",)),
        ):

            def attempt(name: str, call=call, args=args):
                if call == bob.generate:
                    return _refused(call, *args, adapters=[name], steps=1)
                return _refused(call, name)

            held, missing = attempt("secret-cat"), attempt("nobody-has")
            assert held.code is missing.code is grpc.StatusCode.NOT_FOUND
            assert held.message.replace("secret-cat", "NAME") == missing.message.replace("nobody-has", "NAME")
            assert held.reason == missing.reason
        assert "secret-cat" not in {i.name for i in bob.list_adapters()}
        assert alice.get_adapter("secret-cat").owner == "alice"  # bob's delete did nothing


def test_public_adapters_are_shared_but_deleted_by_admins_only(server, keys, files):
    with (
        DeftClient(server.address, token=keys["alice"]) as alice,
        DeftClient(server.address, token=keys["root"]) as root,
    ):
        denied = _refused(alice.register_adapter, "mine-for-all", files[1], public=True)
        assert denied.code is grpc.StatusCode.PERMISSION_DENIED and "admin" in denied.message
        root.register_adapter("shared", files[2], public=True)
        assert alice.get_adapter("shared").owner == ""
        alice.generate("x", adapters=["shared"], steps=1, seed=1)
        denied = _refused(alice.delete_adapter, "shared")
        assert denied.code is grpc.StatusCode.PERMISSION_DENIED
        root.delete_adapter("shared")
        assert _refused(alice.get_adapter, "shared").code is grpc.StatusCode.NOT_FOUND


def test_storage_quotas(server, files):
    one = create_key(server.data_dir, "carol", "--max-adapters", "1")
    tiny = create_key(server.data_dir, "dave", "--max-adapter-bytes", "100")
    with DeftClient(server.address, token=one) as carol, DeftClient(server.address, token=tiny) as dave:
        carol.register_adapter("first", files[1])
        full = _refused(carol.register_adapter, "second", files[2])
        assert full.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "max_adapters=1" in full.message
        big = _refused(dave.register_adapter, "any", files[1])
        assert big.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "max_adapter_bytes=100" in big.message
        assert [i.name for i in carol.list_adapters() if i.owner] == ["first"]


def test_concurrency_quota(server):
    key = create_key(server.data_dir, "erin", "--max-concurrent", "1")
    with DeftClient(server.address, token=key) as erin:
        stream = erin.generate_stream("slow", steps=30, seed=1)
        next(iter(stream))  # queued: it holds erin's one place until it ends
        busy = _refused(erin.generate, "x", steps=1)
        assert busy.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "max_concurrent=1" in busy.message
        for _ in stream:
            pass
        erin.generate("x", steps=1)  # the place is free again


def test_rate_quota_says_when_to_retry(server):
    key = create_key(server.data_dir, "frank", "--rate", "1/min")
    with DeftClient(server.address, token=key) as frank:
        frank.generate("x", steps=1)
    with grpc.insecure_channel(server.address) as channel:
        from deft_client.proto import generation_pb2, generation_pb2_grpc

        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as limited:
            stub.GenerateOnce(
                generation_pb2.GenerateRequest(prompt="x", num_inference_steps=1),
                metadata=(("authorization", f"Bearer {key}"),),
            )
    assert limited.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "rate=0.0166667/s" in limited.value.details()
    status = rpc_status.from_call(limited.value)
    retry = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    info = error_details_pb2.RetryInfo()
    retry[0].Unpack(info)
    assert 50 < info.retry_delay.ToTimedelta().total_seconds() <= 60


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Basic YWxpY2U6cHc="),),
        (("authorization", "Bearer deft_notakey"),),
        (("authorization", "Bearer deft_0123456789ab_" + "A" * 43),),  # well-formed, unknown
        (("authorization", "Bearer {alice}"), ("authorization", "Bearer {alice}")),  # two headers
        (("authorization", "bearer {alice}"),),
        (("authorization", "Bearer  {alice}"),),
    ],
)
def test_malformed_or_ambiguous_credentials_are_unauthenticated(server, keys, metadata):
    metadata = tuple((k, v.format(alice=keys["alice"])) for k, v in metadata)
    with grpc.insecure_channel(server.address) as channel:
        stub = adapters_pb2_grpc.AdapterServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListAdapters(adapters_pb2.ListAdaptersRequest(), metadata=metadata, timeout=30)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert keys["alice"] not in refused.value.details()


def test_a_revoked_key_is_refused_by_the_running_server_within_a_second(server):
    key = create_key(server.data_dir, "gina")
    key_id = key.split("_")[1]
    with DeftClient(server.address, token=key) as gina:
        gina.list_adapters()
        deft_keys(server.data_dir, "revoke", key_id)
        time.sleep(1.05)
        refused = _refused(gina.list_adapters)
        assert refused.code is grpc.StatusCode.UNAUTHENTICATED
    assert key_id in deft_keys(server.data_dir, "list")


def test_the_audit_log_records_without_secrets(server, keys):
    entries = [json.loads(line) for line in (server.data_dir / "audit.jsonl").read_text().splitlines()]
    actions = {e["action"] for e in entries}
    assert {"key.create", "adapter.register", "adapter.delete", "auth.fail"} <= actions
    assert any(e["action"] == "adapter.register" and e["result"] == "QuotaExceeded" for e in entries)
    text = json.dumps(entries)
    for key in keys.values():
        assert key.split("_", 2)[2] not in text
    assert all(set(e) == {"at", "tenant", "key_id", "action", "target", "result"} for e in entries)


def test_the_access_log_names_the_tenant(server, keys):
    with DeftClient(server.address, token=keys["alice"], timeout=300) as alice:
        alice.generate("a quokka-marmalade prompt", steps=1, request_id="tenant-line")
    deadline = time.monotonic() + 30
    while not (lines := [ln for ln in server.log().splitlines() if "label=tenant-line" in ln]):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    assert "deft_server.access: generate" in lines[0] and " tenant=alice status=ok" in lines[0]
    # the prompt never reaches the log (other tests of this module log adapter names like secret-cat)
    assert "quokka-marmalade" not in server.log()


def test_health_needs_no_key(server):
    with DeftClient(server.address) as anonymous:
        anonymous.wait_ready(timeout=10)


def test_no_auth_beyond_loopback_is_refused(tmp_path):
    command = [str(DEFT_EXECUTABLE), "serve", "--host", "0.0.0.0", "--port", str(free_port())]
    command += ["--metrics-port", "0", "--http-port", "0", "--data-dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert done.returncode == 2, done.stderr
    assert "--insecure-no-auth" in done.stderr and "--auth keys" in done.stderr


def test_concurrent_registrations_cannot_overshoot_the_count_quota(server, files):
    key = create_key(server.data_dir, "hank", "--max-adapters", "2")
    outcomes: list[str] = []

    def register(i: int) -> None:
        with DeftClient(server.address, token=key) as hank:
            try:
                hank.register_adapter(f"n{i}", files[1 + i % 3])
                outcomes.append("ok")
            except DeftError as e:
                outcomes.append(e.code.name)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(outcomes) == ["RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED", "ok", "ok"]


def _http_get(url: str, key: str | None = None) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_the_http_api_checks_keys_and_scopes_by_tenant(server, keys, files):
    with DeftClient(server.address, token=keys["alice"]) as alice:
        alice.register_adapter("http-only-alice", files[1])
    url = f"{server.http_url}/v1/adapters/http-only-alice"
    status, body = _http_get(url, keys["alice"])
    assert status == 200 and body["id"] == "http-only-alice"
    assert _http_get(url, keys["bob"])[0] == 404
    assert _http_get(url)[0] == 401 and _http_get(url, "deft_forged")[0] == 401
    status, models = _http_get(f"{server.http_url}/v1/models", keys["bob"])
    assert status == 200 and not any("http-only-alice" in m["id"] for m in models["data"])


def test_tenants_across_replicas_sharing_postgresql(server_factory, make_postgres_db, files, tmp_path):
    """Keys, ownership, the count quota and revocation hold across two replicas of one registry."""
    url = make_postgres_db()
    one = server_factory.start("--auth", "keys", "--registry", url)
    two = server_factory.start("--auth", "keys", "--registry", url)
    cli_dir = tmp_path / "cli"

    def keys_cli(*args: str) -> str:
        result = runner.invoke(app, ["keys", *args, "--data-dir", str(cli_dir), "--registry", url])
        assert result.exit_code == 0, result.output
        return result.output

    alice = keys_cli("create", "alice", "--max-adapters", "1").strip().splitlines()[-1]
    bob = keys_cli("create", "bob").strip().splitlines()[-1]
    with (
        DeftClient(one.address, token=alice) as alice_one,
        DeftClient(two.address, token=alice) as alice_two,
        DeftClient(two.address, token=bob) as bob_two,
    ):
        alice_one.register_adapter("dog", files[1])
        assert [(i.owner, i.name) for i in alice_two.list_adapters()] == [("alice", "dog")]
        full = _refused(alice_two.register_adapter, "cat", files[2])  # the quota counts both replicas
        assert full.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "max_adapters=1" in full.message
        assert _refused(bob_two.get_adapter, "dog").code is grpc.StatusCode.NOT_FOUND
        alice_two.generate("x", adapters=["dog"], steps=1, seed=1)
        keys_cli("revoke", alice.split("_")[1])
        time.sleep(1.05)
        for client in (alice_one, alice_two):
            assert _refused(client.list_adapters).code is grpc.StatusCode.UNAUTHENTICATED
    import psycopg

    with psycopg.connect(url) as conn:
        actions = [row[0] for row in conn.execute("SELECT action FROM deft_audit ORDER BY id")]
    assert actions.count("key.create") == 2 and "key.revoke" in actions and "auth.fail" in actions
