"""Building request messages: generation parameters (input images encoded), and adapter uploads
streamed in chunks."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from PIL import Image

from deft_client.proto import adapters_pb2, generation_pb2

CHUNK_BYTES = 256 << 10
#: ``[("name", 1.0), "other"]`` or ``{"name": 1.0}``: a bare name means weight 1.0.
Adapters = Sequence[tuple[str, float] | str] | Mapping[str, float]
#: an input image or mask: a PIL image (sent as PNG), a file path or the bytes of a PNG/JPEG/WebP file
ImageSource = Image.Image | str | os.PathLike[str] | bytes | bytearray | memoryview


def image_bytes(source: ImageSource) -> bytes:
    """The bytes to send for ``source``: a PIL image PNG-encoded, a file's bytes as they are."""
    if isinstance(source, Image.Image):
        buffer = io.BytesIO()
        source.save(buffer, format="PNG")
        return buffer.getvalue()
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        return Path(source).expanduser().read_bytes()
    raise TypeError(f"an input image must be a PIL image, a file path or bytes, not {type(source).__name__}")


def images_bytes(images: Sequence[ImageSource] | ImageSource) -> list[bytes]:
    """``images`` (one source, or a sequence of them) as the bytes to send, in order."""
    if isinstance(images, (Image.Image, str, os.PathLike, bytes, bytearray, memoryview)):
        return [image_bytes(images)]
    return [image_bytes(image) for image in images]


def adapter_refs(adapters: Adapters | None) -> list[generation_pb2.AdapterRef]:
    if adapters is None:
        return []
    pairs = adapters.items() if isinstance(adapters, Mapping) else adapters
    refs = []
    for item in pairs:
        name, weight = (item, 1.0) if isinstance(item, str) else item
        refs.append(generation_pb2.AdapterRef(name=name, weight=float(weight)))
    return refs


@dataclass(frozen=True)
class GenerateOptions:
    """Everything of a generation request but its prompt; None leaves a parameter to the base model's
    default. The client's ``generate*`` methods take these fields as keyword arguments too."""

    negative_prompt: str | None = None
    adapters: Adapters | None = None
    seed: int | None = None
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    guidance_scale: float | None = None
    num_images: int | None = None
    preview_every_n_steps: int | None = None
    #: a label for the caller's own logs, echoed in every event (at most 128 characters)
    request_id: str = ""
    #: image-conditioned generation: SDXL takes one image (img2img; inpainting with ``mask``), OmniGen
    #: the images its prompt references as ``<img><|image_1|></img>``, ... (see :data:`ImageSource`)
    images: Sequence[ImageSource] | ImageSource = ()
    #: SDXL inpainting: white pixels are repainted, black ones kept; the size of the input image
    mask: ImageSource | None = None
    #: SDXL img2img and inpainting: how much of the input image is re-noised, in (0, 1]
    strength: float | None = None
    #: OmniGen with input images: how strongly to follow them (the server's default: 1.6)
    image_guidance_scale: float | None = None

    def message(self, prompt: str) -> generation_pb2.GenerateRequest:
        """The ``GenerateRequest``; every None stays unset, so the server uses the model's default."""
        return generation_pb2.GenerateRequest(  # a None argument leaves its `optional` field unset
            request_id=self.request_id,
            prompt=prompt,
            negative_prompt=self.negative_prompt,
            adapters=adapter_refs(self.adapters),
            width=self.width,
            height=self.height,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
            num_images=self.num_images,
            preview_every_n_steps=self.preview_every_n_steps,
            input_images=images_bytes(self.images),
            mask_image=None if self.mask is None else image_bytes(self.mask),
            strength=self.strength,
            image_guidance_scale=self.image_guidance_scale,
        )


def generate_request(
    prompt: str, options: GenerateOptions | None = None, **params: Any
) -> generation_pb2.GenerateRequest:
    """The ``GenerateRequest`` of ``options``, with ``params`` (fields of :class:`GenerateOptions`)
    replacing theirs; an unknown keyword raises TypeError."""
    chosen = replace(options, **params) if options is not None else GenerateOptions(**params)
    return chosen.message(prompt)


def _pack_directory(directory: Path, out: IO[bytes]) -> None:
    """A PEFT directory as an uncompressed tar of its top-level files (what the server accepts)."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{directory} has no files to upload")
    with tarfile.open(fileobj=out, mode="w") as archive:
        for path in files:
            archive.add(path, arcname=path.name, recursive=False)


@contextmanager
def upload_source(path: str | os.PathLike[str]) -> Iterator[tuple[IO[bytes], int]]:
    """An open binary file to upload for ``path`` (a directory is packed into a temporary tar first)."""
    path = Path(path).expanduser()
    if path.is_dir():
        with tempfile.TemporaryFile() as packed:
            _pack_directory(path, packed)
            size = packed.tell()
            packed.seek(0)
            yield packed, size
    else:
        with path.open("rb") as f:
            yield f, path.stat().st_size


def _upload_format(path: Path) -> adapters_pb2.UploadFormat:
    if path.is_dir() or path.name.endswith((".tar", ".tar.gz", ".tgz")):
        return adapters_pb2.UPLOAD_FORMAT_PEFT_TAR
    if path.suffix == ".safetensors":
        return adapters_pb2.UPLOAD_FORMAT_SAFETENSORS
    return adapters_pb2.UPLOAD_FORMAT_UNSPECIFIED  # let the server look at the bytes


def upload_chunks(
    name: str,
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    public: bool = False,
    file_name: str = "",
) -> Iterator[adapters_pb2.RegisterAdapterChunk]:
    """The ``RegisterAdapter`` stream for ``path`` (a file or a PEFT directory): a header with size,
    sha256 and ``file_name`` (how the server's messages name the upload), then the bytes."""
    with upload_source(path) as (source, size):
        digest = hashlib.sha256()
        while block := source.read(1 << 20):
            digest.update(block)
        header = adapters_pb2.AdapterUpload(
            name=name,
            format=_upload_format(Path(path)),
            metadata=dict(metadata or {}),
            size_bytes=size,
            sha256=digest.hexdigest(),
            public=public,
            file_name=file_name,
        )
        yield adapters_pb2.RegisterAdapterChunk(header=header)
        source.seek(0)
        while block := source.read(CHUNK_BYTES):
            yield adapters_pb2.RegisterAdapterChunk(data=block)
