"""The reward server (``sharelora serve``): per-user rewards over HTTP for RLHF frameworks.

Endpoints:

- ``POST /get_reward`` — OpenRLHF's remote reward model: ``{"query": [prompt + response],
  "prompts": [prompt], "labels": [user]}`` (``--data.label_key user`` puts the user in
  ``labels``) → ``{"rewards": [...], "scores": [...], "extra_logs": {"truncated": [...]}}``.
  Each response is its query with the prompt removed from the front.
- ``POST /score`` — ``{"prompts"?: [...], "responses": [...], "users": [...]}`` →
  ``{"rewards": [...], "truncated": [...]}``. Texts may be chat messages.
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
from dataclasses import dataclass, field

# FastAPI reads the handlers' annotations at run time, so Request must be importable here:
# this module is the server and needs the `serve` extra (fastapi, uvicorn).
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

UNKNOWN_USER = ("error", "population")


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
        score: ``(prompts, responses, users) -> (rewards, truncated)``, run on a worker thread.
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

    async def submit(self, prompts: list, responses: list, users: list) -> tuple[list, list]:
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
                rewards, truncated = await asyncio.to_thread(self.score, *columns)
            except Exception as err:  # every waiting request hears of it; the server stays up
                for job in jobs:
                    job.done.set_exception(err)
                continue
            start = 0
            for job in jobs:
                stop = start + len(job.responses)
                job.done.set_result((rewards[start:stop], truncated[start:stop]))
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


def build_app(model, batch_size: int = 64, max_wait_ms: float = 5.0, unknown_user="error"):
    """The FastAPI app serving ``model`` (a ``PersonalizedRewardModel``, already placed)."""
    from .score import score_rows

    if unknown_user not in UNKNOWN_USER:
        raise ValueError(f"unknown_user must be one of {UNKNOWN_USER}, got {unknown_user!r}")
    personalized = model.adapter_config.personalized

    def score(prompts, responses, users):
        return score_rows(model, prompts, responses, users, batch_size, unknown_user)

    batcher = Batcher(score, batch_size, max_wait_ms)

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
        rewards, truncated = await batcher.submit(prompts, responses, users)
        return {"rewards": rewards, "truncated": truncated}

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
        rewards, truncated = await batcher.submit(prompts, responses, users)
        return {"rewards": rewards, "scores": rewards, "extra_logs": {"truncated": truncated}}

    return app


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
    app = build_app(model, batch_size, max_wait_ms, unknown_user)
    uvicorn.run(app, host=host, port=port, log_level="warning")
