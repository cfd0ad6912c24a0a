"""The router's HTTP app: the OpenAI routes clients use, the registration route
instances use, and the health prober that keeps the registry honest.

A request: parse just enough of its body (model, prompt), pick an up instance serving
the model with the policy, forward (``forward.py``). An instance that cannot be reached
is marked failed and the next pick is tried; one that fails while answering fails that
request only.

With ``--splitwise`` only prefill and decode instances register (each listing its engine
ranks, ``pairing.py``). A request gets a decode instance (``--decode-policy``) and one
of its ranks at random, then a prefill instance (``--prefill-policy``, retried as above)
to which it is forwarded with that rank's record (``wire.py``); the prefill instance
hands the KV over to that rank and streams the answer back. Both count the request as
in flight until it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from cache_transfer.auth import check_token
from pd.api.errors import APIError, install_error_handlers
from pd.router.config import RouterConfig
from pd.router.forward import InstanceUnreachable, open_upstream, relay
from pd.router.metrics import RouterMetrics
from pd.router.pairing import check_pd_ranks, pair_headers
from pd.router.policy import CacheAware, Candidate, Policy, make_policy
from pd.router.registry import InstanceRecord, RegistrationRefused, Registry
from pd.router.wire import (
    REGISTER_PATH,
    TOKEN_PURPOSE,
    Registration,
    RegistrationReply,
)

logger = logging.getLogger("pd.router")


class Router:
    """The registry, the policies (one per role it serves) and the metrics of one
    router."""

    def __init__(self, config: RouterConfig, rng: random.Random | None = None):
        self.config = config
        self.registry = Registry(config.instance_timeout_s, config.forget_after_s)
        self.rng = rng or random.Random()
        if config.splitwise:
            names = {"prefill": config.prefill_policy, "decode": config.decode_policy}
        else:
            names = {"mixed": config.policy}
        self.roles = tuple(names)
        self.policies: dict[str, Policy] = {
            role: self._make_policy(name) for role, name in names.items()
        }
        self.metrics = RouterMetrics()
        self.client: httpx.AsyncClient | None = None
        self._was_up: dict[str, bool] = {}

    def _make_policy(self, name: str) -> Policy:
        if name != "cache_aware":
            return make_policy(name, self.rng)
        return make_policy(name, self.rng, max_load_gap=self.config.cache_aware_max_load_gap,
                           min_prefix_chars=self.config.cache_aware_min_prefix_chars)  # fmt: skip

    def pick(self, role: str, model: str, prompt: str, exclude: set[str]) -> InstanceRecord | None:
        """An up ``role`` instance serving ``model``, not one of ``exclude`` (URLs),
        picked by that role's policy; None when there is none."""
        records = [r for r in self.registry.serving(model, role) if r.url not in exclude]
        if not records:
            return None
        by_url = {r.url: r for r in records}
        choice = self.policies[role].pick([Candidate(r.url, r.load) for r in records], prompt)
        return by_url[choice.key]

    def refresh(self) -> None:
        """Forget silent instances, log who went down or came back, update gauges."""
        now = time.monotonic()
        for gone in self.registry.forget_silent(now):
            logger.warning("forgot %s: silent for %.0f s", gone.url, self.config.forget_after_s)
            self._was_up.pop(gone.url, None)
            with contextlib.suppress(KeyError):
                self.metrics.forget(gone.url, gone.role)
            policy = self.policies.get(gone.role)
            if isinstance(policy, CacheAware):
                policy.forget(gone.url)
        for record in self.registry.records.values():
            is_up = self.registry.is_up(record, now)
            was_up = self._was_up.get(record.url)
            if was_up and not is_up:
                logger.warning("%s is down: %s", record.url, self.registry.down_reason(record, now))
            elif is_up and was_up is False:
                logger.info("%s is back", record.url)
            self._was_up[record.url] = is_up
            self.metrics.set_instance(record.url, record.role, is_up, record.load,
                                      record.in_flight)  # fmt: skip

    async def probe(self, record: InstanceRecord) -> None:
        """GET the instance's /health: a failure keeps it from being picked until a
        later probe succeeds. NOTE: a busy instance may answer slowly; only silence for
        as long as a missed heartbeat counts as failing."""
        assert self.client is not None
        try:
            reply = await self.client.get(f"{record.url}/health",
                                          timeout=self.config.instance_timeout_s)  # fmt: skip
            record.failure = None if reply.status_code == 200 else (
                f"/health answered {reply.status_code}: {reply.text[:200]}"
            )  # fmt: skip
        except httpx.HTTPError as error:
            record.failure = f"/health failed: {error or type(error).__name__}"

    async def probe_forever(self) -> None:
        while True:
            records = list(self.registry.records.values())
            await asyncio.gather(*(self.probe(r) for r in records))
            self.refresh()
            await asyncio.sleep(self.config.health_interval_s)


