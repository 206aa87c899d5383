"""Prompt encoding and VAE work in a separate process give exactly the in-process results."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from conftest import TEXT_LEN, png, rect_mask, template_image
from instgenie import Engine
from instgenie.codec import ProcessCodec


def test_process_codec_results_equal_local_codec(model_dirs: dict[str, Path]) -> None:
    engine = Engine.from_pretrained(str(model_dirs["flux-fill"]), max_sequence_length=TEXT_LEN)
    mask, image = png(rect_mask(0.3, seed=3)), png(template_image(31))
    local = engine.edit(mask, "a lamp", image=image, seed=4, steps=3)
    local_template = engine.register_template(image, "a room", seed=4, steps=3)
    local_edited = engine.edit(mask, "a hat", template_id=local_template.template_id)

    engine.use_codec(ProcessCodec(engine.family, str(model_dirs["flux-fill"]), workers=1, nice=5))
    # Every VAE call must now happen in the worker, including FluxFill's encode of the
    # masked image on the template-reuse path (it would otherwise contend with the loop).
    vae = engine.family.pipe.vae

    def in_process_vae(*_: object) -> None:
        raise AssertionError("the VAE ran in the step loop's process")

    hooks = [vae.encoder.register_forward_pre_hook(in_process_vae), vae.decoder.register_forward_pre_hook(in_process_vae)]
    try:
        remote = engine.edit(mask, "a lamp", image=image, seed=4, steps=3)
        remote_template = engine.register_template(image, "a room", seed=4, steps=3)
        edited = engine.edit(mask, "a hat", template_id=remote_template.template_id)
    finally:
        engine.codec.close()
        for hook in hooks:
            hook.remove()
    assert torch.equal(local.latents, remote.latents)
    assert np.array_equal(np.asarray(local.image), np.asarray(remote.image))
    assert local.png == remote.png
    assert remote_template.template_id == local_template.template_id
    assert torch.equal(local_template.final_latents, remote_template.final_latents)
    assert edited.computed_tokens < edited.num_tokens
    assert torch.equal(local_edited.latents, edited.latents)
    assert local_edited.png == edited.png


def test_codec_workers_exit_when_their_parent_dies(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import sys, time\n"
        "from instgenie import Engine\n"
        "from instgenie.codec import ProcessCodec\n"
        f"engine = Engine.from_pretrained({str(model_dirs['flux-fill'])!r}, max_sequence_length=8)\n"
        f"codec = ProcessCodec(engine.family, {str(model_dirs['flux-fill'])!r})\n"
        "print(*[p.pid for p in codec._pool._processes.values()], flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    workers = [int(pid) for pid in parent.stdout.readline().split()]
    assert workers
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 15
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in workers if os.path.exists(f"/proc/{pid}") and "Z" not in open(f"/proc/{pid}/stat").read().split()[2]]
    assert not alive, f"orphaned codec workers {alive}"


def test_beside_a_process_codec_helpers_run_single_threaded_and_the_loop_keeps_its_threads(
    model_dirs: dict[str, Path],
) -> None:
    """The step loop's OpenMP team stays the process's only one (``compute_threads``),
    and the edit is still byte for byte the in-process one."""
    from instgenie.step_loop import EditRequest, JobOutcome, LoopObserver, StepLoop

    engine = Engine.from_pretrained(str(model_dirs["flux-fill"]), max_sequence_length=TEXT_LEN)
    template = engine.register_template(png(template_image(32)), "a room", seed=5, steps=3)
    mask = png(rect_mask(0.3, seed=5))
    reference = engine.edit(mask, "a hat", template_id=template.template_id)
    loop_threads = torch.get_num_threads()

    class StepThreads(LoopObserver):
        seen: set[int] = set()

        def step(self, duration_s: float, batch_size: int, row_tokens: float) -> None:
            self.seen.add(torch.get_num_threads())  # called on the loop's thread

    class Sink:
        outcome: JobOutcome | None = None
        finished_on: int | None = None

        def __init__(self) -> None:
            self.done = threading.Event()

        def cancelled(self) -> bool:
            return False

        def progress(self, step: int, total_steps: int) -> None:
            pass

        def finish(self, outcome: JobOutcome) -> None:  # called on a helper thread
            self.outcome, self.finished_on = outcome, torch.get_num_threads()
            self.done.set()

        def fail(self, error: Exception) -> None:
            self.done.set()

    engine.use_codec(ProcessCodec(engine.family, str(model_dirs["flux-fill"]), workers=1, nice=5))
    observer = StepThreads()
    loop = StepLoop(engine, observer=observer)
    try:
        sink = Sink()
        loop.submit(EditRequest("threads", prompt="a hat", mask=mask, template_id=template.template_id), sink)
        assert sink.done.wait(60)
    finally:
        loop.stop()
        engine.codec.close()
    assert sink.outcome is not None and sink.outcome.png == reference.png
    assert observer.seen == {loop_threads}
    assert sink.finished_on == 1
