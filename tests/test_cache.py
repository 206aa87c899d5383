"""The activation cache store: modes, host and disk tiers, prefetch, failures."""

from __future__ import annotations

import io
import resource
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TEXT_LEN, engine_over, png, rect_mask, template_image
from instgenie import Engine
from instgenie.cache import ActivationStore, CacheMode
from instgenie.cache.disk import DiskTier, step_file
from instgenie.cache.entry import StepKV
from instgenie.cache.host import HostTier
from instgenie.cache.staging import CopyStage, StagedSource
from instgenie.errors import CacheBudgetExceeded, CacheCorrupt, CacheWriteFailed, UnknownTemplate
from instgenie.scheduler import FcfsScheduler, SchedulerConfig
from instgenie.step_loop import EditRequest, JobOutcome, StepLoop

TPL = "tpl-" + "0" * 20  # a template id of the one accepted form

STEPS = 3
BF16_TOLERANCE = 0.05  # max |latent difference| of an edit equal to its template, bf16 K/V (tiny models)


def exactness(engine: Engine, seed: int = 1, ratio: float = 0.3) -> tuple[torch.Tensor, torch.Tensor, str]:
    mask = png(rect_mask(ratio, seed=seed))
    record = engine.register_template(png(template_image(seed)), "a red hat", seed=7, steps=STEPS, mask=mask)
    masked = engine.edit(mask, "a red hat", template_id=record.template_id)
    full = engine.edit(mask, "a red hat", template_id=record.template_id, full_compute=True)
    assert masked.computed_tokens < masked.num_tokens
    return masked.latents, full.latents, record.template_id


# -- storage modes: exactness for every family ----------------------------------------
def test_cache_mode_parses_its_config_text() -> None:
    assert CacheMode.parse("float32") == CacheMode()
    assert CacheMode.parse("unmasked, input,bfloat16").name == "input-bfloat16-unmasked"
    assert CacheMode.parse("input").stores_inputs and not CacheMode().stores_inputs
    for bad in ("float16", "input,outputs"):
        with pytest.raises(ValueError):
            CacheMode.parse(bad)


@pytest.mark.parametrize("content", ["kv", "input"])
@pytest.mark.parametrize("tokens", ["all", "unmasked"])
@pytest.mark.parametrize("seed,ratio", [(1, 0.3), (2, 0.6)])  # 0.6: 15 cached tokens, fewer than a padded GEMM
def test_lossless_modes_from_disk_are_bit_exact(
    engine: Engine, tokens: str, content: str, seed: int, ratio: float, tmp_path: Path
) -> None:
    # A host budget of one byte: every step streams from disk through the prefetcher.
    mode = CacheMode("float32", tokens, content)  # type: ignore[arg-type]
    cached = engine_over(engine, mode=mode, disk_dir=tmp_path, host_budget_bytes=1)
    masked, full, _ = exactness(cached, seed=seed, ratio=ratio)
    assert torch.equal(masked, full)
    stats = cached.store.stats()
    assert stats.disk_loads >= STEPS and stats.writes == 1


def test_smaller_modes_store_fewer_bytes(engines: dict, tmp_path: Path) -> None:
    base = engines["flux-fill"]
    sizes = {}
    for mode in ("float32", "unmasked", "input", "input,unmasked"):
        cached = engine_over(base, mode=CacheMode.parse(mode), disk_dir=tmp_path / mode)
        mask = png(rect_mask(0.25, seed=3))
        record = cached.register_template(png(template_image(3)), "a cup", seed=2, steps=STEPS, mask=mask)
        sizes[mode] = record.cache_bytes
    assert sizes["unmasked"] < 0.85 * sizes["float32"]
    assert sizes["input"] * 2 == sizes["float32"]  # one input [N, C] instead of K and V
    assert sizes["input,unmasked"] * 2 == sizes["unmasked"]


@pytest.mark.parametrize("content", ["kv", "input"])
def test_bf16_mode_halves_bytes_within_tolerance(engine: Engine, content: str, tmp_path: Path) -> None:
    exact = engine_over(engine, mode=CacheMode("float32", content=content), disk_dir=tmp_path / "f32")  # type: ignore[arg-type]
    half = engine_over(engine, mode=CacheMode("bfloat16", content=content), disk_dir=tmp_path / "bf16")  # type: ignore[arg-type]
    _, _, template_id = exactness(exact)
    masked, full, half_id = exactness(half)
    assert half_id == template_id
    difference = (masked - full).abs().max().item()
    print(f"{type(engine.family).__name__}: bf16 {content} cache, max |masked - full| = {difference:.3g}")
    assert difference <= BF16_TOLERANCE
    assert half.template(half_id).cache_bytes == exact.template(template_id).cache_bytes // 2


