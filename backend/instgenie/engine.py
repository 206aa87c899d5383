"""The step-level editing engine: prepare, step, finish.

A request is a :class:`RequestState`. ``prepare_*`` does everything that touches
untrusted bytes, text encoders or the VAE encoder; :meth:`Engine.step` advances any
list of states by one denoising step in one batched transformer call; ``finish``
decodes and pastes. A serving loop calls ``prepare``/``finish`` off its step thread
and ``step`` on it; states may join and leave between any two steps.

Template registration is a request too (kind ``RECORD``): a full run whose rows
record their image-token K/V. An edit then computes only the tokens its mask touches
(union the template's own mask) and reads the rest of every attention's K/V from
that recording.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from . import masking
from .activations import TemplateActivations
from .batching import call_inputs
from .cache import ActivationStore
from .cache.planner import CostModel
from .codec import Codec, LocalCodec
from .errors import InstGenIEError, InvalidInput
from .families import Family, GenerationSettings, ModelInputs
from .imaging import ImageInput, decode_image, decode_mask, encode_png
from .loading import load_pipeline
from .scheduler import FcfsScheduler, Scheduler
from .settings import EngineLimits, request_settings, template_settings
from .states import EditResult, RequestKind, RequestState
from .templates import TemplateRecord, TemplateRegistry, TemplateSpec
from .templates import template_id as hash_template_id

log = logging.getLogger(__name__)

__all__ = ["EditResult", "Engine", "EngineLimits", "RequestKind", "RequestState", "TemplateRecord", "TemplateSpec"]


class Engine:
    """Mask-aware denoising engine over one diffusers pipeline."""

    def __init__(
        self,
        pipe: Any,
        family_cls: type[Family],
        model_fingerprint: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_sequence_length: int = 512,
        limits: EngineLimits = EngineLimits(),
        store: ActivationStore | None = None,
        costs: CostModel | None = None,
        family_options: dict[str, Any] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        family_options = family_options or {}
        accepted = set(inspect.signature(family_cls.__init__).parameters) - {"self", "pipe", "device", "dtype"}
        if set(family_options) - accepted:
            raise InvalidInput(
                f"{family_cls.__name__} takes no option {sorted(set(family_options) - accepted)} (it takes {sorted(accepted)})"
            )
        self.family = family_cls(pipe, self.device, dtype, **family_options)
        self.model_fingerprint = model_fingerprint
        self.max_sequence_length = max_sequence_length
        self.limits = limits
        self.codec: Codec = LocalCodec(self.family)  # prompt encoding and VAE work; see use_codec
        # Where recorded K/V live; by default host memory only, without a budget.
        self.store = store or ActivationStore(model_fingerprint, device=self.device)
        self.templates = TemplateRegistry(self.store, model_fingerprint)
        # This machine's fitted costs (``instgenie profile``): with them each step plans
        # which leading blocks recompute instead of loading; without, every block loads.
        self.costs = costs

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_sequence_length: int = 512,
        limits: EngineLimits = EngineLimits(),
        cache: dict[str, Any] | None = None,
        costs: CostModel | None = None,
        family_options: dict[str, Any] | None = None,
    ) -> "Engine":
        """Load a diffusers pipeline folder (tiny or real checkpoint).

        ``cache``: keyword arguments of :class:`~instgenie.cache.ActivationStore`
        (``mode``, ``host_budget_bytes``, ``disk_dir``, ...); default host memory only.
        ``costs``: the loading planner's cost model (``instgenie profile``).
        ``family_options``: keyword arguments of the family adapter (the UNets'
        ``sparse_convs``).
        """
        pipe, family_cls, fingerprint = load_pipeline(model_dir, device, dtype)
        store = None
        if cache is not None:
            store = ActivationStore(fingerprint, **{"device": device, **cache})
        return cls(
            pipe,
            family_cls,
            fingerprint,
            device=device,
            dtype=dtype,
            max_sequence_length=max_sequence_length,
            limits=limits,
            store=store,
            costs=costs,
            family_options=family_options,
        )

    def use_codec(self, codec: Codec) -> None:
        """Run prompt encoding and VAE work through ``codec`` (e.g. a :class:`~instgenie.codec.ProcessCodec`)."""
        self.codec.close()
        self.codec = codec

    # -- templates (the registry's) ----------------------------------------------
    def template(self, template_id: str) -> TemplateRecord:
        """A registered template (:meth:`TemplateRegistry.get <instgenie.templates.TemplateRegistry.get>`)."""
        return self.templates.get(template_id)

    def add_template(self, record: TemplateRecord, recording: TemplateActivations) -> None:
        """Store a recording as ``record``'s cache (e.g. one recorded by another engine)."""
        self.templates.add(record, recording, self._unmasked_tokens(record))

    def _unmasked_tokens(self, record: TemplateRecord) -> dict[int, torch.Tensor] | None:
        """Per cache site, the tokens outside the template's own edit region on the site's
        grid; ``None`` where nothing is left out (no region, or a cache that stores all)."""
        if self.store.mode.tokens != "unmasked" or not record.mask_tokens.numel():
            return None
        grid = self.family.grid(record.settings)
        kept: dict[tuple[int, int], torch.Tensor] = {}
        for site_grid in set(self.family.site_grids(grid)):
            region = masking.pool_token_index(record.mask_tokens.cpu(), grid, site_grid)
            keep = torch.ones(site_grid[0] * site_grid[1], dtype=torch.bool)
            keep[region] = False
            kept[site_grid] = keep.nonzero().flatten()
        return {site: kept[g] for site, g in enumerate(self.family.site_grids(grid))}

    def has_template(self, template_id: str) -> bool:
        return self.templates.has(template_id)

    def forget_template_for_recording(self, template_id: str) -> TemplateSpec | None:
        """Drop a template whose cache is corrupt; the spec to record it again (same id)
        from its record in memory, or ``None`` if there is none."""
        record = self.templates.forget(template_id)
        if record is None:
            return None
        return TemplateSpec(record.template_id, record.prompt, record.image, record.pixel_mask, record.settings)

    def template_ids(self) -> list[str]:
        return self.templates.ids()

    # -- preparation -----------------------------------------------------------
    def _settings(
        self, image: Image.Image, seed: int | None, steps: int | None, guidance: float | None
    ) -> GenerationSettings:
        return request_settings(self.family, self.limits, self.max_sequence_length, image, seed, steps, guidance)

    def _template_settings(
        self, record: TemplateRecord, seed: int | None, steps: int | None, guidance: float | None
    ) -> GenerationSettings:
        return template_settings(
            self.family, self.limits, self.max_sequence_length, self.model_fingerprint, record, seed, steps, guidance
        )

    def _start(
        self,
        kind: RequestKind,
        settings: GenerationSettings,
        prompt: str,
        image: Image.Image,
        pixel_mask: np.ndarray,
        token_index: torch.Tensor | None,
        template: TemplateRecord | None,
        request_id: str | None,
    ) -> RequestState:
        if not isinstance(prompt, str):
            raise InvalidInput(f"prompt must be a string, got {type(prompt).__name__}")
        family = self.family
        num_tokens = family.num_tokens(settings)
        computes_all = token_index is None or token_index.numel() == num_tokens
        token_index = torch.arange(num_tokens) if computes_all else token_index
        token_index = token_index.to(self.device)
        scheduler = family.new_scheduler()
        timesteps = family.schedule(scheduler, settings)
        reuse = template.inputs if template is not None and settings.seed == template.settings.seed else None
        full_inputs = self.codec.prepare_latents(image, pixel_mask, settings, scheduler, timesteps, reuse)
        state = RequestState(
            request_id=request_id or uuid.uuid4().hex,
            kind=kind,
            settings=settings,
            prompt=prompt,
            image=image,
            pixel_mask=pixel_mask,
            num_tokens=num_tokens,
            token_index=token_index,
            inputs=full_inputs.select(token_index),
            text=self.codec.encode_prompt(prompt, settings),
            scheduler=scheduler,
            timesteps=timesteps,
            template=None if computes_all else template,
            template_id=None if template is None else template.template_id,
            row_work=family.step_cost.work(masking.token_grid(token_index, family.grid(settings))),
        )
        if state.template is not None:
            # Opened at preparation, before admission: the first steps load meanwhile.
            state.kv = self.store.open(state.template.template_id)
            state.full_inputs = full_inputs  # the condition of every token, for full blocks
            state.full_blocks = self._plan_full_blocks(state)
        if kind is RequestKind.RECORD:
            state.recording = TemplateActivations(inputs=self.store.mode.stores_inputs)
            state.full_inputs = full_inputs
        return state

    def template_spec(
        self,
        image: ImageInput,
        prompt: str,
        *,
        seed: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        mask: ImageInput | None = None,
    ) -> TemplateSpec:
        """Decode and check a registration and compute its template id (cheap: no model runs).

        ``mask`` is the template's own edit region (default: none, i.e. the run
        reconstructs the template image); edits always recompute those tokens.
        """
        if not isinstance(prompt, str):
            raise InvalidInput(f"prompt must be a string, got {type(prompt).__name__}")
        pil = decode_image(image, max_pixels=self.limits.max_pixels)
        settings = self._settings(pil, seed, steps, guidance)
        pixel_mask = (
            np.zeros((pil.height, pil.width), dtype=bool)
            if mask is None
            else decode_mask(mask, pil.size, max_pixels=self.limits.max_pixels)
        )
        return TemplateSpec(hash_template_id(self.model_fingerprint, settings, prompt, pil, pixel_mask), prompt, pil, pixel_mask, settings)

    def image_key(self, spec: TemplateSpec) -> str | None:
        """The key of ``spec``'s image for edits of raw images (:mod:`~instgenie.auto_register`):
        its id under the empty prompt; ``None`` for a template with its own edit region."""
        if spec.pixel_mask.any():
            return None
        return hash_template_id(self.model_fingerprint, spec.settings, "", spec.image, spec.pixel_mask)

    def start_template(self, spec: TemplateSpec, request_id: str | None = None) -> RequestState:
        """The recording run of ``spec``: a full computation that records its K/V."""
        return self._start(RequestKind.RECORD, spec.settings, spec.prompt, spec.image, spec.pixel_mask, None, None, request_id)

    def prepare_template(self, image: ImageInput, prompt: str, *, request_id: str | None = None, **settings: Any) -> RequestState:
        """:meth:`template_spec` then :meth:`start_template`."""
        return self.start_template(self.template_spec(image, prompt, **settings), request_id)

    def prepare_edit(
        self,
        mask: ImageInput,
        prompt: str,
        *,
        template_id: str | TemplateRecord | None = None,
        image: ImageInput | None = None,
        seed: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        full_compute: bool = False,
        request_id: str | None = None,
    ) -> RequestState:
        """An edit of a registered template (``template_id``, or its record already
        looked up with :meth:`template`) or of a raw ``image``.

        A raw image, or ``full_compute=True``, runs the full computation. An empty
        mask returns a state that is already done: its result is the image itself.
        A mask is thresholded at half grey (see :func:`~instgenie.imaging.decode_mask`).
        """
        if (template_id is None) == (image is None):
            raise InvalidInput("give exactly one of template_id and image")
        if template_id is not None:
            record = template_id if isinstance(template_id, TemplateRecord) else self.template(template_id)
            settings = self._template_settings(record, seed, steps, guidance)
            pil = record.image
        else:
            record = None
            pil = decode_image(image, max_pixels=self.limits.max_pixels)  # type: ignore[arg-type]
            settings = self._settings(pil, seed, steps, guidance)
        pixel_mask = decode_mask(mask, pil.size, max_pixels=self.limits.max_pixels)
        tokens = masking.token_indices(pixel_mask, self.family.pixels_per_token)
        if record is not None:
            tokens = masking.union(tokens, record.mask_tokens)
        nothing_to_edit = tokens.numel() == 0
        computed = None if (full_compute or record is None) and not nothing_to_edit else tokens
        state = self._start(RequestKind.EDIT, settings, prompt, pil, pixel_mask, computed, record, request_id)
        if nothing_to_edit:
            state.step_index = state.total_steps
        return state

    # -- the step ----------------------------------------------------------------
    def step(self, states: Sequence[RequestState], full_blocks: int | None = None) -> None:
        """Advance every unfinished state by one denoising step, in exactly one transformer call.

        States may be at different steps, compute different token sets, use different
        templates (of one resolution) or none, and record; each gets exactly what it
        would get stepped alone (up to batched-kernel rounding). Which states share a
        call is the scheduler's decision (:meth:`~instgenie.scheduler.FcfsScheduler.calls`).

        ``full_blocks``: how many leading transformer blocks compute every token
        instead of reading the cache; default: the states' planned prefix, which they
        must share.

        Raises:
            InvalidInput: the states are of different resolutions, or plan different prefixes.
        """
        active = [s for s in states if not s.done]
        if not active:
            return
        if full_blocks is None:
            planned = {state.full_blocks for state in active}
            if len(planned) > 1:
                raise InvalidInput(f"states planning different recomputed prefixes {sorted(planned)} cannot share a call")
            full_blocks = planned.pop()
        for state in active:
            if state.recording is not None:
                state.recording.put_latents(state.step_index, state.inputs.latents)
        inputs = self.model_inputs(active, full_blocks)
        output = inputs.batch.computed_outputs(self.family.predict(inputs))
        first = 0
        for state in active:
            prediction = output[first : first + state.rows, : state.computed_tokens]
            first += state.rows
            if state.rows == 2:  # classifier-free guidance, as the pipelines combine it
                uncond, cond = prediction.chunk(2)
                prediction = uncond + state.settings.guidance * (cond - uncond)
            self._advance(state, prediction)

    def _plan_full_blocks(self, state: RequestState) -> int:
        """How many leading blocks of each step of ``state`` compute every token instead of loading.

        Chosen once per request from its own sizes, never from its batch mates, so
        what it computes does not depend on what it was batched with: with a new prompt,
        recomputed blocks attend over the edit's own unmasked K/V, not the template's.
        0 (load every block) without a cost model or without the template's step latents.
        """
        template = state.template
        if self.costs is None or template is None or template.step_latents is None:
            return 0
        blocks = len(self.family.blocks)
        text_len = state.text.prompt_embeds.shape[1]
        block_bytes = template.cache_bytes // (state.total_steps * blocks)
        plan = self.costs.plan_prefix(
            blocks, state.rows * (state.num_tokens + text_len), state.rows * (state.computed_tokens + text_len), block_bytes
        )
        return plan.recomputed

    def model_inputs(self, active: Sequence[RequestState], full_blocks: int = 0) -> ModelInputs:
        """The inputs of one transformer call over ``active`` (:func:`~instgenie.batching.call_inputs`)."""
        return call_inputs(self.family, self.device, active, full_blocks)


    def _advance(self, state: RequestState, prediction: torch.Tensor) -> None:
        """The pipeline's per-step update on the state's own scheduler and tokens."""
        t = state.timesteps[state.step_index]
        inputs = state.inputs
        latents = state.scheduler.step(prediction, t, inputs.latents, return_dict=False)[0]
        if inputs.blend_mask is not None:
            proper = inputs.image_latents
            if state.step_index < state.total_steps - 1:
                next_t = state.timesteps[state.step_index + 1]
                proper = state.scheduler.scale_noise(proper, torch.tensor([next_t]), inputs.noise)
            latents = (1 - inputs.blend_mask) * proper + inputs.blend_mask * latents
        inputs.latents = latents
        if state.kv is not None:
            state.kv.advance(state.step_index)
        state.step_index += 1
        if state.done:  # the last step read its cache: unpin it now, before the decode
            self.release(state)

    # -- finishing ---------------------------------------------------------------
    def final_latents(self, state: RequestState) -> torch.Tensor | None:
        """Full-grid latents ``[1, N, C]``: the template's where the state computed nothing.

        ``None`` for an empty-mask edit of a raw image: nothing was denoised.
        """
        if state.template is None:
            return state.inputs.latents if state.computed_tokens else None
        latents = state.template.final_latents.clone()
        latents[:, state.token_index] = state.inputs.latents
        return latents

    def finish_template(self, state: RequestState) -> TemplateRecord:
        """Store a finished recording run as a template and return it."""
        if state.kind is not RequestKind.RECORD or not state.done:
            raise ValueError("finish_template takes a finished RECORD state")
        assert state.recording is not None and state.full_inputs is not None
        template = TemplateRecord(
            template_id=self.template_id(state),
            model_fingerprint=self.model_fingerprint,
            settings=state.settings,
            prompt=state.prompt,
            image=state.image,
            pixel_mask=state.pixel_mask,
            mask_tokens=masking.token_indices(state.pixel_mask, self.family.pixels_per_token),
            inputs=state.full_inputs,
            final_latents=state.inputs.latents,
            activations=state.recording,
            step_latents=state.recording.step_latents(),
        )
        self.add_template(template, state.recording)
        return template

    # -- a request's cache: opened by prepare, waited for before a step, advanced by
    # step and released by its last step; a request that leaves early (cancelled,
    # failed) is released by whoever drives the steps (the step loop) --------------
    def wait_for_caches(self, states: Sequence[RequestState]) -> list[tuple[RequestState, InstGenIEError]]:
        """Wait until each state's cache of its current step is loaded; the states whose
        cache cannot be read, with why (``CacheCorrupt``, ``UnknownTemplate``, ...)."""
        failed = []
        for state in states:
            if state.kv is None:
                continue
            try:
                state.kv.wait(state.step_index)
            except InstGenIEError as error:
                failed.append((state, error))
        return failed

    def release(self, state: RequestState) -> None:
        """Let go of what ``state`` holds in the cache; call once a request leaves, for any reason."""
        if state.kv is not None:
            state.kv.release()

    def finish_edit(self, state: RequestState) -> EditResult:
        """Decode a finished edit; pixels outside its mask are the template's, byte for byte."""
        if state.kind is not RequestKind.EDIT or not state.done:
            raise ValueError("finish_edit takes a finished EDIT state")
        latents = self.final_latents(state)
        if not state.pixel_mask.any():
            image = state.image.copy()
            png = encode_png(image)
        else:
            rendered = self.codec.render(latents, state.settings, state.image, state.pixel_mask)
            image, png = rendered.image, rendered.png
        return EditResult(
            image=image,
            png=png,
            latents=latents,
            request_id=state.request_id,
            computed_tokens=state.computed_tokens,
            num_tokens=state.num_tokens,
            template_id=state.template_id,
        )

    def template_id(self, state: RequestState) -> str:
        """Stable id: a hash of the model, the settings, the prompt, the image and its mask."""
        return hash_template_id(self.model_fingerprint, state.settings, state.prompt, state.image, state.pixel_mask)

    # -- conveniences ------------------------------------------------------------
    def run(self, states: Iterable[RequestState], scheduler: Scheduler | None = None) -> None:
        """Step ``states`` together until all are done, in the calls ``scheduler`` groups them into."""
        states = list(states)
        scheduler = scheduler or FcfsScheduler()
        while active := [s for s in states if not s.done]:
            for call in scheduler.calls(active):
                self.step([active[i] for i in call])

    def register_template(self, image: ImageInput, prompt: str, **kwargs: Any) -> TemplateRecord:
        state = self.prepare_template(image, prompt, **kwargs)
        self.run([state])
        return self.finish_template(state)

    def edit(self, mask: ImageInput, prompt: str, **kwargs: Any) -> EditResult:
        state = self.prepare_edit(mask, prompt, **kwargs)
        try:
            self.run([state])
            return self.finish_edit(state)
        finally:
            self.release(state)

