"""The router's settings: defaults, a TOML file, command-line overrides.

A file (``instgenie router --config router.toml``) uses the field names of
:class:`RouterConfig` as keys::

    instances = ["dns:instgenie-triton.default.svc.cluster.local:8001"]
    policy = "mask_aware"
    grpc_port = 8101
    scrape_interval_s = 0.5

Values given on the command line win over the file's.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

__all__ = ["RouterConfig"]


@dataclass
class RouterConfig:
    """Everything ``instgenie router`` is told.

    ``instances``: ``HOST:GRPC_PORT[:HTTP_PORT[:METRICS_PORT]]`` for a fixed instance,
    ``dns:NAME:GRPC_PORT[...]`` for every address ``NAME`` resolves to, re-resolved every
    ``discovery_interval_s`` (a Kubernetes headless Service: pods join without a restart).
    """

    instances: list[str] = field(default_factory=list)
    policy: str = "mask_aware"
    host: str = "127.0.0.1"  # as `instgenie serve`: other machines only when told (--host 0.0.0.0)
    grpc_port: int = 8101
    http_port: int = 8100
    metrics_port: int = 8102
    scrape_interval_s: float = 0.5
    stale_after_s: float = 3.0
    discovery_interval_s: float = 5.0
    max_in_flight: int = 256
    request_timeout_s: float = 600.0
    remembered_registrations: int = 256  # replayed on instances that join later
    # The OpenAI endpoint (/v1/images/edits): a form's size, the images one asks for
    # (``n``), and the pixels of an upload (the instances' own default limit).
    max_upload_bytes: int = 64 * 1024 * 1024
    max_images_per_request: int = 4
    max_image_pixels: int = 2048 * 2048

    @classmethod
    def build(cls, file: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> "RouterConfig":
        """Defaults, then ``file``'s values, then ``overrides`` (those not ``None``).

        Raises:
            ValueError: an unknown key, a value of the wrong type, or no instances at all.
        """
        values: dict[str, Any] = {}
        if file is not None:
            with open(file, "rb") as handle:
                try:
                    values.update(tomllib.load(handle))
                except tomllib.TOMLDecodeError as exc:
                    raise ValueError(f"router config {file}: {exc}") from exc
        values.update({key: value for key, value in (overrides or {}).items() if value is not None})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"unknown router setting(s) {unknown}; known: {sorted(fields)}")
        if isinstance(values.get("instances"), str):
            values["instances"] = values["instances"].split(",")
        if "instances" in values:
            values["instances"] = [spec.strip() for spec in values["instances"] if spec.strip()]
        for name, value in values.items():
            expected = {"list[str]": list, "str": str, "int": int, "float": (int, float)}[str(fields[name].type)]
            if not isinstance(value, expected) or isinstance(value, bool):
                raise ValueError(f"router setting {name} = {value!r}: expected {fields[name].type}")
        config = cls(**values)
        if not config.instances:
            raise ValueError("the router needs instances: --instances HOST:GRPC_PORT,... or dns:NAME:GRPC_PORT")
        return config
