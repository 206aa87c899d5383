"""The engine's correctness: exactness, batching, cache use, pasted pixels, prompts."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SIZE, TEXT_LEN, batched_tolerance, engine_over, png, rect_mask, template_image
from instgenie import Engine
from instgenie.cache import CacheMode
from instgenie.cache.planner import CostModel, LinearCost
from instgenie.families import GenerationSettings
from instgenie.scheduler import FcfsScheduler

STEPS = 3


@pytest.mark.parametrize(
    ("ratio", "seed"),
    # Masks of every size, and one size at several places: the computed-token counts per
    # level change the kernels' row counts (7 of 8 such masks were off before rows were
    # padded to a multiple of 8).
    [(0.1, 1), (0.5, 1), (1.0, 1), (0.3, 2), (0.3, 3), (0.3, 4), (0.3, 6)],
)
def test_edit_equal_to_template_is_bit_exact(engine: Engine, ratio: float, seed: int) -> None:
    mask = png(rect_mask(ratio, seed=seed))
    record = engine.register_template(png(template_image(1)), "a red hat", seed=7, steps=STEPS, mask=mask)

    masked = engine.edit(mask, "a red hat", template_id=record.template_id)
    full = engine.edit(mask, "a red hat", template_id=record.template_id, full_compute=True)

    assert full.computed_tokens == full.num_tokens
    if ratio < 1.0:
        assert masked.computed_tokens < masked.num_tokens
    assert torch.equal(masked.latents, full.latents)
    assert np.array_equal(np.asarray(masked.image), np.asarray(full.image))


@pytest.mark.parametrize("ratio", [0.1, 0.5])
def test_recomputing_the_first_blocks_instead_of_loading_is_bit_exact(engine: Engine, ratio: float) -> None:
    """The loading planner's other choice: a step's first k blocks compute every token."""
    mask = png(rect_mask(ratio, seed=1))
    record = engine.register_template(png(template_image(1)), "a red hat", seed=7, steps=STEPS, mask=mask)
    assert record.step_latents is not None
    full = engine.edit(mask, "a red hat", template_id=record.template_id, full_compute=True)
    blocks = len(engine.family.blocks)
    for full_blocks in sorted({1, blocks // 2, blocks}):
        state = engine.prepare_edit(mask, "a red hat", template_id=record.template_id)
        # One recorded latent per denoiser call (PNDM calls the UNet once more than it has steps).
        assert record.step_latents.shape[0] == state.total_steps >= STEPS
        while not state.done:
            engine.step([state], full_blocks=full_blocks)
        assert state.computed_tokens < state.num_tokens
        assert torch.equal(engine.final_latents(state), full.latents), f"{full_blocks} full blocks"
        engine.release(state)


def step_once(engine: Engine, states: list) -> None:
    """One denoising step of ``states``, in the calls the scheduler groups them into."""
    for call in FcfsScheduler().calls(states):
        engine.step([states[i] for i in call])


def test_recomputed_blocks_attend_with_the_edit_prompt_not_the_cache(engine: Engine) -> None:
    # With another prompt the recomputed blocks' unmasked K/V come from the edit's
    # own text, not the template's, so the result moves: a computation, not a copy.
    mask = png(rect_mask(0.3, seed=2))
    record = engine.register_template(png(template_image(2)), "a red hat", seed=7, steps=STEPS)
    results = []
    for full_blocks in (0, len(engine.family.blocks) // 2):
        state = engine.prepare_edit(mask, "a green scarf", template_id=record.template_id)
        while not state.done:
            engine.step([state], full_blocks=full_blocks)
        results.append(engine.final_latents(state))
        engine.release(state)
    assert all(torch.isfinite(r).all() for r in results)
    assert not torch.equal(results[0], results[1])


def test_full_computation_matches_the_stock_diffusers_pipeline(engine: Engine) -> None:
    image, mask = template_image(2), rect_mask(0.3, seed=2)
    settings = engine._settings(image, 5, STEPS, None)
    ours = engine.edit(png(mask), "a blue car", image=png(image), seed=5, steps=STEPS)

    pipe = engine.family.pipe
    extra = {"guidance_scale": settings.guidance, "strength": 1.0}
    stock = pipe(
        prompt="a blue car",
        image=image,
        mask_image=mask,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(5),
        max_sequence_length=TEXT_LEN,
        output_type="latent",
        **extra,
    ).images
    if stock.ndim == 4:  # spatial latents (SD3, the UNets): the family's token layout
        stock = engine.family.to_tokens(stock)
    difference = (ours.latents - stock).abs().max().item()
    print(f"{type(engine.family).__name__}: max |engine full - stock pipeline| = {difference:.3g}")
    assert difference <= 1e-5


def _cost_model_with_mixed_plans(engine: Engine, template_id: str, ratios: list[float]) -> CostModel:
    compute = LinearCost(1e-4, 2e-6)
    probes = [engine.prepare_edit(png(rect_mask(r)), "a hat", template_id=template_id) for r in ratios]
    for probe in probes:
        engine.release(probe)
    blocks = len(engine.family.blocks)
    block_s = compute(probes[0].rows * (probes[0].num_tokens + probes[0].text.prompt_embeds.shape[1]))
    block_bytes = engine.template(template_id).cache_bytes / (probes[0].total_steps * blocks)
    for factor in np.geomspace(0.1, 4.0, 60):
        engine.costs = CostModel(block_compute=compute, load=LinearCost(0.0, factor * block_s / block_bytes))
        plans = [engine._plan_full_blocks(probe) for probe in probes]
        if len(set(plans)) > 1 and 0 < max(plans) < blocks:
            return engine.costs
    raise AssertionError("no load cost gives mask-dependent plans")


@pytest.mark.parametrize("cache", ["kv", "input", "kv+planner"])
def test_states_at_different_steps_batch_like_they_run_alone(engine: Engine, cache: str) -> None:
    engine = engine_over(engine, mode=CacheMode(content=cache.split("+")[0]))  # type: ignore[arg-type]
    first = engine.register_template(png(template_image(3)), "a cat", seed=1, steps=STEPS)
    second = engine.register_template(png(template_image(4)), "a dog", seed=1, steps=STEPS)
    if cache.endswith("+planner"):
        # A load cost under which the planner's recomputed prefix depends on each
        # request's mask (so calls split by plan); where that threshold lies depends on
        # the family's sizes, so it is searched for, in units of a full block's compute.
        engine.costs = _cost_model_with_mixed_plans(engine, first.template_id, [0.1, 0.3, 0.5])
    def requests() -> list:
        return [
            engine.prepare_edit(png(rect_mask(0.1, seed=3)), "a hat", template_id=first.template_id),
            engine.prepare_edit(png(rect_mask(0.3, seed=4)), "a scarf", template_id=second.template_id),
            engine.prepare_edit(png(rect_mask(0.5, seed=5)), "a ball", template_id=first.template_id),
            engine.prepare_edit(png(rect_mask(0.2, seed=6)), "a tree", image=png(template_image(5)), seed=1, steps=STEPS),
        ]

    alone = requests()
    for state in alone:
        engine.run([state])

    together = requests()
    step_once(engine, [together[2]])  # further along when the others join
    step_once(engine, [together[2], together[3]])
    engine.run(together)

    assert len({s.computed_tokens for s in together}) == 4  # different token counts in one step
    if cache.endswith("+planner"):
        planned = [s.full_blocks for s in together[:3]]
        assert len(set(planned)) > 1 and 0 < max(planned) < len(engine.family.blocks), planned
    guidance = together[0].settings.guidance if together[0].rows == 2 else None
    for a, b in zip(alone, together):
        reference = engine.final_latents(a)
        difference = (reference - engine.final_latents(b)).abs().max().item()
        print(f"{type(engine.family).__name__}: max |batched - alone| = {difference:.3g}")
        assert difference <= batched_tolerance(reference, guidance)


def test_recording_alongside_edits_records_the_same_template(engine: Engine) -> None:
    image = png(template_image(6))
    alone = engine.register_template(image, "a boat", seed=2, steps=STEPS)
    template = engine.register_template(png(template_image(7)), "a lake", seed=2, steps=STEPS)

    recording = engine.prepare_template(image, "a boat", seed=2, steps=STEPS)
    edit = engine.prepare_edit(png(rect_mask(0.2)), "a swan", template_id=template.template_id)
    engine.run([recording, edit])
    together = engine.finish_template(recording)

    assert together.template_id == alone.template_id
    guidance = recording.settings.guidance if recording.rows == 2 else None
    tolerance = batched_tolerance(alone.final_latents, guidance)
    assert (together.final_latents - alone.final_latents).abs().max().item() <= tolerance
    for key in alone.activations.keys():
        k_alone, _ = alone.activations.get(*key)
        k_together, _ = together.activations.get(*key)
        assert (k_alone - k_together).abs().max().item() <= batched_tolerance(k_alone, guidance)


def test_corrupted_cache_entry_changes_the_result(engine: Engine) -> None:
    mask = png(rect_mask(0.25, seed=8))
    record = engine.register_template(png(template_image(8)), "a lamp", seed=3, steps=STEPS, mask=mask)
    full = engine.edit(mask, "a lamp", template_id=record.template_id, full_compute=True)
    for (row, _site), tensors in engine.store.host.get((record.template_id, 0)).kv.items():  # step 0
        if row == 0:
            tensors[0].add_(torch.randn_like(tensors[0]))  # K, an attention input or an output

    corrupted = engine.edit(mask, "a lamp", template_id=record.template_id)

    assert (corrupted.latents - full.latents).abs().max().item() > 1e-4


def test_unmasked_pixels_equal_the_template(engine: Engine) -> None:
    image = template_image(9)
    record = engine.register_template(png(image), "a room", seed=4, steps=STEPS)
    mask = rect_mask(0.3, seed=9)

    result = engine.edit(png(mask), "a window", template_id=record.template_id)

    keep = np.asarray(mask) < 128
    edited, original = np.asarray(result.image), np.asarray(image)
    assert np.array_equal(edited[keep], original[keep])
    assert not np.array_equal(edited[~keep], original[~keep])


def test_new_prompt_deviation_is_below_the_prompt_effect(engine: Engine) -> None:
    mask = png(rect_mask(0.25, seed=10))
    record = engine.register_template(png(template_image(10)), "a red hat", seed=5, steps=STEPS)
    tokens = engine.prepare_edit(mask, "x", template_id=record.template_id).token_index

    masked = engine.edit(mask, "a green bicycle", template_id=record.template_id)
    full = engine.edit(mask, "a green bicycle", template_id=record.template_id, full_compute=True)
    same_prompt = engine.edit(mask, "a red hat", template_id=record.template_id, full_compute=True)

    deviation = (masked.latents - full.latents)[:, tokens].abs().mean().item()
    prompt_effect = (full.latents - same_prompt.latents)[:, tokens].abs().mean().item()
    print(
        f"{type(engine.family).__name__}: masked-region mean |masked - full| = {deviation:.4g}, "
        f"prompt effect = {prompt_effect:.4g} (ratio {deviation / prompt_effect:.3f})"
    )
    assert np.isfinite(deviation)
    assert deviation < prompt_effect


@pytest.mark.parametrize("variant", ["sdxl-inpaint", "sdxl-inpaint+b", "sd-inpaint", "sd-inpaint+b"])
def test_unet_edit_on_an_odd_latent_grid_is_bit_exact(engines: dict[str, Engine], variant: str) -> None:
    """17 x 15 latent tokens: every UNet level rounds its side up, the levels' pooled
    masks and the convolutions' windows follow, and the invariant holds."""
    engine = engines[variant]
    image = template_image(3, size=136).crop((0, 0, 136, 120))
    pixels = np.zeros((120, 136), np.uint8)
    pixels[40:80, 30:90] = 255
    mask = png(Image.fromarray(pixels))
    record = engine.register_template(png(image), "a hat", seed=1, steps=STEPS, mask=mask)
    masked = engine.edit(mask, "a hat", template_id=record.template_id)
    full = engine.edit(mask, "a hat", template_id=record.template_id, full_compute=True)
    assert masked.num_tokens == 17 * 15 and masked.computed_tokens < masked.num_tokens
    assert torch.equal(masked.latents, full.latents)


