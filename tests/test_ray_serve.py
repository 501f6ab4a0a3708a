"""deft on Ray Serve (``deft_server.ray_app``): a local Ray instance, Serve's gRPC ingress, 2 CPU replicas
of tiny-sdxl sharing the registry of a plain ``deft serve`` (the "admin" server, also the reference).

What scale-out must keep: requests for an adapter set stay on the replica that holds it; every replica
serves every adapter (loading it from the shared registry when routing sends it there); results equal
the single server's; errors keep their status codes.

The replicas take one request at a time (``max_ongoing_requests=1``), so concurrent requests for one
adapter set must spill over to the other replica: that is how the tests make a replica serve an
adapter it never held, through Serve's own routing.
"""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import free_port
from deft_client import DeftClient, DeftError, Preview, Progress, Queued, Result, Started
from deft_client.proto import generation_pb2_grpc
from deft_client.results import decode_png, event_from_message
from deft_client.wire import generate_request

from deft_runtime.adapter import AdapterKind, Decomposition
from deft_runtime.formats import save_adapter
from deft_runtime.testing import random_adapter

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="the Ray Serve tests need: pip install 'deft[ray]'")
serve = pytest.importorskip("ray.serve", reason="the Ray Serve tests need: pip install 'deft[ray]'")
from deft_server.ray_app import REPLICA_KEY, SERVICE_FUNCTIONS, adapter_set_id, build_app  # noqa: E402
from ray.serve.config import gRPCOptions  # noqa: E402

CODE = grpc.StatusCode
TOL = 2 / 255
TIMEOUT = 120
#: strong random adapters on two attention layers of tiny-sdxl's UNet
SHAPES = {
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64),
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v": (64, 80),
}
BASE = dict(prompt="a lighthouse at dusk", steps=4, seed=7)


def free_port_pair() -> int:
    """A port P with P and P+1 both free (the replicas' metrics ports: base + rank on the node)."""
    for _ in range(50):
        base = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


#: the replicas' metrics ports are METRICS_BASE and METRICS_BASE + 1
METRICS_BASE = free_port_pair()


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(decode_png(png).convert("RGB"), dtype=np.float32) / 255.0


def assert_same(got: list[np.ndarray], want: list[np.ndarray], what: str) -> None:
    assert len(got) == len(want), what
    for x, y in zip(got, want, strict=True):
        assert x.shape == y.shape, what
        assert np.abs(x - y).max() <= TOL, f"{what}: off by {np.abs(x - y).max() * 255:.1f}/255"


# ---------------------------------------------------------------------------- the deployments


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ray-adapters")
    files = {}
    for seed, name in enumerate(("a", "b", "c"), start=1):
        adapter = random_adapter(
            AdapterKind.DEFT, SHAPES, rank=2, decomposition=Decomposition.QR, seed=seed, magnitude=2.0
        )
        files[name] = save_adapter(adapter, root / f"{name}.deft.safetensors")
    return files


def _postgres_url(request: pytest.FixtureRequest) -> str | None:
    """A fresh PostgreSQL database when the suite has one (the shared registry of a fleet), else None."""
    try:
        return request.getfixturevalue("make_postgres_db")()
    except (pytest.FixtureLookupError, pytest.skip.Exception):
        return None


@pytest.fixture(scope="module")
def admin(request, server_factory, adapter_files, tmp_path_factory) -> tuple[Any, dict[str, str]]:
    """The plain ``deft serve`` that registers adapters, and the registry settings the replicas share."""
    url = _postgres_url(request)
    if url is not None:
        server = server_factory.start("--registry", url)
        registry = {"registry": url, "data_dir": str(tmp_path_factory.mktemp("ray-replica-data"))}
    else:
        server = server_factory.start()
        registry = {"data_dir": str(server.data_dir)}  # one machine: the SQLite registry is shared
    with DeftClient(server.address, timeout=TIMEOUT) as client:
        for name in ("a", "b"):  # "c" is registered later, through the Ray ingress
            client.register_adapter(name, adapter_files[name])
    return server, registry


