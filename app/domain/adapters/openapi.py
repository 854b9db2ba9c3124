"""The upload's multipart body in the OpenAPI schema: the handler reads the raw stream, so Litestar
cannot infer it, and clients (and schema-driven fuzzers) need to see the three fields."""

from __future__ import annotations

from dataclasses import dataclass

from litestar.enums import RequestEncodingType
from litestar.openapi.spec import OpenAPIFormat, OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema

from app.domain.adapters.service import NAME_RULE


def _upload_body() -> RequestBody:
    def binary(description: str) -> Schema:
        return Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY, description=description)

    form = Schema(
        type=OpenAPIType.OBJECT,
        required=["name", "adapter_config", "weights"],
        properties={
            "name": Schema(
                type=OpenAPIType.STRING, pattern="^[a-z0-9][a-z0-9._-]{0,63}$", description=NAME_RULE
            ),
            "adapter_config": binary("PEFT's adapter_config.json"),
            "weights": binary("adapter_model.safetensors (never .bin/.pt: pickles are refused)"),
        },
    )
    return RequestBody(
        required=True,
        content={RequestEncodingType.MULTI_PART.value: OpenAPIMediaType(schema=form)},
    )


@dataclass
class UploadOperation(Operation):
    def __post_init__(self) -> None:
        self.request_body = _upload_body()
