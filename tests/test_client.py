"""The clients (gRPC, asyncio, HTTP/SSE) and the client CLI against a real Triton server."""

from __future__ import annotations

import asyncio
import io
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from conftest import SIZE, png, rect_mask, template_image
from instgenie_cli import main
from instgenie_client import (
    AsyncInstGenIEClient,
    InstGenIEClient,
    InstGenIEServerError,
    JobCancelled,
    Progress,
    SseInstGenIEClient,
)
from instgenie_protocol import sample_sum

STEPS = 3
LONG_STEPS = 100  # long enough to interrupt on a loaded machine: a full-mask step takes milliseconds here
PROMPT = "a photo"
TEMPLATE_PNG = png(template_image(21))
MASK_PNG = png(rect_mask(0.25, seed=21))
UNKNOWN_ID = "tpl-" + "f" * 20  # well formed, never registered
FULL_MASK_PNG = png(rect_mask(1.0))


@pytest.fixture(scope="module")
def client(triton_server) -> InstGenIEClient:
    return InstGenIEClient(triton_server.grpc_url, timeout_s=60)


@pytest.fixture(scope="module")
def template_id(client: InstGenIEClient) -> str:
    return client.register_template(TEMPLATE_PNG, PROMPT, steps=STEPS, seed=0)


@pytest.fixture(scope="module")
def long_template_id(client: InstGenIEClient) -> str:
    return client.register_template(png(template_image(22)), PROMPT, steps=LONG_STEPS)


@pytest.fixture(scope="module")
def reference(client: InstGenIEClient, template_id: str):
    """The gRPC edit every other client must reproduce byte for byte, with its progress updates."""
    updates: list[Progress] = []
    result = client.edit(MASK_PNG, "a red hat", template_id=template_id, request_id="ref-1", on_progress=updates.append)
    return result, updates


def metric(triton_server, name: str) -> float:
    with urllib.request.urlopen(triton_server.metrics_url, timeout=5) as response:
        return sample_sum(response.read().decode(), name)


def wait_for_metric(triton_server, name: str, predicate, timeout_s: float = 20.0) -> float:
    deadline = time.monotonic() + timeout_s
    while not predicate(value := metric(triton_server, name)):
        assert time.monotonic() < deadline, f"{name} stayed at {value}"
        time.sleep(0.02)
    return value


# -- gRPC -------------------------------------------------------------------------------


def test_register_is_stable_and_listed(client: InstGenIEClient, template_id: str) -> None:
    assert template_id.startswith("tpl-")
    assert client.register_template(TEMPLATE_PNG, PROMPT, steps=STEPS, seed=0) == template_id
    assert client.register_template(TEMPLATE_PNG, "another prompt", steps=STEPS, seed=0) != template_id
    assert template_id in client.list_templates()


def test_edit_returns_a_png_of_the_template_size_with_ordered_progress(reference) -> None:
    result, updates = reference
    assert Image.open(io.BytesIO(result.image)).size == (SIZE, SIZE)
    assert result.request_id == "ref-1"
    assert result.total_steps == STEPS
    assert 0 < result.computed_tokens < result.num_tokens
    assert [(u.step, u.total_steps, u.request_id) for u in updates] == [(s, STEPS, "ref-1") for s in range(1, STEPS + 1)]


def test_server_error_carries_reason_and_request_id_and_the_client_stays_usable(
    client: InstGenIEClient, template_id: str
) -> None:
    with pytest.raises(InstGenIEServerError) as info:
        client.edit(MASK_PNG, "x", template_id=UNKNOWN_ID, request_id="bad-1")
    assert (info.value.reason, info.value.request_id) == ("unknown_template", "bad-1")
    assert UNKNOWN_ID in info.value.message

    assert client.edit(MASK_PNG, "x", template_id=template_id).total_steps == STEPS


def test_cancel_stops_one_job_and_spares_the_other(triton_server, client: InstGenIEClient, long_template_id: str) -> None:
    cancelled_before = metric(triton_server, "instgenie_cancellations_total")
    doomed = client.submit(FULL_MASK_PNG, "a", template_id=long_template_id)
    survivor = client.submit(FULL_MASK_PNG, "b", template_id=long_template_id)

    next(iter(doomed.progress))  # the first step is done: the job is running on the server
    assert doomed.cancel() is True

    with pytest.raises(JobCancelled):
        doomed.result(timeout=30)
    assert survivor.result(timeout=60).total_steps == LONG_STEPS
    assert doomed.cancel() is False
    wait_for_metric(triton_server, "instgenie_cancellations_total", lambda v: v >= cancelled_before + 1)


def test_timeout_cancels_the_request(triton_server, long_template_id: str) -> None:
    cancelled_before = metric(triton_server, "instgenie_cancellations_total")
    impatient = InstGenIEClient(triton_server.grpc_url, timeout_s=0.2)
    with pytest.raises(TimeoutError, match="cancelled"):
        impatient.edit(FULL_MASK_PNG, "a", template_id=long_template_id)
    wait_for_metric(triton_server, "instgenie_cancellations_total", lambda v: v >= cancelled_before + 1)


