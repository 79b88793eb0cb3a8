"""The reward server (``sharelora serve``): per-user rewards over HTTP for RLHF frameworks.

Endpoints:

- ``POST /get_reward`` — OpenRLHF's remote reward model: ``{"query": [prompt + response],
  "prompts": [prompt], "labels": [user]}`` (``--data.label_key user`` puts the user in
  ``labels``) → ``{"rewards": [...], "scores": [...], "extra_logs": {"truncated": [...]}}``.
  Each response is its query with the prompt removed from the front.
- ``POST /score`` — ``{"prompts"?: [...], "responses": [...], "users": [...]}`` →
  ``{"rewards": [...], "truncated": [...]}``. Texts may be chat messages.
- ``POST /classify`` — vLLM's classification API, which verl's reward loop calls:
  ``{"model": USER, "input": text or [texts], "activation": false}`` →
  ``{"id", "object": "list", "created", "model", "data": [{"index", "label", "probs": [r],
  "num_classes": 1}], "usage"}``. ``model`` names the user (vLLM names LoRA adapters there);
  the input is the whole chat-templated text. ``activation`` false gives the raw reward, else
  its sigmoid, as vLLM does. With ``--unknown-user population`` an unknown name, or the
  server's own (its model directory's name), gets the population.
- ``GET /v1/models`` — the server's name and the first ``MODELS_LISTED`` users, with their count.
- ``GET /health`` — ``{"status": "ok", "method", "users", "max_length"}``.

Concurrent requests are batched dynamically: ``Batcher`` gathers rows for up to ``max_wait_ms``
or until ``batch_size`` rows wait, scores them in one forward on a worker thread, and answers
each request with its own rows. Bad input is a 4xx with one line ``{"error": "..."}``; a text
longer than the model's budget is cut by the training rule and flagged in ``truncated``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

# FastAPI reads the handlers' annotations at run time, so Request must be importable here:
# this module is the server and needs the `serve` extra (fastapi, uvicorn).
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

UNKNOWN_USER = ("error", "population")
MODELS_LISTED = 1000  # GET /v1/models lists the server's name and at most this many users


class BadRequest(ValueError):
    """A request the server answers with 400 and this one-line message."""


@dataclass
class _Job:
    prompts: list
    responses: list
    users: list
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Batcher:
    """Dynamic batching: one model call for the rows of all requests that arrive together.

    Args:
        score: ``(prompts, responses, users) -> Scored`` (``sharelora.score``), run on a
            worker thread.
        batch_size: rows that start a model call at once.
        max_wait_ms: how long the first waiting request waits for others.
    """

    def __init__(self, score, batch_size: int = 64, max_wait_ms: float = 5.0):
        self.score, self.batch_size, self.max_wait = score, batch_size, max_wait_ms / 1000
        self.queue: asyncio.Queue[_Job] | None = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, prompts: list, responses: list, users: list):
        """The ``Scored`` rows of this request, scored with whatever else arrived with it."""
        if not responses:  # an OpenRLHF client splitting a batch over servers sends these
            return self.score([], [], [])
        job = _Job(prompts, responses, users)
        await self.queue.put(job)
        return await job.done

    async def _gather(self) -> list[_Job]:
        jobs = [await self.queue.get()]
        rows = len(jobs[0].responses)
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while rows < self.batch_size:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                job = await asyncio.wait_for(self.queue.get(), left)
            except asyncio.TimeoutError:
                break
            jobs.append(job)
            rows += len(job.responses)
        return jobs

    async def _loop(self) -> None:
        while True:
            jobs = await self._gather()
            keys = ("prompts", "responses", "users")
            columns = [[x for j in jobs for x in getattr(j, k)] for k in keys]
            try:
                scored = await asyncio.to_thread(self.score, *columns)
            except Exception as err:  # every waiting request hears of it; the server stays up
                for job in jobs:
                    job.done.set_exception(err)
                continue
            start = 0
            for job in jobs:
                stop = start + len(job.responses)
                job.done.set_result(type(scored)(*(field[start:stop] for field in scored)))
                start = stop


def _list(body: dict, key: str, n: int | None = None, required: bool = True) -> list | None:
    value = body.get(key)
    if value is None:
        if required:
            raise BadRequest(f"missing field {key!r}")
        return None
    if not isinstance(value, list):
        raise BadRequest(f"field {key!r} must be a list, got {type(value).__name__}")
    if n is not None and len(value) != n:
        raise BadRequest(f"field {key!r} has {len(value)} entries but there are {n} rows")
    return value


def build_app(
    model,
    batch_size: int = 64,
    max_wait_ms: float = 5.0,
    unknown_user: str = "error",
    name: str = "sharelora",
):
    """The FastAPI app serving ``model`` (a ``PersonalizedRewardModel``, already placed);
    ``name`` is the server's own model name in the vLLM-style endpoints."""
    from .population import POPULATION
    from .score import score_rows

    if unknown_user not in UNKNOWN_USER:
        raise ValueError(f"unknown_user must be one of {UNKNOWN_USER}, got {unknown_user!r}")
    personalized = model.adapter_config.personalized

    def score(prompts, responses, users):
        return score_rows(model, prompts, responses, users, batch_size, unknown_user)

    batcher = Batcher(score, batch_size, max_wait_ms)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.task.cancel()

    app = FastAPI(title="sharelora reward server", lifespan=lifespan)

    def check_users(users: list | None, n: int) -> list:
        if users is None:
            if personalized:
                raise BadRequest("missing the users of a personalized model")
            return [model.users.names[0]] * n
        for u in users:
            if not isinstance(u, (str, int)) or isinstance(u, bool):
                raise BadRequest(f"user {u!r:.40} is not a string or an integer")
            if personalized and unknown_user == "error" and u not in model.users:
                known = len(model.users)
                raise BadRequest(f"unknown user {str(u)!r:.60} (the model knows {known} users)")
        return users if personalized else [model.users.names[0]] * n

    def check_texts(values: list, key: str) -> None:
        from .render import check_messages

        for i, v in enumerate(values):
            if not isinstance(v, str) and check_messages(v) is not None:
                raise BadRequest(f"{key}[{i}] is neither text nor a list of chat messages")

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadRequest(f"malformed JSON ({err})") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    @app.exception_handler(BadRequest)
    async def bad_request(request, err: BadRequest):
        return JSONResponse({"error": " ".join(str(err).split())}, status_code=400)

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "method": model.adapter_config.method,
            "users": model.num_users,
            "max_length": model.max_length,
        }

    async def rows_of(request: Request, texts_key: str, users_key: str):
        """The request's texts, prompts (default: empty) and users, one per row, checked."""
        body = await body_of(request)
        texts = _list(body, texts_key)
        n = len(texts)
        prompts = _list(body, "prompts", n, required=False) or [""] * n
        return texts, prompts, check_users(_list(body, users_key, n, required=personalized), n)

    @app.post("/score")
    async def score_endpoint(request: Request):
        responses, prompts, users = await rows_of(request, "responses", "users")
        check_texts(prompts, "prompts"), check_texts(responses, "responses")
        scored = await batcher.submit(prompts, responses, users)
        return {"rewards": scored.rewards, "truncated": scored.truncated}

    @app.post("/get_reward")
    async def get_reward(request: Request):
        queries, prompts, users = await rows_of(request, "query", "labels")
        responses = []
        for i, (q, p) in enumerate(zip(queries, prompts, strict=True)):
            if not isinstance(q, str) or not isinstance(p, str):
                raise BadRequest(f"query[{i}] and prompts[{i}] must be text")
            if not q.startswith(p):
                raise BadRequest(f"query[{i}] does not start with prompts[{i}]")
            responses.append(q[len(p) :])
        scored = await batcher.submit(prompts, responses, users)
        logs = {"truncated": scored.truncated}
        return {"rewards": scored.rewards, "scores": scored.rewards, "extra_logs": logs}

    def user_of(requested) -> object:
        """The user a vLLM-style ``model`` field names (the population with --unknown-user
        population, for the server's own name or an unknown one)."""
        if not personalized:
            return model.users.names[0]  # one reward: any model name
        if not isinstance(requested, str):
            raise BadRequest("field 'model' must name a user (a string)")
        if requested not in model.users and requested.isdigit() and int(requested) in model.users:
            return int(requested)  # users read from integer ids
        if requested == name and unknown_user == "error":
            raise BadRequest(
                f"model {name!r} is the server's own name: name a user, or start the server with "
                "--unknown-user population to score with the population"
            )
        return requested

    @app.post("/classify")
    async def classify(request: Request):
        body = await body_of(request)
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise BadRequest("field 'input' must be a string or a list of strings")
        activation = body.get("activation")
        if activation is not None and not isinstance(activation, bool):  # 1 == True in Python
            raise BadRequest("field 'activation' must be true, false or null")
        users = check_users([user_of(body.get("model"))] * len(texts), len(texts))
        scored = await batcher.submit([""] * len(texts), texts, users)
        # vLLM applies the head's activation unless told not to; verl sends false: raw rewards.
        probs = scored.rewards if activation is False else [_sigmoid(r) for r in scored.rewards]
        tokens = sum(scored.tokens)
        return {
            "id": f"classify-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": body.get("model") or name,
            "data": [
                {"index": i, "label": "LABEL_0", "probs": [p], "num_classes": 1}
                for i, p in enumerate(probs)
            ],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
        }

    @app.get("/v1/models")
    async def models():
        # Not the population's row, which serving unknown users adds: it answers to `name`.
        users = [u for u in model.users.names if u != POPULATION] if personalized else []
        entry = {"object": "model", "created": started, "owned_by": "sharelora", "root": name}
        listed = [name, *map(str, users[:MODELS_LISTED])]
        return {
            "object": "list",
            "data": [{"id": n, **entry} for n in listed],
            "users": len(users),  # the list stops at MODELS_LISTED
        }

    return app


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def serve(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str | None = None,
    batch_size: int = 64,
    max_wait_ms: float = 5.0,
    unknown_user: str = "error",
) -> None:
    """Load the model and serve it until interrupted."""
    import torch
    import uvicorn

    from .model import PersonalizedRewardModel

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = PersonalizedRewardModel.from_pretrained(model_dir).to(device).eval()
    name = Path(model_dir).resolve().name  # as vLLM names a model by its path
    app = build_app(model, batch_size, max_wait_ms, unknown_user, name)
    uvicorn.run(app, host=host, port=port, log_level="warning")