@contextmanager
def serve_deft(settings: dict[str, str], num_cpus: int) -> Iterator[str]:
    """Ray with ``num_cpus``, Serve's gRPC ingress and the deft app built from ``settings``; yields the
    ingress address; Serve and Ray (all their processes) are shut down at the end."""
    port = free_port()
    ray.init(
        num_cpus=num_cpus,
        object_store_memory=128 << 20,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}},
    )
    try:
        serve.start(
            grpc_options=gRPCOptions(port=port, grpc_servicer_functions=SERVICE_FUNCTIONS),
            http_options={"host": "127.0.0.1", "port": free_port()},
        )
        serve.run(build_app(settings), name="deft")
        yield f"127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_address(admin, tiny_model_cache) -> Iterator[str]:
    """Serve's gRPC ingress in front of 2 CPU replicas."""
    _, registry = admin
    settings = {
        **registry,
        "model": "tiny-sdxl",
        "cache_dir": str(tiny_model_cache),
        "device": "cpu",
        "num_replicas": "2",
        "num_cpus": "0.5",
        "max_ongoing_requests": "1",
        "metrics_port": str(METRICS_BASE),
    }
    with serve_deft(settings, num_cpus=4) as address:
        yield address


@pytest.fixture(scope="module")
def channel(ray_address) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(ray_address) as ch:
        yield ch


@pytest.fixture(scope="module")
def admin_client(admin) -> Iterator[DeftClient]:
    with DeftClient(admin[0].address, timeout=TIMEOUT) as client:
        yield client


# ---------------------------------------------------------------------------- calls


def once(channel: grpc.Channel, adapters: Any = None, **overrides: Any) -> tuple[str, list[np.ndarray]]:
    """GenerateOnce through Serve: (the replica that served it, the images)."""
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    request = generate_request(**{**BASE, **overrides}, adapters=adapters)
    reply, call = stub.GenerateOnce.with_call(request, timeout=TIMEOUT)
    replica = dict(call.trailing_metadata())[REPLICA_KEY]
    return replica, [pixels(image.png) for image in reply.result.images]


def as_arrays(images: list[Any]) -> list[np.ndarray]:
    return [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]


def reference(client: DeftClient, adapters: Any = None, **overrides: Any) -> list[np.ndarray]:
    params = {**BASE, **overrides}
    return as_arrays(client.generate(params.pop("prompt"), adapters=adapters, **params))


def concurrently(channel: grpc.Channel, adapters: Any, n: int, **overrides: Any) -> list[tuple[str, Any]]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: once(channel, adapters, **overrides), range(n)))


# ---------------------------------------------------------------------------- routing


def test_the_routing_id_is_the_adapter_set():
    assert adapter_set_id(["b", "a", "b"]) == adapter_set_id(["a", "b"]) == "a+b"
    assert adapter_set_id([]) == "" and adapter_set_id(["x.y-1"]) == "x.y-1"


def test_requests_for_an_adapter_set_stay_on_the_replica_that_holds_it(channel, admin_client):
    want = {name: reference(admin_client, [name]) for name in ("a", "b")}
    holder_a, images = once(channel, ["a"])
    assert_same(images, want["a"], "a on Ray vs the single server")
    holder_b, images = once(channel, ["b"])
    assert_same(images, want["b"], "b on Ray vs the single server")
    # a set no replica holds goes to a replica holding the fewest sets: the one without "a"
    assert holder_b != holder_a
    for _ in range(3):
        for name, holder in (("a", holder_a), ("b", holder_b)):
            replica, images = once(channel, [name])
            assert replica == holder, f"a request for {name!r} left the replica that holds it"
            assert_same(images, want[name], name)


