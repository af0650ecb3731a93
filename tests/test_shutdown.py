"""A bounded shutdown (api.shutdown, api.lanes): on SIGTERM a real `python -m api` answers new slow
requests 503 while it drains, stops the slow requests still in flight at LOGRA_SHUTDOWN_TIMEOUT_S
(each answered 503, never left hanging), and exits within that bound; the lane's drain in process;
the setting's validation."""
from __future__ import annotations

import re
import shutil
import signal
import threading
import time

import httpx
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from api.lanes import Busy, HeavyLane, ShuttingDown
from api.server import serve_in_subprocess
from api.settings import ServerSettings, SettingsError
from api.shutdown import FINISH_S

from .support import WORDS, build_corpus_index, running_api, subprocess_env, synthetic_corpus

BOUND_S = 4  # LOGRA_SHUTDOWN_TIMEOUT_S of the real server here
MARGIN_S = 10  # the contract is "exits within the bound": a generous margin, not a speed test
LONG = " ".join(WORDS[i % len(WORDS)] for i in range(400))  # past the model's 512 positions: 256 tokens scored


# -- the heavy lane's drain, in process --------------------------------------------------------------

def test_a_draining_lane_refuses_new_requests_and_cuts_those_in_flight_at_the_bound():
    lane = HeavyLane(running=1, queued=1)
    inside, release, outcomes = threading.Event(), threading.Event(), {}

    def request(name, hold):
        try:
            with lane.enter("token view"):
                inside.set()
                while hold and not release.is_set():
                    lane.checkpoint()  # a batch boundary
                    time.sleep(0.005)
            outcomes[name] = "done"
        except ShuttingDown as e:
            outcomes[name] = str(e)

    running = threading.Thread(target=request, args=("running", True))
    running.start()
    inside.wait(10)
    waiting = threading.Thread(target=request, args=("waiting", False))
    waiting.start()
    while lane.in_flight < 2:
        time.sleep(0.001)
    with pytest.raises(Busy, match="already running or waiting"):  # full: the usual refusal
        with lane.enter("valuation"):
            pass
    lane.drain(0.3)
    assert lane.draining and lane.in_flight == 2
    with pytest.raises(ShuttingDown, match="takes no new slow requests"):
        with lane.enter("valuation"):
            pass
    running.join(10), waiting.join(10)
    assert "stopped this request at its bound of 0.3 s" in outcomes["running"]
    assert "stopped this request" in outcomes["waiting"]  # gave up waiting at the bound
    assert lane.in_flight == 0


def test_requests_in_flight_finish_when_they_end_within_the_bound():
    lane = HeavyLane(running=1, queued=1)
    done = []

    def request():
        with lane.enter("token view"):
            for _ in range(5):
                lane.checkpoint()
                time.sleep(0.01)
        done.append(True)

    threads = [threading.Thread(target=request) for _ in range(2)]
    for t in threads:
        t.start()
    lane.drain(60)
    for t in threads:
        t.join(10)
    assert done == [True, True] and lane.in_flight == 0


# -- the setting -------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, reason", [("0", "greater than 0"), ("-3", "greater than 0"), ("inf", "finite number"),
                                           ("soon", "valid number")])
def test_a_bad_shutdown_timeout_names_its_variable(monkeypatch, value, reason):
    monkeypatch.setenv("LOGRA_SHUTDOWN_TIMEOUT_S", value)
    with pytest.raises(SettingsError, match=f"LOGRA_SHUTDOWN_TIMEOUT_S={value!r}: .*{reason}"):
        ServerSettings.from_env()


def test_the_shutdown_timeout_defaults_to_20_s_and_the_flag_wins(monkeypatch):
    monkeypatch.delenv("LOGRA_SHUTDOWN_TIMEOUT_S", raising=False)
    assert ServerSettings.from_env().shutdown_timeout_s == 20.0
    monkeypatch.setenv("LOGRA_SHUTDOWN_TIMEOUT_S", "7.5")
    assert ServerSettings.from_env().shutdown_timeout_s == 7.5
    assert ServerSettings.from_env(shutdown_timeout_s=3.0).shutdown_timeout_s == 3.0


