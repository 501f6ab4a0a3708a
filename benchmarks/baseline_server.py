"""The baseline: ``deft.v1`` served the way users serve adapters today, by a diffusers pipeline with PEFT.

``python -m benchmarks.baseline_server --model tiny-sdxl --port 50061 [--grouped]``

- One pipeline (``deft_runtime.models.load_pipeline``, the model deft serves) and one worker thread.
- Adapters are PEFT directories. Per request the worker makes the request's adapter the active one the
  way users do: ``PeftModel.load_adapter`` if it is not loaded (evicting the least recently used one with
  ``delete_adapter`` beyond ``--max-loaded``), ``set_adapter``, then the pipeline call; requests without
  an adapter run under ``disable_adapter()``.
- Default: one request at a time. ``--grouped``: the worker takes the oldest request plus every queued
  request with the same adapter, steps, size, guidance and negative prompt (up to ``--max-group``
  images) and runs them as one pipeline call with one generator per request.
- Same request semantics as deft: ``seed`` → ``torch.Generator("cpu").manual_seed(seed)``, the same
  defaults, the same request checks and event stream (queued → started → progress per step → result),
  and errors with the same status codes (``deft_server.errors``). The registry lives in memory (files
  in ``--data-dir``) and accepts the uploads the client sends: PEFT DEFT directories (tar) and deft
  files in a mode PEFT implements (relu, qr), which it converts to PEFT directories.

PEFT's DEFT layer applies one set of active adapters to the whole batch, so there is no per-request
adapter inside a batch here: that is what deft adds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import shutil
import signal
import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import torch
from deft_client.proto import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc
from deft_server.config import RequestLimits
from deft_server.convert import adapter_message, event_message, generation_request, result_message
from deft_server.errors import AdapterExists, AdapterInUse
from deft_server.registry import AdapterState
from deft_server.service import EventBridge, abort, mapped_errors
from deft_server.store import AdapterRecord
from deft_server.uploads import ReceivedFile, extract_archive, is_tar, received_upload, validate_name
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from pydantic import ByteSize, TypeAdapter

from deft_runtime.adapter import Adapter, AdapterKind
from deft_runtime.devices import resolve_device, resolve_dtype
from deft_runtime.engine import (
    DeadlineExceeded,
    EngineDraining,
    EventKind,
    GenerationEvent,
    GenerationFailed,
    GenerationRequest,
    GenerationResult,
    QueueFull,
    RequestCancelled,
    RequestHandle,
)
from deft_runtime.engine.families import GenerationDefaults
from deft_runtime.engine.request_state import new_server_id
from deft_runtime.errors import AdapterIncompatible, AdapterNotFound, DeftError, InvalidRequest
from deft_runtime.formats import load_adapter, save_adapter
from deft_runtime.formats.peft import PEFT_WRITABLE_MODES
from deft_runtime.models import load_pipeline

log = logging.getLogger("deft_baseline")
EventCallback = Any  # Callable[[GenerationEvent], None]


# ------------------------------------------------------------------------------------------ registry


@dataclass
class Entry:
    record: AdapterRecord
    path: Path  # the PEFT directory PEFT loads
    in_use: int = 0  # queued or running requests naming it


class BaselineRegistry:
    """Registered adapters (in memory; PEFT directories under ``root``). Thread-safe."""

    def __init__(self, root: Path, linear_shapes: dict[str, tuple[int, int]], max_upload: int) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.linear_shapes = linear_shapes
        self.max_upload = max_upload
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()

    def check_free(self, name: str) -> None:
        if name in self._entries:
            raise AdapterExists(f"an adapter named {name!r} is already registered")

    def register(self, name: str, upload: ReceivedFile, metadata: dict[str, str]) -> AdapterRecord:
        """Unpack or convert ``upload`` into a PEFT directory, check it fits the UNet, keep it (blocking)."""
        validate_name(name)
        self.check_free(name)
        folder = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=self.root))
        try:
            adapter, source = self._read(upload.path, folder)
            self._check_fits(adapter)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        record = AdapterRecord(
            name=name,
            sha256=upload.sha256,
            upload_format="peft_tar" if source == "peft" else "safetensors",
            source_format=source,
            kind=adapter.kind.value,
            decomposition=adapter.decomposition.value if adapter.decomposition else "",
            ranks=tuple(sorted(set(adapter.ranks.values()))),
            target_count=len(adapter.layers),
            size_bytes=upload.size,
            compiled_bytes=0,
            metadata=metadata,
        )
        with self._lock:
            self.check_free(name)
            self._entries[name] = Entry(record, folder)
        return record

    def _read(self, path: Path, folder: Path) -> tuple[Adapter, str]:
        if is_tar(path):
            extract_archive(path, folder, self.max_upload)
            adapter = load_adapter(folder)
            if adapter.kind is AdapterKind.LORA:
                raise AdapterIncompatible(
                    "the baseline's PEFT model holds DEFT adapters; LoRA uploads are not part of this baseline"
                )
            return adapter, "peft"
        adapter = load_adapter(path)
        if adapter.kind is AdapterKind.LORA or adapter.decomposition not in PEFT_WRITABLE_MODES:
            raise AdapterIncompatible(
                "the baseline serves what PEFT's DEFT tuner loads: DEFT/PaRa adapters in the relu or qr "
                f"mode; this file is {adapter.describe()}"
            )
        save_adapter(adapter, folder, format="peft")
        return adapter, "deft"

    def _check_fits(self, adapter: Adapter) -> None:
        for layer, params in adapter.layers.items():
            expected = self.linear_shapes.get(layer)
            if expected is None:
                raise AdapterIncompatible(f"the adapter targets {layer!r}, which is not a Linear of the UNet")
            found = (
                params.P.shape[0] if params.P is not None else expected[0],
                params.R.shape[1] if params.R is not None else expected[1],
            )
            if found != expected:
                raise AdapterIncompatible(
                    f"{layer!r}: the adapter's factors fit a {found[1]} → {found[0]} layer, the UNet's is "
                    f"{expected[1]} → {expected[0]}"
                )

    def get(self, name: str) -> Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise AdapterNotFound(f"no adapter named {name!r} is registered")
        return entry

    def records(self) -> list[AdapterRecord]:
        return sorted((e.record for e in self._entries.values()), key=lambda r: r.name)

    def pin(self, name: str) -> Entry:
        with self._lock:
            entry = self.get(name)
            entry.in_use += 1
            return entry

    def unpin(self, name: str) -> None:
        with self._lock:
            if name in self._entries:
                self._entries[name].in_use -= 1

    def delete(self, name: str) -> Entry:
        with self._lock:
            entry = self.get(name)
            if entry.in_use:
                raise AdapterInUse(f"adapter {name!r} is used by queued or running requests")
            del self._entries[name]
        return entry


# ------------------------------------------------------------------------------------------ PEFT


class PeftAdapters:
    """The adapters PEFT has loaded into the UNet, least recently used first, at most ``max_loaded``."""

    def __init__(self, unet: torch.nn.Module, max_loaded: int) -> None:
        self.unet = unet
        self.max_loaded = max_loaded  # 0: no limit
        self.peft: Any = None  # peft.PeftModel wrapping ``unet`` in place, once an adapter was loaded
        self.loaded: OrderedDict[str, None] = OrderedDict()
        self.loads = 0

    @contextlib.contextmanager
    def active(self, name: str | None, path: Path | None) -> Iterator[None]:
        """Make ``name`` the one active adapter (``None``: adapters disabled) for the block."""
        if name is None:
            with self.peft.disable_adapter() if self.peft is not None else contextlib.nullcontext():
                yield
            return
        assert path is not None
        if name in self.loaded:
            self.loaded.move_to_end(name)
        else:
            self._load(name, path)
        self.peft.set_adapter(name)
        yield

    def _load(self, name: str, path: Path) -> None:
        from peft import PeftModel

        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.unet, path, adapter_name=name, is_trainable=False)
        else:
            self.peft.load_adapter(path, adapter_name=name, is_trainable=False)
        self.loaded[name] = None
        self.loads += 1
        while self.max_loaded and len(self.loaded) > self.max_loaded:
            self.unload(next(iter(self.loaded)))

    def unload(self, name: str) -> None:
        if name in self.loaded and self.peft is not None:
            if len(self.loaded) > 1 and self.peft.active_adapter == name:
                self.peft.set_adapter(next(n for n in self.loaded if n != name))
            self.peft.delete_adapter(name)
            del self.loaded[name]


# ------------------------------------------------------------------------------------------ worker


@dataclass
class Job:
    request: GenerationRequest  # defaults resolved
    on_event: EventCallback
    handle: RequestHandle
    submitted: float
    started: float = 0.0
    adapter: str | None = None
    path: Path | None = None

    def key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one pipeline call."""
        r = self.request
        return (self.adapter, r.num_inference_steps, r.width, r.height, r.guidance_scale, r.negative_prompt)

    def emit(self, event: GenerationEvent) -> None:
        with contextlib.suppress(Exception):
            self.on_event(event)


