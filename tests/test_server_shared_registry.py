"""Two real ``deft serve`` replicas sharing one PostgreSQL registry (``--registry postgresql://…``).

What a replica fleet needs: an adapter registered on one replica is served by the other at once, a
deletion anywhere stops it everywhere, each replica keeps its own caches, and a bad or unreachable
registry URL stops the server at start-up with a message that says what to fix.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from conftest import DEFT_EXECUTABLE, ROOT, free_port
from deft_client import DeftClient, DeftError
from grpc import StatusCode

from deft_runtime.adapter import AdapterKind
from deft_runtime.formats import save_adapter
from deft_runtime.testing import random_adapter

pytestmark = pytest.mark.slow

SHAPES = {
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64),
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v": (64, 80),
}


@pytest.fixture(scope="module")
def replicas(server_factory, make_postgres_db, tmp_path_factory):
    url = make_postgres_db()
    one = server_factory.start("--registry", url)
    two = server_factory.start("--registry", url)
    return url, one, two


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapters") / "dog.deft.safetensors"
    save_adapter(random_adapter(AdapterKind.DEFT, SHAPES, rank=2, seed=3, magnitude=2.0), path)
    return path


def _pixels(images) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for image in images]


def test_a_registration_on_one_replica_is_served_by_the_other(replicas, adapter_file):
    _, one, two = replicas
    with DeftClient(one.address) as a, DeftClient(two.address) as b:
        a.register_adapter("dog", adapter_file, metadata={"owner": "fleet"})
        assert [info.name for info in b.list_adapters()] == ["dog"]
        assert b.get_adapter("dog").metadata == {"owner": "fleet"}
        request = {"adapters": ["dog"], "seed": 11, "steps": 3}
        on_two, on_one = b.generate("a dog", **request), a.generate("a dog", **request)
        assert all(np.array_equal(x, y) for x, y in zip(_pixels(on_one), _pixels(on_two), strict=True))
        plain = _pixels(b.generate("a dog", seed=11, steps=3))
        assert not np.array_equal(plain[0], _pixels(on_two)[0])  # the adapter did change the image

        with pytest.raises(DeftError) as taken:
            b.register_adapter("dog", adapter_file)
        assert taken.value.code is StatusCode.ALREADY_EXISTS

        b.delete_adapter("dog")  # deleted on two: one stops serving it at once
        with pytest.raises(DeftError) as gone:
            a.generate("a dog", **request)
        assert gone.value.code is StatusCode.NOT_FOUND and "'dog'" in gone.value.message
        assert a.list_adapters() == []
    for server in (one, two):
        assert "adapter registry: postgresql://deft@127.0.0.1" in server.log()


def _serve(tmp_path, *flags: str) -> subprocess.CompletedProcess[str]:
    command = [str(DEFT_EXECUTABLE), "serve", "--port", str(free_port()), "--metrics-port", "0"]
    command += ["--http-port", "0", "--data-dir", str(tmp_path), *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)


def test_bad_registry_urls_stop_the_server_with_a_clear_message(tmp_path):
    wrong_scheme = _serve(tmp_path, "--registry", "mysql://u:pw@localhost/db")
    assert wrong_scheme.returncode == 2
    assert "--registry" in wrong_scheme.stderr and "postgresql://" in wrong_scheme.stderr
    unreachable = _serve(tmp_path, "--registry", f"postgresql://deft:s3cret@127.0.0.1:{free_port()}/x")
    assert unreachable.returncode == 1, unreachable.stderr
    assert "cannot connect to the registry database postgresql://deft:***@127.0.0.1" in unreachable.stderr
    assert "s3cret" not in unreachable.stderr + unreachable.stdout
    assert "loading model" not in unreachable.stderr  # it failed before spending time on the model
