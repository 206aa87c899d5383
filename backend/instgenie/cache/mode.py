"""How a template's activations are stored: what, in which element type, which tokens.

``content="kv"`` stores each attention site's K and V; ``content="input"`` stores
the site's input (the block's normalised hidden states), half the bytes, and edits
project K/V from it again (two GEMMs per site over the cached tokens: more compute).

``float32`` with ``tokens="all"`` stores exactly what the recording run computed;
``tokens="unmasked"`` drops the tokens of the template's own edit region, which every
edit recomputes anyway (lossless, smaller when a template declares a region);
``bfloat16`` halves the bytes at a rounding cost (edits equal to their template are
then within a documented tolerance, not bit-exact).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["CacheMode"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


_CONTENTS = ("kv", "input")
_TOKENS = ("all", "unmasked")


@dataclass(frozen=True)
class CacheMode:
    dtype: Literal["float32", "bfloat16"] = "float32"
    tokens: Literal["all", "unmasked"] = "all"
    content: Literal["kv", "input"] = "kv"

    def __post_init__(self) -> None:
        if self.content not in _CONTENTS:
            raise ValueError(f"cache content must be one of {_CONTENTS}, got {self.content!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"cache dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.tokens not in _TOKENS:
            raise ValueError(f"cache tokens must be 'all' or 'unmasked', got {self.tokens!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def lossless(self) -> bool:
        return self.dtype == "float32"

    @property
    def stores_inputs(self) -> bool:
        return self.content == "input"

    @property
    def name(self) -> str:
        """Folder name of this mode's caches: caches of other modes are never read."""
        return f"{self.content}-{self.dtype}-{self.tokens}"

    @classmethod
    def parse(cls, text: str) -> "CacheMode":
        """``"float32"``, ``"bfloat16,unmasked"``, ``"input,bfloat16"``, ... (order free)."""
        fields: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            fields["dtype" if part in _DTYPES else "content" if part in _CONTENTS else "tokens"] = part
        return cls(**fields)  # type: ignore[arg-type]
