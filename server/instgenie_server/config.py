"""Typed ``config.pbtxt`` parameters of the InstGenIE Triton models."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch

from instgenie import EngineLimits
from instgenie.auto_register import AutoRegisterConfig
from instgenie.cache import CacheMode
from instgenie.cache.planner import CostModel
from instgenie.scheduler import SchedulerConfig


_SWITCHES = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}


@dataclass(frozen=True)
class ModelParameters:
    """Every knob a model reads from its ``parameters { key: ... }`` entries.

    Sizes are bytes, times seconds. Empty strings in the config mean "default".
    """

    model_dir: str = ""
    device: str = "cpu"
    dtype: str = "float32"
    max_sequence_length: int = 512
    max_active: int = 8  # requests stepping together
    max_waiting: int = 64  # accepted but not stepping; beyond: queue_full
    max_batch_tokens: int = 0  # rows x longest row per step; 0 = unbounded
    max_padding_waste: float = 0.25  # split a step into calls of similar token counts; < 0 = one call
    workers: int = 4  # pre/post-processing threads (they mostly wait on the codec processes)
    codec_workers: int = 1  # processes for prompt encoding and VAE work; 0 = in the model's process
    codec_nice: int = 10  # their CPU priority offset
    # After a step, wait up to this long for one busy helper job (prepare/finish) to end:
    # on a CPU the loop and the codec share the cores. "auto": 1 s on a CPU, 0 (never) on a GPU.
    yield_to_helpers_s: str = "auto"
    # Responses and cancellation queries from one thread of their own
    # (instgenie_server.outbox): "auto" = on a GPU; on a few-core CPU a third busy thread
    # preempts the loop's OpenMP team and costs more than the round trips it moves.
    outbox: str = "auto"
    # Each custom-metric update and each is_cancelled query is a round trip to the server:
    # metric updates are batched and sent this often by a thread of their own
    # (instgenie_server.metric_batching; 0 = each at once, on the reporting thread), and a
    # request's cancellation is asked at most this often (0 = every step).
    metrics_flush_s: float = 0.2
    cancel_poll_s: float = 0.1
    cache_budget_bytes: int = 0  # template K/V kept in host memory; 0 = unbounded
    cache_dir: str = ""  # disk tier (every recorded template, survives restarts); empty = host memory only
    cache_mode: str = "float32"  # float32 | bfloat16, optionally ",unmasked" and ",input" (see instgenie.cache.CacheMode)
    prefetch_lookahead: int = 2  # cache steps read from disk ahead of the step computing
    cost_model: str = ""  # costs.json from `instgenie profile`: plan recomputed blocks; empty = load every block
    max_pixels: int = EngineLimits.max_pixels
    max_steps: int = EngineLimits.max_steps
    drain_timeout_s: float = 60.0  # finalize() lets in-flight requests finish this long
    sparse_convs: str = ""  # UNet families: "on" = design (c), "off" = (b); empty = the family's default
    auto_register: str = "second_sight"  # raw images edited again become templates: off | second_sight | always
    auto_register_max: int = 64  # auto-registered templates kept (least recently used dropped first)

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> "ModelParameters":
        """From the ``args`` Triton passes to ``initialize``."""
        config = json.loads(args["model_config"])
        raw = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
        return cls.from_strings(raw)

    @classmethod
    def from_strings(cls, raw: Mapping[str, str]) -> "ModelParameters":
        values: dict[str, Any] = {}
        for field in fields(cls):
            text = raw.get(field.name, "").strip()
            if text:
                kind = type(getattr(cls, field.name))
                values[field.name] = kind(text)
        unknown = set(raw) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown model parameters: {', '.join(sorted(unknown))}")
        params = cls(**values)
        if not params.model_dir:
            raise ValueError("parameter model_dir is empty: point it at a diffusers pipeline folder (instgenie serve --model)")
        for name in ("metrics_flush_s", "cancel_poll_s"):
            if getattr(params, name) < 0:
                raise ValueError(f"parameter {name} must be >= 0 seconds, got {getattr(params, name)}")
        return params

    @property
    def family_options(self) -> dict[str, Any]:
        """Keyword arguments of the family adapter (see ``Engine.from_pretrained``)."""
        switch = self.sparse_convs.lower()
        if not switch:
            return {}
        if switch not in _SWITCHES:
            raise ValueError(f"parameter sparse_convs must be on or off, got {self.sparse_convs!r}")
        return {"sparse_convs": _SWITCHES[switch]}

    @property
    def auto_register_config(self) -> AutoRegisterConfig:
        """The step loop's auto-registration (:mod:`instgenie.auto_register`); raises ``ValueError``."""
        return AutoRegisterConfig(policy=self.auto_register, max_templates=self.auto_register_max)

    @property
    def _on_cpu(self) -> bool:
        """Serving threads share the cores with the compute (the two ``auto`` defaults below)."""
        return torch.device(self.device).type == "cpu"

    @property
    def helper_turn_s(self) -> float:
        """The step loop's ``yield_to_helpers_s`` (see :class:`~instgenie.step_loop.StepLoop`)."""
        text = self.yield_to_helpers_s.strip().lower()
        if text in ("", "auto"):
            return 1.0 if self._on_cpu else 0.0
        try:
            seconds = float(text)
        except ValueError:
            raise ValueError(f"parameter yield_to_helpers_s must be auto or seconds, got {self.yield_to_helpers_s!r}") from None
        if seconds < 0:
            raise ValueError(f"parameter yield_to_helpers_s must be >= 0, got {seconds}")
        return seconds

    @property
    def use_outbox(self) -> bool:
        switch = self.outbox.strip().lower()
        if switch in ("", "auto"):
            return not self._on_cpu
        if switch not in _SWITCHES:
            raise ValueError(f"parameter outbox must be auto, on or off, got {self.outbox!r}")
        return _SWITCHES[switch]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def limits(self) -> EngineLimits:
        return EngineLimits(max_pixels=self.max_pixels, max_steps=self.max_steps)

    @property
    def cache(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~instgenie.cache.ActivationStore`."""
        return {
            "mode": CacheMode.parse(self.cache_mode),
            "host_budget_bytes": self.cache_budget_bytes or None,
            "disk_dir": self.cache_dir or None,
            "lookahead": self.prefetch_lookahead,
        }

    @property
    def costs(self) -> CostModel | None:
        """The loading planner's cost model, if configured."""
        return CostModel.read(self.cost_model) if self.cost_model else None

    @property
    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(
            max_active=self.max_active,
            max_batch_tokens=self.max_batch_tokens or None,
            max_padding_waste=None if self.max_padding_waste < 0 else self.max_padding_waste,
        )