def test_every_replica_serves_every_adapter(channel, admin_client):
    """Concurrent requests for one set spill over to the other replica, which loads the set and gives
    the same images; so each replica ends up serving an adapter it never held before."""
    served: dict[str, set[str]] = {}
    for name in ("a", "b"):
        want = reference(admin_client, [name], steps=8)
        results = concurrently(channel, [name], 4, steps=8)
        for replica, images in results:
            assert_same(images, want, f"{name} on {replica}")
        served[name] = {replica for replica, _ in results}
    replicas = served["a"] | served["b"]
    assert len(replicas) == 2
    assert served["a"] == served["b"] == replicas, f"replicas that served each adapter: {served}"


def test_a_set_of_several_adapters_is_one_routing_id(channel, admin_client):
    pair = [("a", 0.7), ("b", 1.2)]
    holder, images = once(channel, pair)
    assert_same(images, reference(admin_client, pair), "a+b")
    swapped = [("b", 0.5), ("a", 1.0)]  # another order and weights: the same set, the same replica
    want = reference(admin_client, swapped, seed=3)
    for _ in range(3):
        replica, images = once(channel, swapped, seed=3)
        assert replica == holder
        assert_same(images, want, "b+a")
    assert not np.array_equal(images[0], reference(admin_client, ["a"], seed=3)[0])  # b did change it


def test_streamed_generate_equals_the_single_server(channel, admin_client):
    params = dict(BASE, preview_every_n_steps=2, request_id="ray-stream")
    want = list(admin_client.generate_stream(params.pop("prompt"), adapters=["a", "b"], **params))
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    call = stub.Generate(
        generate_request(**BASE, adapters=["a", "b"], preview_every_n_steps=2, request_id="ray-stream")
    )
    got = [event_from_message(message) for message in call]
    assert [type(e) for e in got] == [type(e) for e in want]
    assert [type(e) for e in got][:2] == [Queued, Started] and isinstance(got[-1], Result)
    assert [e.step for e in got if isinstance(e, Progress)] == [1, 2, 3, 4]
    assert [e.step for e in got if isinstance(e, Preview)] == [2]  # none at the last step
    assert {e.request_id for e in got} == {"ray-stream"}
    assert_same(as_arrays(got[-1].images), as_arrays(want[-1].images), "streamed a+b")
    assert got[-1].seed == BASE["seed"] and got[-1].steps == BASE["steps"]
    streamed_on = dict(call.trailing_metadata())[REPLICA_KEY]
    assert streamed_on == once(channel, ["b", "a"])[0]  # a stream and a unary call for one set: one replica


# ---------------------------------------------------------------------------- registry and errors


def test_an_adapter_registered_through_the_ingress_is_served_by_every_replica(
    channel, ray_address, admin_client, adapter_files
):
    with DeftClient(ray_address, timeout=TIMEOUT) as ray_client:
        info = ray_client.register_adapter("c", adapter_files["c"], metadata={"via": "ray"})
        assert info.name == "c" and info.metadata == {"via": "ray"}
        assert [a.name for a in ray_client.list_adapters()] == ["a", "b", "c"]
        assert ray_client.get_adapter("c").sha256 == info.sha256
        with pytest.raises(DeftError) as taken:
            ray_client.register_adapter("c", adapter_files["c"])
        assert taken.value.code is CODE.ALREADY_EXISTS
    assert admin_client.get_adapter("c").metadata == {"via": "ray"}  # the registry is shared
    want = reference(admin_client, ["c"], steps=8)
    results = concurrently(channel, ["c"], 4, steps=8)
    for replica, images in results:
        assert_same(images, want, f"c on {replica}")
    assert len({replica for replica, _ in results}) == 2


