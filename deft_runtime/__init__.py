"""deft_runtime: serve many DEFT / PaRa / LoRA adapters per batch on one diffusion base model.

Importing this package needs only the core dependencies (torch, safetensors, diffusers,
transformers); the server, trainer and Triton kernels live behind optional extras.
"""

from deft_runtime.errors import (
    AdapterDtypeError,
    AdapterFormatError,
    AdapterIncompatible,
    AdapterNotFound,
    AdapterShapeError,
    AdapterTooLarge,
    DeftError,
    InvalidAdapter,
    InvalidRequest,
    ModelLoadError,
    NonFiniteAdapter,
    PoolExhausted,
    RankError,
    UnknownTargetModule,
    UnsafeAdapterFormat,
)
from deft_runtime.library_logs import quiet_libraries

quiet_libraries()  # before anything imports diffusers: its first import is when transformers warns

__version__ = "0.1.0"

__all__ = [
    "AdapterDtypeError",
    "AdapterFormatError",
    "AdapterIncompatible",
    "AdapterNotFound",
    "AdapterShapeError",
    "AdapterTooLarge",
    "DeftError",
    "InvalidAdapter",
    "InvalidRequest",
    "ModelLoadError",
    "NonFiniteAdapter",
    "PoolExhausted",
    "RankError",
    "UnknownTargetModule",
    "UnsafeAdapterFormat",
    "__version__",
]
