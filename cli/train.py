"""``deft train``: the option groups → one ``TrainConfig`` → :func:`deft_runtime.train.loop.train`,
and with ``--register NAME`` the upload to a server (checked before training, over the shared
connection options).

Nothing heavy is imported here (``deft --help`` must stay fast); the trainer loads when the command
runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deft_cli.connection import Connection
from deft_cli.console import console, fail
from deft_cli.options import with_options
from deft_cli.train_options import TrainOptions, build_config


@with_options(**TrainOptions.GROUPS, connection=Connection)
def train_command(connection: Connection, **groups: Any) -> None:
    """Fine-tune a DEFT / PaRa / LoRA adapter on a few images of a concept (DreamBooth-style).

    Paper defaults: rank 4 for personalization (rank 32 for general tasks), lr 5e-5 and 500 steps for SDXL personalization, P and H at lr × 0.1.

    Writes OUT/adapter.deft.safetensors (always), OUT/peft/ (deft relu/qr and para qr without a gate: loads with PeftModel.from_pretrained), OUT/training.json and OUT/train_log.jsonl. Checkpoints, the live log and validation samples go to the run directory (OUT.run); a crashed run never leaves OUT behind.
    """
    from deft_runtime.errors import DeftError

    options = TrainOptions(**groups)
    name = options.run.register
    try:
        config = build_config(options)
        if name is not None:
            _check_server(name, connection)  # fail before hours of training, not after
        from deft_runtime.train.loop import train

        result = train(config, progress=options.run.progress, report=print)
    except DeftError as e:
        raise fail(e) from e
    console.print(f"wrote {result.out} ({', '.join(str(f) for f in result.files)})", soft_wrap=True)
    if name is not None:
        info = _register(name, connection, result.out / "adapter.deft.safetensors")
        console.print(
            f"registered {info.name!r} on {connection.address}: {info.kind}, sha256 {info.sha256}",
            soft_wrap=True,
        )


def _check_server(name: str, connection: Connection) -> None:
    """The name is valid, the server answers and accepts the credentials, and does not hold the name."""
    from deft_runtime.errors import InvalidRequest
    from deft_runtime.names import check_adapter_name

    try:
        check_adapter_name(name)
    except InvalidRequest as e:
        raise fail(f"--register: {e}") from e
    with connection.client() as client:
        from deft_client import DeftError as ClientError

        try:
            client.wait_ready(timeout=3)
            existing = {a.name for a in client.list_adapters()}
        except ClientError as e:
            raise fail(connection.explain(e)) from e
    if name in existing:
        raise fail(
            f"the server at {connection.address} already has an adapter named {name!r}; "
            "delete it or pick another name"
        )


def _register(name: str, connection: Connection, path: Path) -> Any:
    from deft_client import DeftError as ClientError

    with connection.client() as client:
        try:
            return client.register_adapter(name, path, metadata={"source": "deft train"})
        except ClientError as e:
            raise fail(
                f"training succeeded ({path}) but registering it failed: {connection.explain(e)}"
            ) from e