def build_router_app(router: Router) -> FastAPI:
    from pd.api.server import api_key_dependencies

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # NOTE: no read timeout: a long generation may be silent for a while (a
        # non-streamed one until it ends); failures surface as closed connections.
        timeout = httpx.Timeout(None, connect=5.0)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            router.client = client
            prober = asyncio.create_task(router.probe_forever())
            try:
                yield
            finally:
                prober.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await prober

    app = FastAPI(title="pd-router", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)  # fmt: skip
    install_error_handlers(app)
    auth = api_key_dependencies(router.config.api_key)
    started = int(time.time())

    @app.get("/health")
    async def health() -> Response:
        up = router.registry.up()
        missing = [role for role in router.roles if all(r.role != role for r in up)]
        if missing:
            what = f"{' and no '.join(missing)} instance" if router.config.splitwise else "instance"
            reason = f"no {what} is registered and up"
            return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ok", "num_instances": len(up)})

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        cards = [{"id": name, "object": "model", "created": started, "owned_by": "pd-serve"}
                 for name in router.registry.model_names()]  # fmt: skip
        return {"object": "list", "data": cards}

    @app.get("/metrics", dependencies=auth)
    async def metrics() -> Response:
        router.refresh()
        payload, content_type = router.metrics.render()
        return Response(payload, media_type=content_type)

    @app.get("/router/instances", dependencies=auth)
    async def instances() -> dict:
        return {"instances": [_describe(router, r) for r in router.registry.records.values()]}

    @app.post(REGISTER_PATH)
    async def register(raw: Request) -> RegistrationReply:
        return await _register(router, raw)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(raw: Request) -> Response:
        return await _forward(router, raw, "/v1/completions")

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(raw: Request) -> Response:
        return await _forward(router, raw, "/v1/chat/completions")

    return app


async def _register(router: Router, raw: Request) -> RegistrationReply:
    secret = router.config.cluster_secret
    if secret is not None:
        scheme, _, token = raw.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not check_token(secret, TOKEN_PURPOSE, token):
            raise APIError(401, "registration needs the cluster secret's token",
                           type="authentication_error")  # fmt: skip
    try:
        registration = Registration.model_validate_json(await raw.body())
    except ValidationError as error:
        raise APIError(400, f"invalid registration: {error.errors()[0]['msg']}") from error
    _check_role(router, registration)
    try:
        is_new = router.registry.register(registration)
    except RegistrationRefused as refused:
        logger.error("refused %s: %s", registration.url, refused.message)
        raise APIError(refused.status, refused.message, type="invalid_request_error") from None
    if is_new:
        logger.info("registered %s (%s, DP rank %d, models %s)", registration.url,
                    registration.role, registration.dp_rank,
                    ", ".join(registration.model_names))  # fmt: skip
    return RegistrationReply(heartbeat_s=router.config.health_interval_s)


def _check_role(router: Router, registration: Registration) -> None:
    """A 400 unless this router serves the registration's role (prefill and decode with
    --splitwise, else mixed) and a prefill or decode one lists valid engine ranks."""
    role = registration.role
    if role not in router.roles and router.config.splitwise:
        raise APIError(400, "this router pairs prefill and decode instances (--splitwise); "
                       "a mixed instance needs a router without --splitwise")  # fmt: skip
    if role not in router.roles:
        raise APIError(400, f"this router forwards whole requests to mixed instances; a {role}"
                       " instance needs a router started with --splitwise")  # fmt: skip
    if role != "mixed":
        try:
            check_pd_ranks(registration)
        except ValueError as error:
            raise APIError(400, f"invalid registration: {error}") from None