def test_the_routers_cost_of_a_mask_is_the_work_the_engine_counts(engine: Engine) -> None:
    """One cost function (StepCost) for both: the router prices a request by its mask
    with what the instance publishes, the instance counts its steps with the same."""
    from instgenie_protocol import mask_work

    record = engine.register_template(png(template_image(11)), "a hat", seed=1, steps=STEPS)
    mask = rect_mask(0.3, seed=11)
    state = engine.prepare_edit(png(mask), "a hat", template_id=record.template_id)
    engine.release(state)
    predicted = mask_work(np.asarray(mask) > 127, engine.family.pixels_per_token, engine.family.step_cost)
    assert state.row_work == pytest.approx(predicted)
    full = engine.prepare_edit(png(mask), "a hat", template_id=record.template_id, full_compute=True)
    # A full row-step costs the grid's tokens for every family (the unit of the step cost).
    assert full.row_work == pytest.approx(full.num_tokens, rel=0.05 if engine.family.reads_every_token else 1e-9)
    assert 0 < state.row_work < full.row_work


def test_second_engine_over_one_pipeline_computes_the_same(engines: dict) -> None:
    first = engines["sd3-inpaint"]
    mask = png(rect_mask(0.25, seed=12))
    record = first.register_template(png(template_image(12)), "a chair", seed=6, steps=2, mask=mask)
    before = first.edit(mask, "a chair", template_id=record.template_id)

    second = Engine(first.family.pipe, type(first.family), first.model_fingerprint, max_sequence_length=TEXT_LEN)
    second.add_template(record, record.activations)
    after = second.edit(mask, "a chair", template_id=record.template_id)

    assert torch.equal(before.latents, after.latents)


