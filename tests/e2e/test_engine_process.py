"""`serve --engine-mode process`: the engine loop in a process of its own (spawned, so it
imports and loads everything again, the compiled CPU kernels included) serves what the default
thread mode serves, streams, answers the engine check, and exits cleanly on SIGTERM."""

from __future__ import annotations

import re
import shutil
import signal

import pytest

from tests.e2e.conftest import CHAT_MODEL_NAME, _start

PROMPTS = ["Once upon a time", "The little dog", "Tom and Sue"]


@pytest.fixture()
def process_server(e2e_dir, chat_model_dir):
    s = _start("process_server", e2e_dir, [str(chat_model_dir), "--engine-mode", "process",
                                                  "--debug-endpoints"],
               model_name=CHAT_MODEL_NAME)
    yield s
    s.stop()


def test_process_mode_serves_the_thread_modes_tokens(process_server, server):
    for prompt in PROMPTS:
        body = dict(prompt=prompt, max_tokens=24, temperature=0, seed=0)
        assert process_server.complete(**body)["choices"][0]["text"] == \
            server.complete(**body)["choices"][0]["text"]
    chunks, raw = process_server.stream("/v1/completions",
                                        dict(prompt=PROMPTS[0], max_tokens=12, temperature=0))
    streamed = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
    assert streamed == server.complete(prompt=PROMPTS[0], max_tokens=12,
                                       temperature=0)["choices"][0]["text"]
    assert raw.rstrip().endswith("data: [DONE]")
    # A constraint crosses the pipe in the sampling params; the grammar compiles over there.
    constrained = dict(prompt=PROMPTS[0], max_tokens=24, temperature=0,
                       structured_outputs={"regex": "[0-9]{4}"})
    text = process_server.complete(**constrained)["choices"][0]["text"]
    assert re.fullmatch("[0-9]{4}", text)
    assert text == server.complete(**constrained)["choices"][0]["text"]
    assert process_server.get("/health").status_code == 200
    # The consistency check crosses the pipe like every command: the pool is whole.
    assert process_server.wait_settled()["num_blocks"] > 0
    log = process_server.log_path.read_text(errors="replace")
    assert "KV cache:" in log  # the engine process logs at the server's level
    if shutil.which("c++") or shutil.which("g++"):  # built or loaded inside the engine process
        assert re.search(r"kernels: attention cpu( \([^)]*\))?, fused layer ops on", log)
    process_server.proc.send_signal(signal.SIGTERM)
    assert process_server.proc.wait(timeout=30) == 0