async def _forward(router: Router, raw: Request, path: str) -> Response:
    body = await raw.body()
    model, prompt = _model_and_prompt(body)
    headers = {"content-type": "application/json"}
    if router.config.instance_api_key:
        headers["authorization"] = f"Bearer {router.config.instance_api_key}"
    if not router.config.splitwise:
        upstream, record = await _open(router, "mixed", model, prompt, path, body, headers)
        return await relay(upstream, record.url, raw, _on_done(router, record))
    decode = router.pick("decode", model, prompt, set())
    if decode is None:
        raise _unserved(router, model, "decode", set())
    headers |= pair_headers(decode.registration, router.config.cluster_secret, router.rng)
    decode.in_flight += 1
    try:
        upstream, prefill = await _open(router, "prefill", model, prompt, path, body, headers)
    except BaseException:
        decode.in_flight -= 1
        raise
    return await relay(upstream, prefill.url, raw, _on_done(router, prefill, decode))


async def _open(
    router: Router, role: str, model: str, prompt: str, path: str, body: bytes,
    headers: dict[str, str],
) -> tuple[httpx.Response, InstanceRecord]:  # fmt: skip
    """The answer of a ``role`` instance that could be reached (past its status line)
    and that instance, counted in flight; APIError when none can."""
    tried: set[str] = set()
    while True:
        record = router.pick(role, model, prompt, tried)
        if record is None:
            raise _unserved(router, model, role, tried)
        tried.add(record.url)
        record.in_flight += 1
        try:
            upstream = await open_upstream(router.client, record.url + path, body, headers)  # type: ignore[arg-type]
        except InstanceUnreachable as error:
            record.in_flight -= 1
            record.failure = f"unreachable: {error}"
            router.metrics.observe(record.url, record.role, "unreachable")
            logger.warning("%s is unreachable (%s); trying another instance", record.url, error)
            continue
        except BaseException:
            record.in_flight -= 1
            raise
        return upstream, record


def _on_done(router: Router, forwarded: InstanceRecord, paired: InstanceRecord | None = None):  # type: ignore[no-untyped-def]
    """When the request ends: ``forwarded`` (the instance it went to) and ``paired``
    (its decode instance, with --splitwise) are released and count its outcome."""

    def done(outcome: str) -> None:
        for record in (forwarded, paired):
            if record is not None:
                record.in_flight -= 1
                router.metrics.observe(record.url, record.role, outcome)
        # NOTE: a decode instance's failure reaches us only through the prefill
        # instance's answer; it is the prefill instance's probes that tell them apart.
        if outcome == "broken":
            forwarded.failure = "it failed while answering a request"

    return done


def _unserved(router: Router, model: str, role: str, tried: set[str]) -> APIError:
    """The error for a request no ``role`` instance could take (``tried``: those
    unreachable)."""
    if tried:
        router.metrics.unserved.labels("unreachable").inc()
        what = "instance" if role == "mixed" else f"{role} instance"
        return APIError(502, f"no {what} serving {model!r} could be reached (tried "
                        f"{', '.join(sorted(tried))})", type="server_error",
                        code="instance_unreachable")  # fmt: skip
    names = router.registry.model_names()
    if not names:
        router.metrics.unserved.labels("no_instance").inc()
        return APIError(503, "no instance is registered and up; start pd-serve with "
                        "--router pointing here", type="server_error",
                        headers={"Retry-After": "1"})  # fmt: skip
    if model not in names:
        router.metrics.unserved.labels("unknown_model").inc()
        return APIError(404, f"the model {model!r} does not exist; served: {', '.join(names)}",
                        type="not_found_error", param="model", code="model_not_found")  # fmt: skip
    # --splitwise: instances of one role serve the model, not of both
    missing = [r for r in router.roles if not router.registry.serving(model, r)] or [role]
    router.metrics.unserved.labels("no_instance").inc()
    return APIError(503, f"no {' and no '.join(missing)} instance serving {model!r} is up; "
                    f"start one with --splitwise-role {missing[0]} --router pointing here",
                    type="server_error", headers={"Retry-After": "1"})  # fmt: skip


def _model_and_prompt(body: bytes) -> tuple[str, str]:
    """The request's model and its prompt as text (for cache_aware); the instance
    validates the rest."""
    try:
        fields = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"We could not parse the JSON body of your request: {error}") from None
    if not isinstance(fields, dict):
        raise APIError(400, "The request body must be a JSON object")
    model = fields.get("model")
    if not isinstance(model, str):
        raise APIError(400, "Missing required parameter: 'model'", param="model")
    prompt: Any = fields.get("prompt", fields.get("messages", ""))
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
    return model, text


def _describe(router: Router, record: InstanceRecord) -> dict:
    return {
        **record.registration.model_dump(),
        "is_up": router.registry.is_up(record),
        "down_reason": router.registry.down_reason(record),
        "in_flight": record.in_flight,
        "load": record.load,
    }