def test_template_budget_evicts_the_least_recently_used(model_dirs: dict) -> None:
    from instgenie.errors import CacheBudgetExceeded, UnknownTemplate

    probe = Engine.from_pretrained(str(model_dirs["flux-fill"]), max_sequence_length=TEXT_LEN)
    size = probe.register_template(png(template_image(40)), "a", seed=1, steps=2).activations.nbytes
    engine = Engine.from_pretrained(
        str(model_dirs["flux-fill"]), max_sequence_length=TEXT_LEN, cache={"host_budget_bytes": 2 * size}
    )
    first, second = (engine.register_template(png(template_image(40 + i)), "a", seed=1, steps=2) for i in range(2))
    engine.template(first.template_id)  # used: the second is now the least recently used
    third = engine.register_template(png(template_image(42)), "a", seed=1, steps=2)
    assert engine.template_ids() == sorted([first.template_id, third.template_id])
    with pytest.raises(UnknownTemplate):
        engine.template(second.template_id)

    tight = Engine.from_pretrained(
        str(model_dirs["flux-fill"]), max_sequence_length=TEXT_LEN, cache={"host_budget_bytes": size - 1}
    )
    with pytest.raises(CacheBudgetExceeded, match="cache budget"):
        tight.register_template(png(template_image(40)), "a", seed=1, steps=2)
    assert tight.template_ids() == []