@dataclass
class WorkerConfig:
    grouped: bool = False
    max_group: int = 8
    max_queue: int = 256
    defaults: tuple[int, int, int, float] = (1024, 1024, 50, 5.0)
    size_multiple: int = 8


class PipelineWorker:
    """One thread running the pipeline: one request per call, or one group of same-adapter requests."""

    def __init__(
        self, pipe: Any, registry: BaselineRegistry, adapters: PeftAdapters, config: WorkerConfig
    ) -> None:
        self.pipe = pipe
        self.registry = registry
        self.adapters = adapters
        self.config = config
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._model = threading.Lock()  # held during a pipeline call: PEFT's adapter set is not thread-safe
        self._stop = False
        self.calls = self.images = 0
        self._thread = threading.Thread(target=self._run, name="baseline-worker", daemon=True)
        self._thread.start()

    # ---- submission (event loop thread)

    def defaults(self) -> GenerationDefaults:
        return GenerationDefaults(*self.config.defaults)

    def submit(self, request: GenerationRequest, on_event: EventCallback) -> RequestHandle:
        request.validate()
        request = self._resolve(request)
        adapter = self._adapter_of(request)
        entry = self.registry.pin(adapter) if adapter else None
        handle = RequestHandle(new_server_id(), request.request_id)
        job = Job(
            request, on_event, handle, time.monotonic(), adapter=adapter, path=entry.path if entry else None
        )
        with self._cv:
            if self._stop or len(self._queue) >= self.config.max_queue:
                if adapter:
                    self.registry.unpin(adapter)
                if self._stop:
                    raise EngineDraining("the server is shutting down and accepts no new requests")
                raise QueueFull(f"the queue is full ({self.config.max_queue} waiting requests); retry later")
            self._queue.append(job)
            position = len(self._queue)
            self._cv.notify()
        job.emit(GenerationEvent(EventKind.QUEUED, request.request_id, queue_position=position))
        return handle

    def _resolve(self, request: GenerationRequest) -> GenerationRequest:
        width, height, steps, guidance = self.config.defaults
        width, height = request.width or width, request.height or height
        m = self.config.size_multiple
        if width % m or height % m:
            raise InvalidRequest(f"width and height must be positive multiples of {m}; got {width}x{height}")
        return replace(
            request,
            width=width,
            height=height,
            num_inference_steps=request.num_inference_steps or steps,
            guidance_scale=request.guidance_scale if request.guidance_scale is not None else guidance,
            seed=request.seed if request.seed is not None else random.randrange(2**63),
            request_id=request.request_id or f"req-{random.randrange(2**32):08x}",
        )

    def _adapter_of(self, request: GenerationRequest) -> str | None:
        if not request.adapters:
            return None
        if len(request.adapters) > 1 or request.adapters[0][1] != 1.0:
            raise InvalidRequest(
                "the baseline serves one adapter per request at weight 1.0 (PEFT's set_adapter); "
                f"got {list(request.adapters)}"
            )
        return request.adapters[0][0]

    def unload(self, name: str) -> None:
        """Drop ``name`` from PEFT between pipeline calls (blocking)."""
        with self._model:
            self.adapters.unload(name)

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout)

    # ---- worker thread

    def _run(self) -> None:
        while True:
            group = self._take()
            if group is None:
                return
            try:
                self._run_group(group)
            finally:
                for job in group:
                    if job.adapter:
                        self.registry.unpin(job.adapter)

    def _take(self) -> list[Job] | None:
        with self._cv:
            while True:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if self._stop:
                    self._fail_queued()
                    return None
                first = self._queue.popleft()
                if self._expired(first):
                    continue
                group = [first]
                if self.config.grouped and first.request.num_images == 1:
                    group += self._same_key(first)
                return group

    def _same_key(self, first: Job) -> list[Job]:
        key, taken = first.key(), list[Job]()
        for job in list(self._queue):
            if 1 + len(taken) >= self.config.max_group:
                break
            if job.key() == key and job.request.num_images == 1 and not job.handle.cancelled:
                self._queue.remove(job)
                taken.append(job)
        return taken

    def _expired(self, job: Job) -> bool:
        """Fail a queued job that was cancelled or ran out of time (its adapter pin is released)."""
        deadline = job.request.deadline_s
        error: Exception | None = None
        if job.handle.cancelled:
            error = RequestCancelled("cancelled while queued")
        elif deadline is not None and time.monotonic() > job.submitted + deadline:
            error = DeadlineExceeded(f"deadline of {deadline}s passed while queued")
        if error is None:
            return False
        self._fail(job, error)
        if job.adapter:
            self.registry.unpin(job.adapter)
        return True

    def _fail_queued(self) -> None:
        while self._queue:
            job = self._queue.popleft()
            self._fail(job, EngineDraining("the server stopped before the request ran"))
            if job.adapter:
                self.registry.unpin(job.adapter)

    def _fail(self, job: Job, error: BaseException) -> None:
        job.emit(GenerationEvent(EventKind.FAILED, job.request.request_id, error=error))
        if not job.handle.future.done():
            job.handle.future.set_exception(error)

    def _run_group(self, group: list[Job]) -> None:
        now = time.monotonic()
        for job in group:
            job.started = now
            total = job.request.num_inference_steps or 0
            job.emit(GenerationEvent(EventKind.STARTED, job.request.request_id, total_steps=total))
        try:
            with self._model, self.adapters.active(group[0].adapter, group[0].path):
                images = self._call_pipeline(group)
        except Exception as e:
            if not isinstance(e, DeftError):
                log.exception("pipeline call failed")
                e = GenerationFailed(f"generation failed: {e!r}")
            for job in group:
                self._fail(job, e)
            return
        self.calls += 1
        self.images += len(images)
        offset = 0
        for job in group:
            n = job.request.num_images
            self._finish(job, images[offset : offset + n])
            offset += n

    def _call_pipeline(self, group: list[Job]) -> list[Any]:
        first = group[0].request
        steps = first.num_inference_steps or 1
        assert all(j.request.seed is not None for j in group)

        def on_step(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            for job in group:
                job.emit(
                    GenerationEvent(EventKind.PROGRESS, job.request.request_id, step=i + 1, total_steps=steps)
                )
            if all(job.handle.cancelled for job in group):
                pipe._interrupt = True  # the SDXL pipeline skips its remaining steps
            return kwargs

        generators = [torch.Generator("cpu").manual_seed(int(j.request.seed or 0)) for j in group]
        single = len(group) == 1
        with torch.no_grad():
            out = self.pipe(
                prompt=first.prompt if single else [j.request.prompt for j in group],
                negative_prompt=(
                    None
                    if first.negative_prompt is None
                    else first.negative_prompt
                    if single
                    else [first.negative_prompt] * len(group)
                ),
                num_images_per_prompt=first.num_images,
                num_inference_steps=steps,
                guidance_scale=first.guidance_scale,
                width=first.width,
                height=first.height,
                generator=generators[0] if single else generators,
                output_type="pil",
                callback_on_step_end=on_step,
            )
        if all(job.handle.cancelled for job in group):
            raise RequestCancelled("cancelled by the client")
        return list(out.images)

    def _finish(self, job: Job, images: list[Any]) -> None:
        now = time.monotonic()
        r = job.request
        result = GenerationResult(
            r.request_id,
            images,
            int(r.seed or 0),
            job.started - job.submitted,
            now - job.submitted,
            int(r.num_inference_steps or 0),
        )
        job.emit(
            GenerationEvent(
                EventKind.RESULT, r.request_id, step=result.steps, total_steps=result.steps, result=result
            )
        )
        if not job.handle.future.done():
            job.handle.future.set_result(result)


# ------------------------------------------------------------------------------------------ servicers


class BaselineGeneration(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, worker: PipelineWorker, limits: RequestLimits) -> None:
        self.worker = worker
        self.limits = limits

    def _submit(self, msg: generation_pb2.GenerateRequest, context: Any) -> tuple[RequestHandle, EventBridge]:
        request = generation_request(msg, self.limits, self.worker.defaults(), context.time_remaining())
        bridge = EventBridge(asyncio.get_running_loop())
        return self.worker.submit(request, bridge), bridge

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[generation_pb2.GenerateEvent]:
        handle = None
        try:
            handle, bridge = self._submit(request, context)
            async for event in bridge.events():
                message = await asyncio.to_thread(event_message, event)
                if message is not None:
                    yield message
        except (asyncio.CancelledError, GeneratorExit, grpc.aio.AbortError):
            raise
        except Exception as e:
            await abort(context, e)
        finally:
            if handle is not None and not handle.future.done():
                handle.cancel()

    @mapped_errors
    async def GenerateOnce(
        self, request: generation_pb2.GenerateRequest, context: Any
    ) -> generation_pb2.GenerateResponse:
        handle = None
        try:
            handle, _ = self._submit(request, context)
            result = await asyncio.wrap_future(handle.future)
            message = await asyncio.to_thread(result_message, result)
            return generation_pb2.GenerateResponse(request_id=result.request_id, result=message)
        finally:
            if handle is not None and not handle.future.done():
                handle.cancel()


class BaselineAdapters(adapters_pb2_grpc.AdapterServiceServicer):
    def __init__(self, registry: BaselineRegistry, adapters: PeftAdapters, worker: PipelineWorker) -> None:
        self.registry = registry
        self.adapters = adapters
        self.worker = worker

    def _message(self, record: AdapterRecord) -> adapters_pb2.Adapter:
        state = AdapterState.RESIDENT if record.name in self.adapters.loaded else AdapterState.READY
        return adapter_message(record, state, "")

    @mapped_errors
    async def RegisterAdapter(self, request_iterator: Any, context: Any) -> adapters_pb2.Adapter:
        registry = self.registry
        async with received_upload(
            request_iterator, registry.tmp, registry.max_upload, registry.check_free
        ) as (header, received):
            record = await asyncio.to_thread(registry.register, header.name, received, dict(header.metadata))
        return self._message(record)

    async def ListAdapters(self, request: Any, context: Any) -> adapters_pb2.ListAdaptersResponse:
        return adapters_pb2.ListAdaptersResponse(adapters=[self._message(r) for r in self.registry.records()])

    @mapped_errors
    async def GetAdapter(self, request: Any, context: Any) -> adapters_pb2.Adapter:
        return self._message(self.registry.get(request.name).record)

    @mapped_errors
    async def DeleteAdapter(self, request: Any, context: Any) -> adapters_pb2.DeleteAdapterResponse:
        entry = self.registry.delete(request.name)
        await asyncio.to_thread(self.worker.unload, request.name)
        shutil.rmtree(entry.path, ignore_errors=True)
        return adapters_pb2.DeleteAdapterResponse()


# ------------------------------------------------------------------------------------------ process


@dataclass(frozen=True)
class BaselineSettings:
    model: str = "tiny-sdxl"
    host: str = "127.0.0.1"
    port: int = 50061
    data_dir: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    grouped: bool = False
    max_group: int = 8
    max_loaded: int = 16
    max_queue: int = 256
    max_upload_size: int = 1 << 30
    limits: RequestLimits = field(
        default_factory=lambda: RequestLimits(
            max_pixels=2048 * 2048,
            max_steps=150,
            max_images=8,
            max_prompt_chars=4000,
            max_adapters=4,
            max_adapter_weight=10.0,
        )
    )


def linear_shapes(module: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {
        name: (m.out_features, m.in_features)
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def build_worker(
    settings: BaselineSettings, data_dir: Path
) -> tuple[PipelineWorker, BaselineRegistry, PeftAdapters]:
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    pipe = load_pipeline(settings.model, torch_dtype=dtype, device=device)
    registry = BaselineRegistry(data_dir, linear_shapes(pipe.unet), settings.max_upload_size)
    adapters = PeftAdapters(pipe.unet, settings.max_loaded)
    size = int(pipe.default_sample_size * pipe.vae_scale_factor)
    config = WorkerConfig(
        grouped=settings.grouped,
        max_group=settings.max_group,
        max_queue=settings.max_queue,
        defaults=(size, size, 50, 5.0),  # diffusers' SDXL defaults, as deft's SDXL family uses them
        size_multiple=int(pipe.vae_scale_factor),
    )
    return PipelineWorker(pipe, registry, adapters, config), registry, adapters


async def serve(settings: BaselineSettings) -> int:
    data_dir = settings.data_dir or Path(tempfile.mkdtemp(prefix="deft-baseline-"))
    worker, registry, adapters = await asyncio.to_thread(build_worker, settings, data_dir)
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", 16 << 20), ("grpc.so_reuseport", 0)]
    )
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(
        BaselineGeneration(worker, settings.limits), server
    )
    adapters_pb2_grpc.add_AdapterServiceServicer_to_server(
        BaselineAdapters(registry, adapters, worker), server
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"{settings.host}:{settings.port}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    mode = (
        f"grouped (up to {settings.max_group} images per call)"
        if settings.grouped
        else "one request at a time"
    )
    log.info("baseline serving %s on %s:%d, %s", settings.model, settings.host, settings.port, mode)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await health.enter_graceful_shutdown()
    await server.stop(grace=5)
    await asyncio.to_thread(worker.shutdown)
    log.info(
        "stopped after %d pipeline calls, %d images, %d PEFT adapter loads",
        worker.calls,
        worker.images,
        adapters.loads,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.baseline_server", description=__doc__)
    p.add_argument("--model", default="tiny-sdxl")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50061)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--grouped", action="store_true", help="batch queued requests that share an adapter")
    p.add_argument("--max-group", type=int, default=8, help="images per pipeline call when grouped")
    p.add_argument("--max-loaded", type=int, default=16, help="adapters kept loaded in PEFT (0: all)")
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--max-upload-size", default="1GiB")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = BaselineSettings(
        model=args.model,
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        device=args.device,
        dtype=args.dtype,
        grouped=args.grouped,
        max_group=args.max_group,
        max_loaded=args.max_loaded,
        max_queue=args.max_queue,
        max_upload_size=int(TypeAdapter(ByteSize).validate_python(args.max_upload_size)),
    )
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    raise SystemExit(main())
