"""Tenant keys on Ray Serve (``deft_server.ray_app`` with ``auth=keys``): a local Ray instance, Serve's
gRPC ingress and one CPU replica of tiny-sdxl sharing the SQLite registry of a plain
``deft serve --auth keys`` (the reference server; keys made with the real ``deft keys`` commands).

The ingress must check keys as the gRPC server does (same refusals, revocation within a second) and the
replica must act as the key's tenant: two tenants' ``dog`` are two adapters, each giving the image the
reference server gives that tenant; another tenant's adapter answers like a missing name; List shows
one's own and the public ones; the metrics' tenant label names the tenant.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import free_port
from deft_client import DeftClient, DeftError
from test_tenants import create_key, deft_keys

from deft_runtime.adapter import AdapterKind, Decomposition
from deft_runtime.formats import save_adapter
from deft_runtime.testing import random_adapter

ray = pytest.importorskip("ray", reason="the Ray Serve tests need: pip install 'deft[ray]'")
serve = pytest.importorskip("ray.serve", reason="the Ray Serve tests need: pip install 'deft[ray]'")
from deft_server.tenants_auth import INVALID_KEY, MISSING_KEY  # noqa: E402
from test_ray_serve import serve_deft  # noqa: E402

pytestmark = pytest.mark.slow
TIMEOUT = 120
SHAPES = {
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64),
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v": (64, 80),
}
METRICS_PORT = free_port()
REQUEST = {"seed": 3, "steps": 2}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[int, Any]:
    root = tmp_path_factory.mktemp("ray-tenant-adapters")
    paths = {}
    for seed in (1, 2, 3):
        adapter = random_adapter(
            AdapterKind.DEFT, SHAPES, rank=2, decomposition=Decomposition.QR, seed=seed, magnitude=4.0
        )
        paths[seed] = save_adapter(adapter, root / f"a{seed}.deft.safetensors")
    return paths


@pytest.fixture(scope="module")
def reference(server_factory):
    """The plain ``deft serve --auth keys`` whose registry (and keys) the replica shares."""
    return server_factory.start("--auth", "keys")


@pytest.fixture(scope="module")
def keys(reference) -> dict[str, str]:
    return {name: create_key(reference.data_dir, name) for name in ("alice", "bob", "carol")}


@pytest.fixture(scope="module")
def address(reference, tiny_model_cache) -> Iterator[str]:
    settings = {
        "auth": "keys",
        "data_dir": str(reference.data_dir),
        "model": "tiny-sdxl",
        "cache_dir": str(tiny_model_cache),
        "device": "cpu",
        "num_replicas": "1",
        "num_cpus": "0.5",
        "metrics_port": str(METRICS_PORT),
        "metrics_tenant_labels": "true",
    }
    with serve_deft(settings, num_cpus=2) as ingress:
        yield ingress


def client(address: str, key: str | None) -> DeftClient:
    return DeftClient(address, token=key, timeout=TIMEOUT)


def refusal(call: Any, *args: Any, **kwargs: Any) -> DeftError:
    with pytest.raises(DeftError) as refused:
        call(*args, **kwargs)
    return refused.value


def pixels(images: list[Any]) -> np.ndarray:
    return np.asarray(images[0], dtype=np.int16)


def test_calls_without_a_valid_key_are_refused_like_the_grpc_servers(address, keys):
    with client(address, None) as anonymous, client(address, "deft_0123456789ab_not-a-real-secret") as bad:
        missing = refusal(anonymous.list_adapters)
        assert missing.code is grpc.StatusCode.UNAUTHENTICATED and MISSING_KEY in missing.message
        for invalid in (refusal(bad.list_adapters), refusal(bad.generate, "x", **REQUEST)):
            assert invalid.code is grpc.StatusCode.UNAUTHENTICATED and INVALID_KEY in invalid.message
    with grpc.insecure_channel(address) as channel:
        method = channel.unary_unary("/deft.v1.AdapterService/ListAdapters")
        two = [("authorization", f"Bearer {keys['alice']}")] * 2
        with pytest.raises(grpc.RpcError) as error:
            method(b"", metadata=two, timeout=TIMEOUT)
        assert error.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "exactly one authorization header" in error.value.details()


def test_two_tenants_dogs_are_their_own_and_match_the_reference_server(address, reference, keys, files):
    with client(address, keys["alice"]) as alice, client(address, keys["bob"]) as bob:
        assert alice.register_adapter("dog", files[1]).owner == "alice"  # through the ingress
        assert bob.register_adapter("dog", files[2]).owner == "bob"
        ray_a = pixels(alice.generate("a dog", adapters=["dog"], **REQUEST))
        ray_b = pixels(bob.generate("a dog", adapters=["dog"], **REQUEST))
        assert [(i.owner, i.name) for i in alice.list_adapters()] == [("alice", "dog")]
    with client(reference.address, keys["alice"]) as alice, client(reference.address, keys["bob"]) as bob:
        ref_a = pixels(alice.generate("a dog", adapters=["dog"], **REQUEST))
        ref_b = pixels(bob.generate("a dog", adapters=["dog"], **REQUEST))
    assert np.abs(ray_a - ref_a).max() <= 1 and np.abs(ray_b - ref_b).max() <= 1
    # two adapters, not one shared "dog": far apart next to how close each is to its reference
    assert np.abs(ray_a - ray_b).mean() > 4 * max(
        np.abs(ray_a - ref_a).mean(), np.abs(ray_b - ref_b).mean(), 0.25
    )


def test_another_tenants_adapter_answers_like_a_missing_one(address, keys, files):
    with client(address, keys["alice"]) as alice, client(address, keys["carol"]) as carol:
        alice.register_adapter("secret-cat", files[3])
        calls = {
            "get": carol.get_adapter,
            "delete": carol.delete_adapter,
            "generate": lambda name: carol.generate("x", adapters=[name], **REQUEST),
        }
        for what, call in calls.items():
            hidden, missing = refusal(call, "secret-cat"), refusal(call, "no-such-cat")
            assert hidden.code is missing.code is grpc.StatusCode.NOT_FOUND, what
            assert hidden.message.replace("secret-cat", "?") == missing.message.replace("no-such-cat", "?")
        assert [i.name for i in carol.list_adapters()] == []
        assert alice.get_adapter("secret-cat").owner == "alice"  # untouched by carol's delete


def test_the_metrics_tenant_label_names_the_caller(address, keys):
    with client(address, keys["carol"]) as carol:
        carol.generate("a plain picture", **REQUEST)
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=30).read().decode()
    assert 'tenant="carol"' in text


def test_a_revoked_key_is_refused_by_the_ingress_within_a_second(address, reference, keys):
    with client(address, keys["bob"]) as bob:
        bob.list_adapters()  # cached as valid now
        key_id = keys["bob"].split("_")[1]
        deft_keys(reference.data_dir, "revoke", key_id)
        time.sleep(1.2)
        refused = refusal(bob.list_adapters)
        assert refused.code is grpc.StatusCode.UNAUTHENTICATED and INVALID_KEY in refused.message
