import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UploadFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPLOAD_FORMAT_UNSPECIFIED: _ClassVar[UploadFormat]
    UPLOAD_FORMAT_SAFETENSORS: _ClassVar[UploadFormat]
    UPLOAD_FORMAT_PEFT_TAR: _ClassVar[UploadFormat]

class AdapterState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_STATE_UNSPECIFIED: _ClassVar[AdapterState]
    ADAPTER_STATE_READY: _ClassVar[AdapterState]
    ADAPTER_STATE_RESIDENT: _ClassVar[AdapterState]
    ADAPTER_STATE_INCOMPATIBLE: _ClassVar[AdapterState]
UPLOAD_FORMAT_UNSPECIFIED: UploadFormat
UPLOAD_FORMAT_SAFETENSORS: UploadFormat
UPLOAD_FORMAT_PEFT_TAR: UploadFormat
ADAPTER_STATE_UNSPECIFIED: AdapterState
ADAPTER_STATE_READY: AdapterState
ADAPTER_STATE_RESIDENT: AdapterState
ADAPTER_STATE_INCOMPATIBLE: AdapterState

class AdapterUpload(_message.Message):
    __slots__ = ("name", "format", "metadata", "size_bytes", "sha256", "public", "file_name")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_FIELD_NUMBER: _ClassVar[int]
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    format: UploadFormat
    metadata: _containers.ScalarMap[str, str]
    size_bytes: int
    sha256: str
    public: bool
    file_name: str
    def __init__(self, name: _Optional[str] = ..., format: _Optional[_Union[UploadFormat, str]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., public: _Optional[bool] = ..., file_name: _Optional[str] = ...) -> None: ...

class RegisterAdapterChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: AdapterUpload
    data: bytes
    def __init__(self, header: _Optional[_Union[AdapterUpload, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Adapter(_message.Message):
    __slots__ = ("name", "kind", "decomposition", "ranks", "target_count", "size_bytes", "sha256", "created_at", "state", "source_format", "metadata", "compiled_bytes", "state_reason", "owner")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DECOMPOSITION_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    TARGET_COUNT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    COMPILED_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_REASON_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    decomposition: str
    ranks: _containers.RepeatedScalarFieldContainer[int]
    target_count: int
    size_bytes: int
    sha256: str
    created_at: _timestamp_pb2.Timestamp
    state: AdapterState
    source_format: str
    metadata: _containers.ScalarMap[str, str]
    compiled_bytes: int
    state_reason: str
    owner: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., decomposition: _Optional[str] = ..., ranks: _Optional[_Iterable[int]] = ..., target_count: _Optional[int] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[AdapterState, str]] = ..., source_format: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., compiled_bytes: _Optional[int] = ..., state_reason: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "next_page_token")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[Adapter]
    next_page_token: str
    def __init__(self, adapters: _Optional[_Iterable[_Union[Adapter, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteAdapterRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