def test_errors_keep_their_status_codes(ray_address):
    with DeftClient(ray_address, timeout=TIMEOUT) as client:
        cases = [
            (dict(adapters=["ghost"]), CODE.NOT_FOUND, "ADAPTER_NOT_FOUND", "'ghost'"),
            (dict(adapters=["a", "ghost"]), CODE.NOT_FOUND, "ADAPTER_NOT_FOUND", "'ghost'"),
            (dict(steps=0), CODE.INVALID_ARGUMENT, "INVALID_REQUEST", "num_inference_steps"),
            (dict(width=3), CODE.INVALID_ARGUMENT, "INVALID_REQUEST", "multiples of"),  # from the engine
        ]
        for params, code, reason, text in cases:
            with pytest.raises(DeftError) as unary:
                client.generate("x", **params)
            assert unary.value.code is code and text in unary.value.message, params
            if reason:
                assert unary.value.reason == reason  # the google.rpc.Status details came through
            with pytest.raises(DeftError) as streamed:
                list(client.generate_stream("x", **params))
            assert streamed.value.code is code and text in streamed.value.message, params
        with pytest.raises(DeftError) as missing:
            client.get_adapter("ghost")
        assert missing.value.code is CODE.NOT_FOUND


def _ok_requests(port: int) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "deft_requests_running" in families and "deft_adapters_registered" in families
    return sum(s.value for s in families["deft_requests"].samples if s.labels.get("status") == "ok")


def test_every_replica_exports_its_metrics_on_base_plus_its_rank(channel):
    ports = (METRICS_BASE, METRICS_BASE + 1)
    before = [_ok_requests(port) for port in ports]
    served = [once(channel, [name])[0] for name in ("a", "b", "a", "b")]
    after = [_ok_requests(port) for port in ports]
    assert sum(after) - sum(before) == len(served)  # every request counted once, by the replica that ran it
    assert all(a > 0 for a in after), "both replicas have served requests in this module"


# ---------------------------------------------------------------------------- the config file


def test_the_serve_config_deploys_this_app():
    """deploy/ray/serve_config.yaml is a valid Serve config whose app and gRPC services resolve."""
    import yaml
    from pydantic import ValidationError
    from ray._common.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    path = Path(__file__).resolve().parents[1] / "deploy" / "ray" / "serve_config.yaml"
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert config.grpc_options.grpc_servicer_functions == SERVICE_FUNCTIONS
    assert all(callable(import_attr(name)) for name in SERVICE_FUNCTIONS)
    (app,) = config.applications
    assert app.route_prefix == "/" and import_attr(app.import_path.replace(":", ".")) is build_app
    assert app.args["registry"].startswith("postgresql://") and app.args["num_gpus"] == 1
    built = build_app(app.args)  # settings are checked here, at deploy time, not in every replica
    assert type(built).__name__ == "Application"
    with pytest.raises(ValidationError, match="max_queue"):
        build_app({**app.args, "max_queue": "0"})
    with pytest.raises(ValueError, match="routing='nearest': must be one of affinity, any"):
        build_app({**app.args, "routing": "nearest"})


class _Context:
    """What the ingress uses of Serve's RayServegRPCContext."""

    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self.metadata, self.code, self.details, self.trailing = metadata, None, "", []

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self.metadata

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, metadata: list[tuple[str, str]]) -> None:
        self.trailing = metadata


def test_the_ingress_requires_the_token_when_one_is_set():
    import asyncio

    from deft_server.ray_app import DeftIngress

    class Replicas:  # reached only when the token is right
        def options(self, **kwargs):
            raise AssertionError("an unauthenticated call reached the replicas")

    ingress = DeftIngress(Replicas(), token="s3cret")
    request = generate_request("x", steps=1)
    for metadata in ([], [("authorization", "Bearer wrong")]):
        context = _Context(metadata)
        reply = asyncio.run(ingress.GenerateOnce(request, context))
        assert (
            context.code is CODE.UNAUTHENTICATED
            and "token" in context.details
            and not reply.HasField("result")
        )
    with pytest.raises(AssertionError, match="reached the replicas"):
        asyncio.run(ingress.GenerateOnce(request, _Context([("authorization", "Bearer s3cret")])))