# -- a real server -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slow_index(tmp_path_factory, gpt2_dir):
    """An index whose model makes a token view of LONG slow (256 copies of 512 tokens through a GPT-2
    128 wide with 4 blocks: about 25 s on the project's 2-core machine), so that slow requests are
    still in flight when the signal comes."""
    root = tmp_path_factory.mktemp("shutdown")
    model_dir = root / "model"
    shutil.copytree(gpt2_dir, model_dir)  # its tokenizer; the weights and config are replaced
    config = GPT2Config.from_pretrained(gpt2_dir)
    config.update({"n_positions": 512, "n_embd": 128, "n_layer": 4, "n_head": 4})
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    return build_corpus_index(root, str(model_dir), synthetic_corpus(20, seed=3))


def _slow_in_flight(url: str) -> int:
    text = httpx.get(url + "/metrics", timeout=60).text
    return int(float(re.search(r"^logra_slow_requests (\S+)$", text, re.M).group(1)))


def test_sigterm_drains_slow_requests_within_the_bound_and_exits(slow_index, tmp_path):
    env = subprocess_env(LOGRA_SHUTDOWN_TIMEOUT_S=str(BOUND_S))
    with serve_in_subprocess(slow_index, tmp_path, env=env) as (url, process, stderr):
        answers: dict[int, tuple[float, int | str, str]] = {}

        def token_view(i: int) -> None:
            try:
                r = httpx.post(url + "/attribute/tokens", json={"response": LONG, "id": f"doc-{i}"}, timeout=120)
                answers[i] = (time.monotonic(), r.status_code, r.text)
            except httpx.HTTPError as e:  # e.g. the connection closed without an answer: a failure below
                answers[i] = (time.monotonic(), type(e).__name__, str(e))

        views = [threading.Thread(target=token_view, args=(i,)) for i in range(3)]  # the lane's 1 running + 2 waiting
        for t in views:
            t.start()
        deadline = time.monotonic() + 60
        while _slow_in_flight(url) < 3:
            assert time.monotonic() < deadline and not answers, answers  # still running: LONG is slow to score
            time.sleep(0.05)

        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        while (health := httpx.get(url + "/health", timeout=60)).status_code == 200:  # the drain starts within a tick
            time.sleep(0.02)
        assert health.status_code == 503 and "shutting down" in health.json()["detail"]
        assert len(answers) < 3  # the token views take far longer than this: the listener is still open
        # while it drains: a new slow request is refused with a message; fast requests are still answered
        new = httpx.post(url + "/attribute/tokens", json={"response": LONG, "id": "doc-5"}, timeout=60)
        assert new.status_code == 503 and "takes no new slow requests" in new.json()["detail"], new.text
        assert new.headers["retry-after"]
        assert httpx.get(url + "/documents", params={"id": "doc-5"}, timeout=60).status_code == 200

        code = process.wait(timeout=max(1.0, signalled + BOUND_S + FINISH_S + MARGIN_S - time.monotonic()))
        exited = time.monotonic()
        for t in views:
            t.join(5)
        stderr.seek(0)
        log = stderr.read()
    assert code == -signal.SIGTERM, log[-2000:]  # uvicorn's way: the signal raised again once stopped
    assert exited - signalled <= BOUND_S + FINISH_S + MARGIN_S
    assert "Draining: slow requests in flight: 3" in log
    # every request in flight got an answer before the process ended: done, or stopped at the bound
    assert sorted(answers) == [0, 1, 2]
    for at, status, text in answers.values():
        assert at <= exited
        assert status == 200 or (status == 503 and f"stopped this request at its bound of {BOUND_S} s" in text), text
    # after the exit the port is closed: a new connection is refused
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health")


def test_with_nothing_in_flight_sigterm_does_not_wait_out_the_bound(slow_index, tmp_path):
    with running_api(slow_index, tmp_path, args=("--shutdown-timeout", "120")) as (url, process, _):
        assert httpx.get(url + "/health", timeout=60).status_code == 200
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = process.wait(timeout=110)
    assert code == -signal.SIGTERM and time.monotonic() - signalled < 110
