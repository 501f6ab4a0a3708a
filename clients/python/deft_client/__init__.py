"""deft_client: the Python client of a deft server.

.. code-block:: python

    from deft_client import DeftClient, DeftError

    with DeftClient("127.0.0.1:50051") as c:              # also: token=..., root_certificates=..., timeout=...
        c.register_adapter("dog", "path/to/peft_dir")     # PEFT dir, .safetensors LoRA, or *.deft.safetensors
        images = c.generate("a dog", adapters=[("dog", 1.0)], seed=0, steps=30)
        for event in c.generate_stream("a dog", adapters=["dog"], preview_every_n_steps=5):
            print(event)

Generation parameters are keyword arguments or one :class:`GenerateOptions` (``c.generate("a dog",
GenerateOptions(seed=0, steps=30))``); :meth:`DeftClient.list_adapters` fetches every page,
:meth:`DeftClient.list_adapters_page` one. Every failure raises :class:`DeftError` with ``.code`` (``grpc.StatusCode``) and the server's message.
:class:`AsyncDeftClient` has the same methods for asyncio.
"""

from deft_client.aio import AsyncDeftClient
from deft_client.client import DeftClient
from deft_client.denoiser_only import DroppedLayersWarning
from deft_client.errors import DeftError
from deft_client.results import (
    AdapterInfo,
    AdapterPage,
    GenerationEvent,
    Preview,
    Progress,
    Queued,
    Result,
    Started,
)
from deft_client.wire import GenerateOptions

__all__ = [
    "AdapterInfo",
    "AdapterPage",
    "AsyncDeftClient",
    "DeftClient",
    "DeftError",
    "DroppedLayersWarning",
    "GenerateOptions",
    "GenerationEvent",
    "Preview",
    "Progress",
    "Queued",
    "Result",
    "Started",
]
