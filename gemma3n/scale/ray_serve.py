"""`gemma3n serve --ray`: the OpenAI-compatible server as a Ray Serve deployment.

Each replica is one Ray actor holding one gemma3n engine and the very app `gemma3n serve` runs (`create_app`),
mounted as the deployment's ingress: the same routes, limits, errors, API key and streaming, with its own
continuous batch. Ray Serve's proxy on every node takes the HTTP requests and routes each to the replica with the
fewest requests in flight (all replicas are asked, not two at random); replicas that fail their health check (the
model thread died) or whose process dies are replaced; `min_replicas` / `max_replicas` let Serve add and remove
replicas with the load. Needs the `ray` extra; importing this module imports Ray.
"""
from __future__ import annotations

import random
import signal
import sys
import time

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import FIFOMixin, RequestRouter

from ..server import create_app
from .engine import EngineSpec

APP_NAME = "gemma3n"
REPLICA_HEADER = "x-gemma3n-replica"  # which replica answered: for operators (and the tests)


class LeastLoadedRouter(FIFOMixin, RequestRouter):
    """Route each request to the replica with the fewest requests in flight: every candidate is one group, whose
    queue lengths Serve probes, taking the lowest (its default asks two replicas drawn at random). The group is
    shuffled so that ties (idle replicas) are broken at random, not always toward the same replica."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        return [random.sample(list(candidate_replicas), len(candidate_replicas))] if candidate_replicas else []


@serve.ingress()
class OpenAIReplica:
    """One replica: one model and the server's app around it."""

    def __init__(self, spec: EngineSpec):
        self.openai_app = create_app(spec.load_model(), spec.settings)
        replica = serve.get_replica_context().replica_id.unique_id

        @self.openai_app.middleware("http")
        async def name_replica(request, call_next):
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = replica
            return response

    def __serve_build_asgi_app__(self):
        return self.openai_app

    def check_health(self) -> None:
        """Serve calls this periodically; a replica whose model thread has died is restarted."""
        if not self.openai_app.state.scheduler.thread.is_alive():
            raise RuntimeError("the model thread is not running")


def deployment_options(spec: EngineSpec, replicas: int, min_replicas: int | None = None,
                       max_replicas: int | None = None) -> dict:
    settings = spec.settings
    options = dict(
        name=APP_NAME, ray_actor_options={"num_cpus": spec.threads or 1},
        # Every request goes straight to a replica, which queues it first-come, first-served and answers 429
        # beyond --max-queue, exactly as a single server does (a queue in Serve's proxy would answer otherwise).
        max_ongoing_requests=settings.max_batch + settings.max_queue,
        health_check_period_s=10, health_check_timeout_s=30,
        request_router_config=RequestRouterConfig(request_router_class=LeastLoadedRouter))
    if min_replicas is not None or max_replicas is not None:
        low = min_replicas if min_replicas is not None else 1
        high = max_replicas if max_replicas is not None else max(low, replicas)
        if not 0 <= low <= high or high < 1:
            raise ValueError(f"need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1, got "
                             f"{low} and {high}")
        # Serve adds a replica when replicas average more requests in flight than half a batch.
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                         "initial_replicas": min(max(replicas, low), high),
                                         "target_ongoing_requests": max(1, settings.max_batch // 2)}
    else:
        options["num_replicas"] = replicas
    return options


def start(spec: EngineSpec, replicas: int, host: str, port: int, min_replicas: int | None = None,
          max_replicas: int | None = None) -> None:
    """Deploy the app on the connected Ray cluster (HTTP on host:port of each node) and wait until its replicas
    are ready."""
    serve.start(http_options={"host": host, "port": port})
    app = serve.deployment(OpenAIReplica, **deployment_options(spec, replicas, min_replicas, max_replicas))
    serve.run(app.bind(spec), name=APP_NAME, route_prefix="/", blocking=False)


def serve_until_stopped(spec: EngineSpec, replicas: int, host: str, port: int, min_replicas: int | None = None,
                        max_replicas: int | None = None, own_cluster: bool = False) -> None:
    """`gemma3n serve --ray`: deploy, then hold until Ctrl-C or SIGTERM, and take the deployment down (and the
    local Ray instance, when this process started it)."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        start(spec, replicas, host, port, min_replicas, max_replicas)
        print(f"gemma3n: serving {spec.settings.model_name!r} on http://{host}:{port}/v1 with Ray Serve "
              f"({replicas} replica(s), {spec.threads} thread(s) each)", file=sys.stderr, flush=True)
        while True:
            time.sleep(1)
    finally:
        try:
            serve.delete(APP_NAME)
            if own_cluster or not serve.status().applications:
                serve.shutdown()  # no app left: stop Serve's proxies, so the next `serve --ray` may pick its port
        finally:
            if own_cluster:
                import ray
                ray.shutdown()


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM ends the server as Ctrl-C does: the deployment is taken down
