"""Shared fixtures: tiny real-architecture models built once per test session."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from instgenie import Engine
from instgenie.tiny import FAMILIES, make_model

TEXT_LEN = 32  # max_sequence_length of the tiny engines: short prompts, fast tests
SIZE = 128  # tiny test images: 8x8 = 64 tokens


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {family: make_model(family, root / family, size="tiny") for family in FAMILIES}


#: Every family in its default design, and the UNets again in their other one ("+b":
#: sparse convolutions off; the UNets' default is design (c), "+c").
VARIANTS = (*FAMILIES, "sdxl-inpaint+b", "sd-inpaint+b")


def family_of(variant: str) -> str:
    """The model family of an engine variant (its model folder)."""
    return variant.split("+")[0]


def options_of(variant: str) -> dict[str, object]:
    design = variant.partition("+")[2]
    return {"sparse_convs": design == "c"} if design else {}


@pytest.fixture(scope="session")
def engines(model_dirs: dict[str, Path]) -> dict[str, Engine]:
    """One engine per variant; a "+" one loads its own pipeline (hooks differ by design)."""
    return {
        variant: Engine.from_pretrained(
            str(model_dirs[family_of(variant)]), max_sequence_length=TEXT_LEN, family_options=options_of(variant)
        )
        for variant in VARIANTS
    }


@pytest.fixture(params=VARIANTS)
def family(request: pytest.FixtureRequest) -> str:
    """An engine variant: a family, or a UNet family in its other design ("+b", "+c")."""
    return request.param


@pytest.fixture
def engine(engines: dict[str, Engine], family: str) -> Engine:
    return engines[family]


def engine_over(base: Engine, **store: object) -> Engine:
    """A second engine over ``base``'s loaded pipeline with its own cache store."""
    from instgenie.cache import ActivationStore

    return Engine(
        base.family.pipe,
        type(base.family),
        base.model_fingerprint,
        max_sequence_length=TEXT_LEN,
        store=ActivationStore(base.model_fingerprint, **store),  # type: ignore[arg-type]
        family_options=base.family.options,
    )


def template_image(seed: int = 0, size: int = SIZE) -> Image.Image:
    """A smooth random picture (gradients + blobs), so the VAE sees structure."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    channels = [np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y + rng.uniform())) for _ in range(3)]
    pixels = (np.stack(channels, -1) * 0.5 + 0.5) * 255
    return Image.fromarray(pixels.astype(np.uint8))


def rect_mask(ratio: float, size: int = SIZE, seed: int = 0) -> Image.Image:
    """A white rectangle covering about ``ratio`` of the picture (all of it at 1.0)."""
    mask = np.zeros((size, size), np.uint8)
    if ratio >= 1.0:
        mask[:] = 255
    elif ratio > 0:
        rng = np.random.default_rng(seed)
        side = max(1, int(round(size * ratio**0.5)))
        top, left = rng.integers(0, size - side + 1, 2)
        mask[top : top + side, left : left + side] = 255
    return Image.fromarray(mask)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# -- a real Triton server over the tiny flux-fill model ---------------------------------

SERVED_FAMILY = "flux-fill"
SERVER_MAX_WAITING = 6  # small, so queue-full is reachable in tests


@pytest.fixture(scope="session")
def triton_server(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """A tritonserver serving ``model_repository/`` with the tiny flux-fill model (session-wide)."""
    from instgenie_server.launcher import TritonServer, default_model_repository, models_with_parameter, render_repository

    source = default_model_repository()
    parameters = {
        "model_dir": str(model_dirs[SERVED_FAMILY]),
        "max_sequence_length": str(TEXT_LEN),
        "max_active": "4",
        "max_waiting": str(SERVER_MAX_WAITING),
        "drain_timeout_s": "20",
        # The step loop keeps both cores of a CI machine busy; a lower-priority codec
        # process would then prepare a request over many steps, and these tests time
        # admission, not CPU shares (bench/step_cadence.py measures that trade-off).
        "codec_nice": "0",
        # Many tests edit one raw image more than once, and several compare results bit for
        # bit: a background recording batched with them would change their rounding. The
        # router tests' instances run the default (second_sight) and test it.
        "auto_register": "off",
        # The outbox is a GPU server's default and off on a CPU; the serving tests run
        # through it (the router's and the fault tests' instances run the CPU default).
        "outbox": "on",
    }
    root = tmp_path_factory.mktemp("triton")
    parameters["cache_dir"] = str(root / "cache")  # the disk tier; servers started from this repository share it
    repository = render_repository(source, root / "models", {name: parameters for name in models_with_parameter(source, "model_dir")})
    server = TritonServer(repository, log_file=root / "server.log")
    with server:
        _SERVERS.append(server)
        yield server
        _SERVERS.remove(server)


_SERVERS: list = []  # the session's running servers, for failure reports


@pytest.fixture(autouse=True)
def _session_server_alive(request: pytest.FixtureRequest):
    """A test that uses the session server fails at once, with the cause, if it died earlier.

    Otherwise every later test fails with "connection refused" and hides the one
    that killed it; the log tail says why (e.g. a signal in a backend thread).
    """
    if "triton_server" in request.fixturenames:
        server = request.getfixturevalue("triton_server")
        if not server.alive():
            pytest.fail(f"the session tritonserver died earlier (status {server.exit_code}):\n{server.log_tail(4000)}")
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Attach the server's exit status and log tail to a failed test that used it.

    A server that dies mid-suite fails every later test with "connection refused";
    its log is the only place the cause is written, and CI keeps nothing else.
    """
    outcome = yield
    report = outcome.get_result()
    if report.failed and "triton_server" in item.fixturenames:
        for server in _SERVERS:
            state = "running" if server.alive() else f"exited with code {server.exit_code}"
            report.sections.append(("tritonserver", f"tritonserver {state}\n{server.log_tail(12000)}"))


def batched_tolerance(reference: torch.Tensor, guidance: float | None = None) -> float:
    """How far a result batched with other requests may be from the same request alone.

    Batched CPU kernels round differently from solo ones, about 1e-6 relative per
    call, and the difference grows over steps to ~1e-5 of the latents' scale (about 4
    for the DiT families, up to 10 for the UNets' epsilon-scaled latents); classifier-free
    guidance multiplies it by up to its scale (``guidance``, ``None`` without CFG).
    """
    scale = max(1.0, reference.abs().max().item() / 4)
    return 1e-5 * (guidance or 1.0) * scale
