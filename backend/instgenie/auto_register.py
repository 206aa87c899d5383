"""Templates without registration: a raw image that is edited again becomes a template.

An edit that carries an image and no template id is looked up by the image's *key*: a
hash of the model, the settings, the pixels and an empty template mask, not of any
prompt (the template id the image would get registered with the empty prompt). If a
template of that image exists (recorded here, or registered by a client through this
loop, under any prompt) the edit computes only its masked tokens; otherwise it is
computed in full and, under the policy, the image is recorded once that edit has
finished, as one more job of the step loop that no client waits for, so that later
edits of it are masked:

``off``
    never record (a template a client registered is still found);
``second_sight`` (default)
    record an image the second time it is edited: a picture edited once is not worth
    a recording's compute and cache bytes;
``always``
    record on first sight.

The recording uses the prompt of the edit that triggered it (``recording_prompt``
``"edit"``; ``"empty"`` is the alternative): ``bench/auto_register.py`` measured the
masked-region deviation of later edits with new prompts from their full computation
for both, and the triggering prompt's was lower in every family
(``docs/benchmarks/auto_register.md``). Auto-registered templates are bounded
(``max_templates``, the least recently used dropped first) and their host-memory
entries are evicted before any registered one's. The key-to-template map lives in
memory: after a restart an image is recorded again on its next sightings (a recording
that exists on disk already is found by its id and not recomputed).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["AUTO_REGISTER_POLICIES", "AutoRegisterConfig", "AutoRegistrar"]

AUTO_REGISTER_POLICIES = ("off", "second_sight", "always")
RECORDING_PROMPTS = ("empty", "edit")
_SIGHTINGS = 4096  # raw images remembered as seen once (keys: 68 bytes each)


@dataclass(frozen=True)
class AutoRegisterConfig:
    policy: str = "second_sight"
    max_templates: int = 64  # auto-registered templates kept; beyond, the least recently used is dropped
    recording_prompt: str = "edit"  # "edit" | "empty": which prompt a recording uses (see the module doc)

    def __post_init__(self) -> None:
        if self.policy not in AUTO_REGISTER_POLICIES:
            raise ValueError(f"auto_register must be one of {', '.join(AUTO_REGISTER_POLICIES)}, got {self.policy!r}")
        if self.recording_prompt not in RECORDING_PROMPTS:
            raise ValueError(f"recording_prompt must be one of {', '.join(RECORDING_PROMPTS)}, got {self.recording_prompt!r}")
        if self.max_templates < 1:
            raise ValueError(f"auto_register_max must be >= 1, got {self.max_templates}")


class AutoRegistrar:
    """The bookkeeping: which raw images were seen, which are being recorded, and the
    template each one is (recorded here, or registered by a client). Thread-safe (the
    step loop's workers share it)."""

    def __init__(self, config: AutoRegisterConfig = AutoRegisterConfig()) -> None:
        self.config = config
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._recording: set[str] = set()
        self._templates: OrderedDict[str, str] = OrderedDict()  # key -> auto template id, least recently used first
        self._registered: OrderedDict[str, str] = OrderedDict()  # key -> template id a client registered
        self._lock = threading.Lock()

    def candidate(self, key: str) -> str | None:
        """The template that may stand for the image of ``key`` (the caller checks that it exists)."""
        with self._lock:
            template_id = self._templates.get(key)
            if template_id is not None:
                self._templates.move_to_end(key)
                return template_id
            template_id = self._registered.get(key)
        if template_id is not None:
            return template_id
        return key if self.config.recording_prompt == "empty" else None

    def sighted(self, key: str) -> bool:
        """Count an edit of the raw image ``key`` that found no template; whether to record it now."""
        policy = self.config.policy
        with self._lock:
            if policy == "off" or key in self._recording:
                return False
            if policy == "second_sight" and key not in self._seen:
                self._seen[key] = None
                while len(self._seen) > _SIGHTINGS:
                    self._seen.popitem(last=False)
                return False
            self._seen.pop(key, None)
            self._recording.add(key)
            return True

    def recorded(self, key: str, template_id: str) -> list[str]:
        """The recording of ``key`` finished as ``template_id``; the auto templates to drop now."""
        with self._lock:
            self._recording.discard(key)
            self._templates[key] = template_id
            self._templates.move_to_end(key)
            dropped = []
            while len(self._templates) > self.config.max_templates:
                _, oldest = self._templates.popitem(last=False)
                dropped.append(oldest)
            return dropped

    def abandoned(self, key: str) -> None:
        """The recording of ``key`` failed or was refused: a later sighting may try again."""
        with self._lock:
            self._recording.discard(key)

    def registered(self, key: str | None, template_id: str) -> None:
        """A client registered ``template_id`` (of the image ``key``; ``None``: a template with
        its own edit region, which no raw image's edit uses): it is no longer the
        auto-registrar's to drop, and edits of that image find it."""
        with self._lock:
            for auto_key in [k for k, t in self._templates.items() if t == template_id]:
                del self._templates[auto_key]
            if key is not None:
                self._registered[key] = template_id
                self._registered.move_to_end(key)
                while len(self._registered) > _SIGHTINGS:
                    self._registered.popitem(last=False)

    def auto_templates(self) -> list[str]:
        with self._lock:
            return list(self._templates.values())