# -- asyncio and SSE ----------------------------------------------------------------------


def test_async_client_matches_the_sync_result(triton_server, template_id: str, reference) -> None:
    expected, _ = reference

    async def run():
        client = AsyncInstGenIEClient(triton_server.grpc_url, timeout_s=60)
        updates = [u async for u in client.edit_stream(MASK_PNG, "a red hat", template_id=template_id)]
        edited = await client.edit(MASK_PNG, "a red hat", template_id=template_id)
        return updates, edited, await client.list_templates()

    updates, edited, templates = asyncio.run(run())
    assert [u.step for u in updates[:-1]] == list(range(1, STEPS + 1))
    assert updates[-1].image == expected.image
    assert edited.image == expected.image
    assert template_id in templates


def test_sse_client_matches_the_sync_result_and_reports_progress(triton_server, template_id: str, reference) -> None:
    expected, _ = reference
    client = SseInstGenIEClient(triton_server.http_url, timeout_s=60)
    updates: list[Progress] = []

    result = client.edit(MASK_PNG, "a red hat", template_id=template_id, request_id="sse-1", on_progress=updates.append)

    assert result.image == expected.image
    assert (result.request_id, result.computed_tokens, result.num_tokens) == (
        "sse-1", expected.computed_tokens, expected.num_tokens,
    )  # fmt: skip
    assert [(u.step, u.request_id) for u in updates] == [(s, "sse-1") for s in range(1, STEPS + 1)]
    with pytest.raises(InstGenIEServerError) as info:
        client.edit(MASK_PNG, "x", template_id=UNKNOWN_ID, request_id="sse-bad")
    assert (info.value.reason, info.value.request_id) == ("unknown_template", "sse-bad")


# -- CLI ------------------------------------------------------------------------------------


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "instgenie_cli", *args]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("client-cli")
    (root / "t.png").write_bytes(TEMPLATE_PNG)
    (root / "m.png").write_bytes(MASK_PNG)
    (root / "full.png").write_bytes(FULL_MASK_PNG)
    return root


def test_cli_edit_writes_a_png(triton_server, template_id: str, files: Path) -> None:
    out = files / "o.png"
    result = subprocess.run(
        cli("edit", "--url", triton_server.grpc_url, "--template-id", template_id, "--mask", str(files / "m.png"),
            "--prompt", "a red hat", "-o", str(out)),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (SIZE, SIZE)
    assert f"tokens in {STEPS} steps -> {out}" in result.stdout


# The commands below run in-process through main(): a subprocess spends seconds importing
# torch (the instgenie package loads the engine) and tests nothing more.


def test_cli_templates_register_and_list(triton_server, template_id: str, files: Path, capsys) -> None:
    url = ["--url", triton_server.grpc_url]
    register = ["templates", "register", *url, "--image", str(files / "t.png"), "--prompt", PROMPT, "--steps", str(STEPS), "--seed", "0"]
    assert main(register) == 0
    assert capsys.readouterr().out.strip() == template_id  # same content and settings: the library's id

    assert main(["templates", "list", *url]) == 0
    assert template_id in capsys.readouterr().out.splitlines()


def test_cli_edit_errors_exit_2_for_the_server_and_1_for_the_connection(triton_server, files: Path, capsys) -> None:
    edit = ["edit", "--template-id", UNKNOWN_ID, "--mask", str(files / "m.png"), "--prompt", "x", "-o", str(files / "x.png")]

    assert main([*edit, "--url", triton_server.grpc_url]) == 2
    assert re.search(r"error \(unknown_template\): unknown template .*\[request [0-9a-f]{32}\]", capsys.readouterr().err)
    assert main([*edit, "--url", "127.0.0.1:1"]) == 1
    assert re.search(r"\[request [0-9a-f]{32}\] unavailable: the gRPC stream to 127.0.0.1:1 failed", capsys.readouterr().err)
    assert not (files / "x.png").exists()


def test_cli_ctrl_c_cancels_the_request_on_the_server(triton_server, long_template_id: str, files: Path) -> None:
    cancelled_before = metric(triton_server, "instgenie_cancellations_total")
    process = subprocess.Popen(
        cli("edit", "--url", triton_server.grpc_url, "--template-id", long_template_id, "--mask", str(files / "full.png"),
            "--prompt", "x", "-o", str(files / "never.png")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A shell's background job starts with SIGINT ignored, and Python keeps it so: a
        # terminal's Ctrl-C, which this test plays, reaches a foreground CLI.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        wait_for_metric(triton_server, "instgenie_active_requests", lambda v: v >= 1, timeout_s=60)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()

    assert process.returncode == 130, stderr
    assert "cancelled" in stderr
    assert not (files / "never.png").exists()
    wait_for_metric(triton_server, "instgenie_cancellations_total", lambda v: v >= cancelled_before + 1)
