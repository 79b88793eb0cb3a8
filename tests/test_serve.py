"""The reward server on 127.0.0.1: same rewards as score_texts, concurrent clients, bad input."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import opposite_tastes

from sharelora import AdapterConfig, PersonalizedRewardModel
from sharelora.score import score_texts
from sharelora.train import TrainConfig, train

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def model(tiny_text_backbone, tmp_path_factory):
    torch.manual_seed(0)
    m = PersonalizedRewardModel.from_backbone(
        tiny_text_backbone, ["sunny", "rainy"], AdapterConfig(rank=4), max_length=24
    )
    cfg = TrainConfig(epochs=2, lr=1e-2, batch_size=8, progress=False, max_length=24)
    train(m, opposite_tastes(12), None, cfg)
    return m.eval()


@pytest.fixture(scope="module")
def server(model):
    """The app on a free loopback port, run by uvicorn in a thread; yields its base URL."""
    from sharelora.serve import build_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(build_app(model, batch_size=16, max_wait_ms=20), log_level="error")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "server did not start in 20 s"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv.should_exit = True
    thread.join(timeout=10)


ROWS = [(c.prompt, c.chosen, c.user) for c in opposite_tastes(4)]


def test_health_and_rewards_equal_score_texts(server, model):
    assert httpx.get(f"{server}/health").json()["users"] == 2
    prompts, responses, users = map(list, zip(*ROWS, strict=True))
    want = score_texts(model, prompts, responses, users)
    got = httpx.post(
        f"{server}/score", json={"prompts": prompts, "responses": responses, "users": users}
    ).json()
    assert got["rewards"] == pytest.approx(want, abs=1e-5)  # batch padding aside
    assert got["truncated"] == [False] * len(ROWS)
    openrlhf = httpx.post(
        f"{server}/get_reward",
        json={
            "query": [p + r for p, r in zip(prompts, responses, strict=True)],
            "prompts": prompts,
            "labels": users,
        },
    ).json()
    assert openrlhf["rewards"] == pytest.approx(want, abs=1e-5)
    assert openrlhf["scores"] == openrlhf["rewards"]


def test_a_long_text_is_cut_by_the_training_rule_and_flagged(server, model):
    long = "yes " + "word " * 100
    got = httpx.post(f"{server}/score", json={"responses": [long], "users": ["sunny"]}).json()
    assert got["truncated"] == [True]
    assert got["rewards"] == pytest.approx(score_texts(model, None, [long], ["sunny"]), abs=1e-5)


def test_32_concurrent_clients_each_get_their_own_rewards(server, model):
    def client(i: int):
        prompt, response, user = ROWS[i % len(ROWS)]
        response = f"{response} {i}"
        with httpx.Client(timeout=30) as c:
            got = c.post(
                f"{server}/score",
                json={"prompts": [prompt], "responses": [response], "users": [user]},
            )
        return got.status_code, got.json()["rewards"][0], (prompt, response, user)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(client, range(32)))
    assert all(status == 200 for status, _, _ in results)
    prompts, responses, users = map(list, zip(*(row for _, _, row in results), strict=True))
    want = score_texts(model, prompts, responses, users)
    assert [r for _, r, _ in results] == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize(
    "path,body,message",
    [
        ("/score", b"{not json", "malformed JSON"),
        ("/score", b"[1, 2]", "must be a JSON object"),
        ("/score", {"users": ["sunny"]}, "missing field 'responses'"),
        ("/score", {"responses": ["a", "b"], "users": ["sunny"]}, "has 1 entries but there are 2"),
        ("/score", {"responses": ["a"], "users": ["cloudy"]}, "unknown user 'cloudy'"),
        ("/score", {"responses": [3], "users": ["sunny"]}, "neither text nor a list"),
        ("/score", {"responses": ["a"]}, "missing field 'users'"),
        ("/get_reward", {"query": ["abc"], "prompts": ["x"], "labels": ["sunny"]}, "start with"),
        ("/get_reward", {"query": "abc", "labels": ["sunny"]}, "must be a list"),
    ],
)
def test_bad_input_is_a_400_with_one_line_and_the_server_stays_up(server, path, body, message):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    got = httpx.post(f"{server}{path}", headers={"content-type": "application/json"}, **kw)
    assert got.status_code == 400
    assert message in got.json()["error"] and "\n" not in got.json()["error"]
    assert httpx.get(f"{server}/health").status_code == 200


def test_unknown_users_get_the_population_when_asked(model):
    from fastapi.testclient import TestClient

    from sharelora.serve import build_app

    with TestClient(build_app(model, unknown_user="population")) as client:
        got = client.post("/score", json={"responses": ["yes a"], "users": ["cloudy"]})
    assert got.status_code == 200 and isinstance(got.json()["rewards"][0], float)