# -- disk tier ---------------------------------------------------------------------------
def test_restart_serves_templates_from_disk(engines: dict, tmp_path: Path) -> None:
    base = engines["flux-fill"]
    first = engine_over(base, disk_dir=tmp_path)
    mask = png(rect_mask(0.3, seed=5))
    record = first.register_template(png(template_image(5)), "a vase", seed=3, steps=STEPS, mask=mask)
    before = first.edit(mask, "a vase", template_id=record.template_id)

    restarted = engine_over(base, disk_dir=tmp_path)
    assert restarted.template_ids() == [record.template_id]
    after = restarted.edit(mask, "a vase", template_id=record.template_id)
    assert torch.equal(before.latents, after.latents)
    assert before.png == after.png


def test_other_model_never_reads_the_cache(engines: dict, tmp_path: Path) -> None:
    base = engines["flux-fill"]
    record = engine_over(base, disk_dir=tmp_path).register_template(png(template_image(6)), "a", seed=1, steps=STEPS)
    other = Engine(
        base.family.pipe, type(base.family), "another-model", max_sequence_length=TEXT_LEN,
        store=ActivationStore("another-model", disk_dir=tmp_path),
    )  # fmt: skip
    with pytest.raises(CacheCorrupt):  # recorded for another model: never used
        other.edit(png(rect_mask(0.3)), "a", template_id=record.template_id)


def _disk_with_one_template(tmp_path: Path) -> tuple[DiskTier, dict[str, torch.Tensor]]:
    disk = DiskTier(tmp_path, "kv-float32-all", "model")
    tensors = {"k.0.0": torch.randn(4, 8), "v.0.0": torch.randn(4, 8)}
    disk.write(TPL, {"x": torch.arange(3)}, {"a": "b"}, [(0, tensors), (1, tensors)])
    return disk, tensors


def test_disk_round_trip_is_exact(tmp_path: Path) -> None:
    disk, tensors = _disk_with_one_template(tmp_path)
    loaded = disk.read_step(TPL, 1)
    assert all(torch.equal(loaded[name], tensors[name]) for name in tensors)
    meta, info = disk.read_meta(TPL)
    assert torch.equal(meta["x"], torch.arange(3)) and info == {"a": "b"}


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_damaged_files_are_detected(tmp_path: Path, damage: str) -> None:
    disk, _ = _disk_with_one_template(tmp_path)
    path = disk.folder / TPL / step_file(1)
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x40
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "delete":
        path.unlink()
    else:
        (disk.folder / TPL / "manifest.json").write_text("{not json")
    with pytest.raises(CacheCorrupt):
        disk.read_step(TPL, 1)


@pytest.mark.parametrize("template_id", ["../outside", "/etc", "tpl-../../x", "TPL-" + "0" * 20, "tpl-" + "0" * 19, ""])
def test_the_disk_tier_takes_only_template_ids(tmp_path: Path, template_id: str) -> None:
    disk, _ = _disk_with_one_template(tmp_path / "cache")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "manifest.json").write_text("{}")
    assert not disk.has(template_id)
    for touch in (lambda: disk.read_step(template_id, 0), lambda: disk.manifest(template_id), lambda: disk.template_dir(template_id)):
        with pytest.raises(UnknownTemplate) as info:
            touch()
        assert str(tmp_path) not in str(info.value)  # no server path in what a client is told
    disk.delete(template_id)  # refused quietly
    assert (tmp_path / "outside" / "manifest.json").is_file() and disk.has(TPL)


def test_links_planted_in_the_cache_folder_are_refused_never_followed_or_deleted(tmp_path: Path) -> None:
    disk, _ = _disk_with_one_template(tmp_path / "cache")
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("manifest.json", step_file(0)):
        (outside / name).write_bytes((disk.folder / TPL / name).read_bytes())
    linked_folder = "tpl-" + "1" * 20
    (disk.folder / linked_folder).symlink_to(outside, target_is_directory=True)
    assert not disk.has(linked_folder) and linked_folder not in disk.template_ids()
    with pytest.raises(CacheCorrupt) as info:
        disk.read_step(linked_folder, 0)
    assert str(outside) not in str(info.value)
    disk.delete(linked_folder)
    assert (disk.folder / linked_folder).is_symlink() and (outside / step_file(0)).is_file()
    # A link in place of a file of a real template: that read fails, the target stays.
    (disk.folder / TPL / step_file(0)).unlink()
    (disk.folder / TPL / step_file(0)).symlink_to(outside / step_file(0))
    with pytest.raises(CacheCorrupt):
        disk.read_step(TPL, 0)
    disk.delete(TPL)  # the template's own folder goes; the link's target does not
    assert not (disk.folder / TPL).exists() and (outside / step_file(0)).is_file()