class _ConcurrencyProbe:
    """Stands in for a tokenizer: counts callers inside it at once, then calls the real one."""

    def __init__(self, tokenizer: object) -> None:
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        self.inside = self.most_inside = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._tokenizer, name)

    def __call__(self, *args: object, **kwargs: object) -> object:
        with self._lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            time.sleep(0.02)  # long enough that unserialized callers always overlap here
            return self._tokenizer(*args, **kwargs)
        finally:
            with self._lock:
                self.inside -= 1


def test_concurrent_prompt_encodings_do_not_share_tokenizer_settings(engines: dict[str, Engine]) -> None:
    """Regression: worker threads encoding prompts at once raced on the fast tokenizer's
    padding settings (diffusers sets padding="max_length", then "longest"), so one prompt
    came back 3 tokens long and the batched step that concatenated it failed."""
    family = engines["flux-fill"].family
    settings = GenerationSettings(width=SIZE, height=SIZE, steps=2, guidance=3.5, seed=0, max_sequence_length=TEXT_LEN)
    real = family.pipe.tokenizer_2
    probe = family.pipe.tokenizer_2 = _ConcurrencyProbe(real)
    start = threading.Barrier(4)

    def encode(prompt: str) -> torch.Size:
        start.wait()
        return family.encode_prompt(prompt, settings).prompt_embeds.shape

    try:
        with ThreadPoolExecutor(4) as pool:
            shapes = list(pool.map(encode, ["a lamp", "a red hat on a chair", "x", "a lamp"]))
    finally:
        family.pipe.tokenizer_2 = real
    assert probe.most_inside == 1
    assert {shape[1] for shape in shapes} == {TEXT_LEN}
