"""What the daemon shows of a VM and its events: the view models the REST API answers with and
the typed client returns, shared so that both sides read the same fields.

A view is validated from the JSON the daemon builds (typed fields for what a program reads:
``vm.metadata.name``, ``vm.status.state``, ``vm.status.conditions["Booted"].status``) and
keeps that JSON exactly as it was: :meth:`View.to_json` and serializing it (FastAPI's response
encoding) give it back key for key, so ``-o json`` and the wire format never change with the
model. Unknown members are kept too (a newer daemon's status fields); reading a view like the
JSON (``vm["status"]``, ``vm.get("status")``) is the old dict interface, kept for scripts.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    JsonValue,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

__all__ = ["ConditionView", "View", "VmEvent", "VmMeta", "VmStatus", "VmView"]


class View(BaseModel):
    """A read-only view over one JSON object, which it keeps as it was given."""

    model_config = ConfigDict(
        extra="allow", frozen=True, alias_generator=to_camel, populate_by_name=True,
    )  # fmt: skip
    _json: dict[str, JsonValue] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_json(cls, data: object, handler: ValidatorFunctionWrapHandler) -> Any:
        """Validate, keeping the JSON as given. A member of the wrong type (a status written by
        an older or newer runner, a damaged status file) is left out of the typed fields (it
        stays in the JSON), never fails the view: one VM's odd status must not make a list of
        every VM fail. A required member that is missing or wrong still fails it."""
        try:
            view = handler(data)
        except ValidationError as exc:
            if not isinstance(data, Mapping):
                raise
            wrong = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
            kept = {k: v for k, v in data.items() if k not in wrong}
            if len(kept) == len(data):
                raise
            view = handler(kept)
        if isinstance(data, Mapping) and isinstance(view, View):
            view._json = copy.deepcopy(dict(data))
        return view

    @model_serializer(mode="wrap")
    def _as_given(self, handler: SerializerFunctionWrapHandler) -> Any:
        return copy.deepcopy(self._json) if self._json else handler(self)

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        """The fields' schema in both modes: a view serializes to the JSON it validated, so
        its serializer's ``Any`` would hide the shape from the OpenAPI document."""
        return handler(_without_serializer(core_schema))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Any:
        return cls.model_validate(data)

    def to_json(self) -> dict[str, Any]:
        """The JSON object as the daemon sent it (a copy: changing it changes no view)."""
        return copy.deepcopy(self._json) if self._json else self.model_dump(by_alias=True)

    def __getitem__(self, key: str) -> Any:
        return self._json[key]

    def __contains__(self, key: object) -> bool:
        return key in self._json

    def get(self, key: str, default: Any = None) -> Any:
        return self._json.get(key, default)


def _without_serializer(schema: CoreSchema) -> CoreSchema:
    inner = schema.get("schema")
    stripped: dict[str, Any] = {k: v for k, v in schema.items() if k != "serialization"}
    if isinstance(inner, dict):
        stripped["schema"] = _without_serializer(cast(CoreSchema, inner))
    return cast(CoreSchema, stripped)


def _empty_if_null(value: object, empty: type[list[Any]] | type[dict[str, Any]]) -> object:
    return empty() if value is None else value


class ConditionView(View):
    """One condition (``Booted``, ``AgentConnected``, ``DisplayConnected``)."""

    status: bool
    reason: str | None = None
    since: str | None = None
    message: str | None = None


class VmStatus(View):
    """Where the VM is: the runner's status plus the manager's (desired state, observed
    generation, backend, last error)."""

    state: str | None = None
    desired_state: str | None = None
    observed_generation: int | None = None
    backend: str | None = None
    conditions: dict[str, ConditionView] = Field(default_factory=dict)
    pid: int | None = None
    accelerator: str | None = None
    cpus: int | None = None
    ram: int | None = None
    cdrom: dict[str, str | None] = Field(default_factory=dict)
    ips: list[str] = Field(default_factory=list)
    pending_restart: list[str] = Field(default_factory=list)
    config_error: str | None = None
    last_error: str | None = None
    stopped_by: str | None = None
    restarts: int | None = None
    exit: dict[str, JsonValue] | None = None
    updated_at: str | None = None

    @field_validator("conditions", "cdrom", mode="before")
    @classmethod
    def _no_dict(cls, value: object) -> object:
        return _empty_if_null(value, dict)

    @field_validator("ips", "pending_restart", mode="before")
    @classmethod
    def _no_list(cls, value: object) -> object:
        return _empty_if_null(value, list)


class VmMeta(View):
    name: str
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    creation_timestamp: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("labels", "annotations", mode="before")
    @classmethod
    def _no_dict(cls, value: object) -> object:
        return _empty_if_null(value, dict)


class VmView(View):
    """A VM as the API shows it: its document (metadata with identity, spec) and status."""

    metadata: VmMeta
    spec: dict[str, JsonValue] = Field(default_factory=dict)
    status: VmStatus = Field(default_factory=VmStatus)

    @field_validator("spec", "status", mode="before")
    @classmethod
    def _no_dict(cls, value: object) -> object:
        return _empty_if_null(value, dict)

    @property
    def name(self) -> str:
        return self.metadata.name


class VmEvent(View):
    """One event (``/v1/events``): its id, the VM (or image) it is about, when, what; the
    rest of its members are the event's own."""

    id: int | None = None
    vm: str | None = None
    time: str | None = None
    event: str
