"""Recorded activations of one template run: image-token K/V per step, row and site.

A template run records, for every denoising step, every transformer row (2 under
classifier-free guidance) and every attention site, the post-norm (post-RoPE for
Flux) K and V of all image tokens, and, when asked, the attention input of those
tokens (the block's normalised hidden states, from which K and V are projected; the
"input" cache mode stores these instead of K/V). The UNets also record *output
sites*: each attention level's output and, with sparse convolutions, each
convolution's, over every token. This module is the in-memory recording; the :mod:`instgenie.cache` store keeps it (host memory, disk) and serves
it to edits.
"""

from __future__ import annotations

import torch

KVKey = tuple[int, int, int]  # (step, row, site)


class TemplateActivations:
    """Image-token K/V (and attention inputs) of one template run, keyed by ``(step, row, site)``.

    Args:
        inputs: also record each site's attention input ``[N, C]`` per row.
    """

    def __init__(self, inputs: bool = False) -> None:
        self._kv: dict[KVKey, tuple[torch.Tensor, torch.Tensor]] = {}
        self._inputs: dict[KVKey, torch.Tensor] | None = {} if inputs else None
        # Output sites (a UNet attention level's output, a convolution's): every token's output.
        self._outputs: dict[KVKey, torch.Tensor] = {}
        self.token_dims: dict[int, int] = {}  # site -> the token axis of its per-row K/V
        # The transformer's input latents ``[1, N, C]`` at each step: what a step that
        # recomputes its first blocks over every token feeds the unmasked tokens.
        self.latents: dict[int, torch.Tensor] = {}

    def put(self, step: int, row: int, site: int, key: torch.Tensor, value: torch.Tensor, token_dim: int) -> None:
        self._kv[(step, row, site)] = (key.detach().clone(), value.detach().clone())
        self.token_dims[site] = token_dim

    def get(self, step: int, row: int, site: int) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self._kv[(step, row, site)]
        except KeyError:
            raise KeyError(f"no activations recorded for step {step}, row {row}, site {site}") from None

    def put_latents(self, step: int, latents: torch.Tensor) -> None:
        self.latents[step] = latents.detach().clone()

    def step_latents(self) -> torch.Tensor | None:
        """``[steps, N, C]``: the input latents of every step, or ``None`` if not all were recorded."""
        if not self.latents or sorted(self.latents) != list(range(self.steps)):
            return None
        return torch.cat([self.latents[step] for step in range(self.steps)])

    @property
    def records_inputs(self) -> bool:
        return self._inputs is not None

    def put_input(self, step: int, row: int, site: int, hidden: torch.Tensor) -> None:
        if self._inputs is not None:
            self._inputs[(step, row, site)] = hidden.detach().clone()

    def get_input(self, step: int, row: int, site: int) -> torch.Tensor:
        if self._inputs is None:
            raise KeyError("this recording holds no attention inputs (record with inputs=True)")
        try:
            return self._inputs[(step, row, site)]
        except KeyError:
            raise KeyError(f"no attention input recorded for step {step}, row {row}, site {site}") from None

    def put_output(self, step: int, row: int, site: int, hidden: torch.Tensor, token_dim: int = 0) -> None:
        self._outputs[(step, row, site)] = hidden.detach().clone()
        self.token_dims[site] = token_dim

    def get_output(self, step: int, row: int, site: int) -> torch.Tensor:
        try:
            return self._outputs[(step, row, site)]
        except KeyError:
            raise KeyError(f"no output recorded for step {step}, row {row}, site {site}") from None

    def has_output(self, step: int, row: int, site: int) -> bool:
        return (step, row, site) in self._outputs

    def keys(self) -> list[KVKey]:
        """The ``(step, row, site)`` of every attention site recorded."""
        return sorted(self._kv)

    def output_keys(self) -> list[KVKey]:
        """The ``(step, row, site)`` of every output site recorded."""
        return sorted(self._outputs)

    @property
    def steps(self) -> int:
        return 1 + max((step for step, _, _ in self._kv), default=-1)

    @property
    def nbytes(self) -> int:
        """Bytes held: K and V together, and outputs."""
        kv = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self._kv.values())
        return kv + sum(o.numel() * o.element_size() for o in self._outputs.values())

    def at(self, step: int, row: int) -> "StepActivations":
        return StepActivations(self, step, row)


class StepActivations:
    """One row's K/V at one step: reads (edits) or writes (template recording)."""

    stores_inputs = False  # it serves K/V

    def __init__(self, store: TemplateActivations, step: int, row: int) -> None:
        self.store, self.step, self.row = store, step, row

    def stored_tokens(self, site: int) -> None:
        return None  # a recording holds every token

    def kv(self, site: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.store.get(self.step, self.row, site)

    def output(self, site: int) -> torch.Tensor:
        return self.store.get_output(self.step, self.row, site)

    def stored(self, site: int) -> tuple[torch.Tensor, ...]:
        if self.store.has_output(self.step, self.row, site):
            return (self.output(site),)
        return self.kv(site)

    def record_output(self, site: int, hidden: torch.Tensor, token_dim: int = 0) -> None:
        self.store.put_output(self.step, self.row, site, hidden, token_dim)

    def record(self, site: int, key: torch.Tensor, value: torch.Tensor, token_dim: int) -> None:
        self.store.put(self.step, self.row, site, key, value, token_dim)

    def record_input(self, site: int, hidden: torch.Tensor) -> None:
        self.store.put_input(self.step, self.row, site, hidden)