def test_a_crash_mid_write_leaves_nothing_that_loads(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, "kv-float32-all", "model")

    def steps():
        yield 0, {"k.0.0": torch.ones(2)}
        raise OSError(28, "No space left on device")

    with pytest.raises(CacheWriteFailed, match="No space left"):
        disk.write(TPL, {}, {}, steps())
    assert not disk.has(TPL) and disk.template_ids() == []
    assert not list(disk.folder.iterdir())  # the partial folder is gone
    (disk.folder / ".partial-tpl-dead").mkdir()  # as a killed process would leave it
    assert not list(DiskTier(tmp_path, "kv-float32-all", "model").folder.iterdir())


@pytest.mark.parametrize("failure", ["disk_full", "unwritable"])
def test_failed_cache_write_is_a_clear_error_and_others_keep_serving(engines: dict, tmp_path: Path, failure: str) -> None:
    base = engines["flux-fill"]
    engine = engine_over(base, disk_dir=tmp_path)
    kept = engine.register_template(png(template_image(7)), "a", seed=1, steps=STEPS)
    folder = engine.store.disk.folder  # type: ignore[union-attr]
    moved = tmp_path / "moved"
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        if failure == "disk_full":  # files cannot grow past 4 KiB: writes fail with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))
        else:  # the cache folder is replaced by a file (works as root, unlike chmod)
            folder.rename(moved)
            folder.write_text("not a folder")
        with pytest.raises(CacheWriteFailed, match="cannot write"):
            engine.register_template(png(template_image(8)), "b", seed=1, steps=STEPS)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
        if moved.exists():
            folder.unlink()
            moved.rename(folder)
    assert not [p for p in folder.iterdir() if p.name.startswith(".partial")]
    result = engine.edit(png(rect_mask(0.3)), "a", template_id=kept.template_id)
    assert result.computed_tokens < result.num_tokens


