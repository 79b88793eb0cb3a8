"""The reward server on 127.0.0.1: same rewards as score_texts, concurrent clients, bad input."""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import opposite_tastes

from sharelora import AdapterConfig, PersonalizedRewardModel
from sharelora.recipe import TrainConfig, train
from sharelora.score import score_texts

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


@contextlib.contextmanager
def running(app):
    """``app`` on a free loopback port, run by uvicorn in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="error"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "server did not start in 20 s"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(model):
    from sharelora.serve import build_app

    with running(build_app(model, batch_size=16, max_wait_ms=20)) as url:
        yield url


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
        ("/classify", {"model": "sunny", "input": [1]}, "'input' must be a string or a list"),
        ("/classify", {"input": "a"}, "'model' must name a user"),
        ("/classify", {"model": "cloudy", "input": "a"}, "unknown user 'cloudy'"),
        ("/classify", {"model": "sharelora", "input": "a"}, "--unknown-user population"),
        ("/classify", {"model": "sunny", "input": "a", "activation": 1}, "'activation' must be"),
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


def _classify(url: str, user: str, texts, **extra) -> dict:
    got = httpx.post(f"{url}/classify", json={"model": user, "input": texts, **extra})
    assert got.status_code == 200, got.text
    return got.json()


def test_verl_reads_each_users_raw_reward_from_classify(server, model):
    text = "question 1? yes apple river"
    for user in ("sunny", "rainy"):
        want = score_texts(model, None, [text], [user])[0]
        # verl's reward loop: one chat-templated string, activation off, data[-1].probs[-1].
        answer = _classify(server, user, text, activation=False)
        assert answer["data"][-1]["probs"][-1] == pytest.approx(want, abs=1e-5)
        assert answer["object"] == "list" and answer["model"] == user
        assert answer["id"].startswith("classify-") and answer["usage"]["prompt_tokens"] > 0
        # vLLM's default applies the one-label head's activation: the sigmoid.
        squashed = _classify(server, user, [text, "no"])["data"]
        assert [d["index"] for d in squashed] == [0, 1]
        assert squashed[0]["probs"][0] == pytest.approx(1 / (1 + math.exp(-want)), abs=1e-5)


def test_v1_models_lists_the_server_and_its_users(server):
    listed = httpx.get(f"{server}/v1/models").json()
    assert [m["id"] for m in listed["data"]] == ["sharelora", "sunny", "rainy"]
    assert listed["users"] == 2 and listed["object"] == "list"


def test_the_population_answers_for_the_servers_name_and_unknown_users(model):
    from fastapi.testclient import TestClient

    from sharelora.population import POPULATION
    from sharelora.serve import build_app

    want = score_texts(model, None, ["yes a"], [POPULATION], unknown_user="population")[0]
    with TestClient(build_app(model, unknown_user="population", name="rm")) as client:
        for name in ("rm", "cloudy"):
            got = client.post(
                "/classify", json={"model": name, "input": "yes a", "activation": False}
            )
            assert got.json()["data"][0]["probs"][0] == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize(
    "path,body,empty",
    [
        ("/score", {"responses": [], "users": []}, {"rewards": [], "truncated": []}),
        ("/get_reward", {"query": [], "prompts": [], "labels": []}, {"rewards": [], "scores": []}),
    ],
)
def test_an_empty_list_gets_an_empty_answer_at_once(server, path, body, empty):
    started = time.time()
    got = httpx.post(f"{server}{path}", json=body).json()
    assert {k: got[k] for k in empty} == empty
    assert time.time() - started < 5
    assert _classify(server, "sunny", [])["data"] == []


def _openrlhf_request(url: str, payload: dict, retries: int = 5) -> dict:
    """The request OpenRLHF's remote reward client sends (the same JSON, retries with a 1 s
    sleep, 180 s timeout): its own module imports ray and deepspeed, so it is written out."""
    for attempt in range(retries):
        try:
            got = httpx.post(url, json=payload, timeout=180)
            got.raise_for_status()
            return got.json()
        except httpx.HTTPError:
            if attempt == retries - 1:
                raise
            time.sleep(1)
    raise AssertionError("unreachable")


def test_openrlhf_splitting_a_batch_over_two_servers_gets_the_whole_batchs_rewards(model):
    from sharelora.serve import build_app

    prompts, responses, users = map(list, zip(*ROWS, strict=True))
    queries = [p + r for p, r in zip(prompts, responses, strict=True)]
    want = score_texts(model, prompts, responses, users)
    with running(build_app(model)) as one, running(build_app(model)) as two:
        half = len(queries) // 2
        parts = [(one, slice(0, half)), (two, slice(half, None)), (one, slice(0, 0))]
        got = []
        for url, rows in parts:  # the last is the empty share of a short batch
            payload = {"query": queries[rows], "prompts": prompts[rows], "labels": users[rows]}
            got += _openrlhf_request(f"{url}/get_reward", payload)["rewards"]
        again = _openrlhf_request(f"{one}/get_reward", {"query": queries[:1], "prompts":
                                  prompts[:1], "labels": users[:1]})  # fmt: skip
    assert got == pytest.approx(want, abs=1e-5)
    assert again["rewards"] == pytest.approx(got[:1], abs=1e-6)  # a retry: the same, but padding


def test_score_texts_from_32_threads_gives_each_call_the_sequential_reward(model):
    """The model is left in train mode, as a user's training loop leaves it: a call that ran
    while another had switched it back would score with dropout on (BERT's 0.1) and be off."""
    prompts, responses, users = map(list, zip(*ROWS[:3], strict=True))
    model.eval()
    want = score_texts(model, prompts, responses, users)
    model.train()
    try:
        with ThreadPoolExecutor(32) as pool:
            calls = [pool.submit(score_texts, model, prompts, responses, users) for _ in range(64)]
            got = [c.result() for c in calls]
        assert model.training  # each call puts the mode back as it found it
    finally:
        model.eval()
    for rewards in got:
        assert rewards == pytest.approx(want, abs=1e-6)