# -- host tier -----------------------------------------------------------------------------
def _entry(nbytes: int) -> StepKV:
    return StepKV({(0, 0): (torch.zeros(nbytes // 8), torch.zeros(nbytes // 8))}, None)


def test_host_tier_evicts_least_recently_used_but_never_pinned() -> None:
    tier = HostTier(budget_bytes=300)
    tier.put(("a", 0), _entry(100))
    tier.put(("b", 0), _entry(100), pin=True)
    tier.put(("c", 0), _entry(100))
    tier.get(("a", 0))
    tier.put(("d", 0), _entry(100))  # over budget: c is the least recently used unpinned
    assert not tier.contains(("c", 0)) and tier.contains(("a", 0)) and tier.contains(("b", 0))
    tier.put(("e", 0), _entry(100))
    tier.put(("f", 0), _entry(100))
    assert tier.contains(("b", 0)), "a pinned entry was evicted"
    assert tier.nbytes <= 300
    tier.unpin(("b", 0))
    tier.put(("g", 0), _entry(100))
    assert not tier.contains(("b", 0))


def test_host_only_store_refuses_a_template_larger_than_its_budget(engines: dict) -> None:
    engine = engine_over(engines["flux-fill"], host_budget_bytes=1000)
    with pytest.raises(CacheBudgetExceeded, match="no disk tier"):
        engine.register_template(png(template_image(9)), "a", seed=1, steps=STEPS)


def test_host_only_eviction_forgets_whole_templates(engines: dict) -> None:
    probe = engines["flux-fill"].register_template(png(template_image(10)), "a", seed=1, steps=STEPS)
    engine = engine_over(engines["flux-fill"], host_budget_bytes=int(1.5 * probe.cache_bytes))
    first = engine.register_template(png(template_image(10)), "a", seed=1, steps=STEPS)
    second = engine.register_template(png(template_image(11)), "a", seed=1, steps=STEPS)
    assert engine.template_ids() == [second.template_id]
    with pytest.raises(UnknownTemplate):
        engine.edit(png(rect_mask(0.3)), "a", template_id=first.template_id)


# -- under the step loop --------------------------------------------------------------------
class _Sink:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.outcome: JobOutcome | None = None
        self.error: Exception | None = None

    def cancelled(self) -> bool:
        return False

    def progress(self, step: int, total_steps: int) -> None:
        pass

    def finish(self, outcome: JobOutcome) -> None:
        self.outcome = outcome
        self.done.set()

    def fail(self, error: Exception) -> None:
        self.error = error
        self.done.set()


def _run(loop: StepLoop, requests: list[EditRequest]) -> list[_Sink]:
    sinks = [_Sink() for _ in requests]
    for request, sink in zip(requests, sinks):
        loop.submit(request, sink)
    for sink in sinks:
        assert sink.done.wait(300)
    return sinks


def test_eviction_while_20_requests_over_10_templates_run(engines: dict, tmp_path: Path) -> None:
    base = engines["flux-fill"]
    reference = engine_over(base)
    loaded = engine_over(base, disk_dir=tmp_path)
    templates, expected = [], {}
    for i in range(10):
        record = loaded.register_template(png(template_image(20 + i)), "a room", seed=i, steps=STEPS)
        reference.add_template(record, record.activations)
        templates.append(record.template_id)
    # Room for about two templates: running requests keep evicting each other's steps.
    loaded.store.host.budget_bytes = 2 * record.cache_bytes
    requests = []
    for i in range(20):
        mask, template_id = png(rect_mask(0.2 + 0.02 * i, seed=i)), templates[i % 10]
        expected[f"r{i}"] = reference.edit(mask, "a lamp", template_id=template_id).png
        requests.append(EditRequest(f"r{i}", prompt="a lamp", mask=mask, template_id=template_id))
    loop = StepLoop(loaded, scheduler=FcfsScheduler(SchedulerConfig(max_active=6)), max_waiting=32)
    try:
        sinks = _run(loop, requests)
    finally:
        loop.stop()
    assert [s.error for s in sinks] == [None] * 20
    for request, sink in zip(requests, sinks):
        assert sink.outcome is not None and sink.outcome.png is not None
        # Batched with others: equal to running alone up to batched-kernel rounding.
        got = np.asarray(Image.open(io.BytesIO(sink.outcome.png)), dtype=np.int16)
        alone = np.asarray(Image.open(io.BytesIO(expected[request.request_id])), dtype=np.int16)
        assert np.abs(got - alone).max() <= 1, request.request_id
    stats = loaded.store.stats()
    assert stats.evictions > 0 and stats.disk_loads > 0
    assert stats.host_bytes <= loaded.store.host.budget_bytes + 6 * STEPS * record.cache_bytes // STEPS


def test_corrupt_step_file_fails_the_edit_clearly_and_is_recorded_again(engines: dict, tmp_path: Path) -> None:
    base = engines["flux-fill"]
    engine = engine_over(base, disk_dir=tmp_path, host_budget_bytes=1)
    mask = png(rect_mask(0.3, seed=2))
    record = engine.register_template(png(template_image(30)), "a", seed=1, steps=STEPS)
    good = engine.edit(mask, "a", template_id=record.template_id)
    path = engine.store.disk.folder / record.template_id / step_file(1)  # type: ignore[union-attr]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    loop = StepLoop(engine, max_waiting=8)
    try:
        (failed,) = _run(loop, [EditRequest("bad", prompt="a", mask=mask, template_id=record.template_id)])
        assert isinstance(failed.error, CacheCorrupt) and "recorded again" in str(failed.error)
        deadline = time.monotonic() + 120
        while not engine.has_template(record.template_id) and time.monotonic() < deadline:
            time.sleep(0.05)
        (retried,) = _run(loop, [EditRequest("retry", prompt="a", mask=mask, template_id=record.template_id)])
    finally:
        loop.stop()
    assert retried.error is None and retried.outcome is not None
    assert retried.outcome.png == good.png
    assert engine.store.stats().corrupt == 1


# -- host->device staging -----------------------------------------------------------------
def test_copy_stage_issues_each_site_one_ahead_and_holds_two_at_most() -> None:
    kv = {(row, site): (torch.full((4, 2), 10.0 * row + site), torch.full((4, 2), -1.0)) for row in (0, 1) for site in range(4)}
    step = StepKV(kv, kept=None)
    stage = CopyStage([step.row(0), None, step.row(1)], num_sites=4, first_site=1, device=torch.device("cpu"))
    assert stage.issued == [1]  # issued before the call's first (recomputed) block runs
    for site in (1, 2, 3):
        for row, source_row in ((0, 0), (2, 1)):
            key, _ = StagedSource(stage, row, step.row(source_row)).kv(site)
            assert torch.equal(key, kv[(source_row, site)][0])
        assert stage.issued == list(range(1, min(site + 2, 4)))  # the next site is on its way
        assert stage.in_flight <= 2
    with pytest.raises(KeyError):
        stage.tensors(1, 3)  # a row without a cache


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the copy stream)")
@pytest.mark.parametrize("content", ["kv", "input"])
def test_gpu_edit_through_the_copy_stream_matches_the_full_computation(model_dirs: dict, content: str, tmp_path: Path) -> None:
    engine = Engine.from_pretrained(
        str(model_dirs["flux-fill"]), device="cuda", max_sequence_length=TEXT_LEN,
        cache={"mode": CacheMode(content=content), "disk_dir": tmp_path},  # type: ignore[arg-type]
    )  # fmt: skip
    masked, full, _ = exactness(engine)
    assert (masked - full).abs().max().item() <= 1e-4  # GPU kernels differ by token count, not bit-exact
