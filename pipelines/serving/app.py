"""The audiogen Serve application: three deployments, how they are bounded, and how to run them.

    serve run serve_config.yaml                      # import_path: pipelines.serving.app:build_app
    audiogen serve [--config serve_config.yaml] [--model DIR] [--port 8000] [--max-batch-slots 8] ...

    client -> Serve proxy -> AudioGenIngress (FastAPI: validation, health, models, metrics)
                                  | DeploymentHandle, multiplexed_model_id = the request's model
                                  v
                             AudioGenEngine replicas (one engine per loaded model) --state--> EngineBoard

Bounds at every layer, whatever the config source (these defaults, serve_config.yaml repeating them, or flags):
the proxy queues at most `max_queued_requests` for the ingress; the ingress holds far more requests than the
engine deployment can (`check_bounds`), so health, readiness, models and metrics never wait behind generation;
the engine deployment's handle admits `max_ongoing_requests` per replica plus `max_queued_requests` waiting, then
raises `BackPressureError` (503 + Retry-After); each engine holds `max_batch_slots + queue_per_engine` requests.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from ray import serve
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from pipelines.serving.autoscaling import POLICY
from pipelines.serving.board import EngineBoard
from pipelines.serving.ingress import AudioGenIngress
from pipelines.serving.replica import AudioGenEngine
from pipelines.serving.settings import AppSettings, LaunchOptions

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "serve_config.yaml"
APP_NAME = "audiogen"
ENGINE, INGRESS, BOARD = "AudioGenEngine", "AudioGenIngress", "EngineBoard"
HEALTH_HEADROOM = 32  # ingress places left for health, readiness, models and metrics when generation is full
_LIFECYCLE = {"health_check_period_s": 10, "health_check_timeout_s": 30, "graceful_shutdown_wait_loop_s": 2}

# The deployments' options; serve_config.yaml repeats them so that an operator sees and edits them in one file
# (tests/test_serve.py checks that the two agree). The engine's bounds and resources are `LaunchOptions`' defaults.
DEPLOYMENTS: dict[str, dict[str, Any]] = {
    ENGINE: {**LaunchOptions().deployment_options(), **_LIFECYCLE, "graceful_shutdown_timeout_s": 60,
             "autoscaling_config": {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 1,
                                    "target_ongoing_requests": 8, "upscale_delay_s": 10, "downscale_delay_s": 120,
                                    "policy": {"policy_function": POLICY}}},
    INGRESS: {"num_replicas": 1, "max_ongoing_requests": 256, "max_queued_requests": 64, **_LIFECYCLE,
              "graceful_shutdown_timeout_s": 60, "backpressure_config": {"status_code": 503, "retry_after_s": 2},
              "ray_actor_options": {"num_cpus": 0}},
    BOARD: {"num_replicas": 1, "max_ongoing_requests": 1000, "max_queued_requests": 1000,
            "ray_actor_options": {"num_cpus": 0}, "logging_config": {"enable_access_log": False}},
}


def merge_options(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deployment options with `override` on top: nested dicts (ray_actor_options, ...) are merged, and a fixed
    `num_replicas` replaces autoscaling."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = {**merged[key], **value} if both else value
    if "num_replicas" in override:
        merged.pop("autoscaling_config", None)
    return merged


def deployment_options(overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`DEPLOYMENTS` with `overrides` (by deployment name) on top; unknown names are refused."""
    unknown = set(overrides) - set(DEPLOYMENTS)
    if unknown:
        raise ValueError(f"unknown deployments {sorted(unknown)}; the app has {sorted(DEPLOYMENTS)}")
    return {name: merge_options(base, overrides.get(name, {})) for name, base in DEPLOYMENTS.items()}


def check_bounds(options: dict[str, dict[str, Any]]) -> None:
    """The ingress must hold every request the engine deployment can (in its replicas and its handle queue)
    plus `HEALTH_HEADROOM`, or health checks could wait behind generation."""
    engine = options[ENGINE]
    replicas = engine.get("num_replicas") or engine["autoscaling_config"]["max_replicas"]
    need = replicas * engine["max_ongoing_requests"] + engine["max_queued_requests"] + HEALTH_HEADROOM
    if options[INGRESS]["max_ongoing_requests"] < need:
        raise ValueError(f"{INGRESS}.max_ongoing_requests must be >= {need} ({replicas} x {ENGINE}."
                         f"max_ongoing_requests + its max_queued_requests + {HEALTH_HEADROOM})")
    for name, deployment in options.items():
        if deployment.get("max_queued_requests", -1) < 0:
            raise ValueError(f"{name}.max_queued_requests must be bounded (>= 0)")


def make_app(args: dict[str, Any] | None = None, deployments: dict[str, dict[str, Any]] | None = None) -> Application:
    """The application: `args` are the app settings, `deployments` override `DEPLOYMENTS` by deployment name."""
    settings = AppSettings.from_args(args).as_args()
    options = deployment_options(deployments or {})
    check_bounds(options)
    board = serve.deployment(EngineBoard, name=BOARD, **options[BOARD]).bind()
    engine = serve.deployment(AudioGenEngine, name=ENGINE, **options[ENGINE]).bind(settings, board)
    ingress = serve.deployment(AudioGenIngress, name=INGRESS, **options[INGRESS])
    return ingress.bind(settings, engine, board)


def build_app(args: dict[str, Any]) -> Application:
    """Application builder of `serve run` / `serve deploy` (serve_config.yaml: `import_path`); Serve applies the
    file's `deployments:` options on top."""
    return make_app(args)


@dataclass
class ServeConfig:
    """What `audiogen serve` runs: serve_config.yaml's first application, or the same defaults without a file."""

    args: dict[str, Any] = field(default_factory=dict)
    deployments: dict[str, dict[str, Any]] = field(default_factory=lambda: copy.deepcopy(DEPLOYMENTS))
    http: dict[str, Any] = field(default_factory=lambda: {"host": LaunchOptions.host, "port": LaunchOptions.port})
    name: str = APP_NAME
    route_prefix: str = "/"

    @classmethod
    def read(cls, path: str | Path = DEFAULT_CONFIG) -> ServeConfig:
        raw = yaml.safe_load(Path(path).read_text())
        ServeDeploySchema.model_validate(raw)  # the validation `serve run`/`serve deploy` applies
        application = raw["applications"][0]
        if application.get("import_path") != "pipelines.serving.app:build_app":
            raise ValueError(f"{path}: expected import_path pipelines.serving.app:build_app, "
                             f"got {application.get('import_path')}")
        listed = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in application.get("deployments", [])}
        return cls(args=application.get("args") or {},
                   deployments=deployment_options(listed),
                   http={**cls().http, **(raw.get("http_options") or {})},
                   name=application.get("name", APP_NAME), route_prefix=application.get("route_prefix", "/"))

    def launch_options(self) -> dict[str, Any]:
        """The `LaunchOptions` values this config sets."""
        engine = self.deployments[ENGINE]
        actor = engine["ray_actor_options"]
        return {"host": self.http["host"], "port": self.http["port"], "replicas": engine.get("num_replicas"),
                "max_ongoing_requests": engine["max_ongoing_requests"],
                "max_queued_requests": engine["max_queued_requests"], "num_cpus": actor.get("num_cpus", 1.0),
                "num_gpus": actor.get("num_gpus", 0.0)}

    def with_options(self, settings: AppSettings, launch: LaunchOptions) -> ServeConfig:
        """This config with `settings` as the app args and `launch` applied to HTTP and the engine deployment."""
        deployments = {**self.deployments, ENGINE: merge_options(self.deployments[ENGINE], launch.deployment_options())}
        return replace(self, args=settings.as_args(), deployments=deployments,
                       http={**self.http, "host": launch.host, "port": launch.port})


def run_local(config: ServeConfig) -> None:
    """Start Serve (and Ray, local unless RAY_ADDRESS says otherwise), deploy, and block until Ctrl-C."""
    serve.start(http_options=config.http)
    serve.run(make_app(config.args, config.deployments), name=config.name, route_prefix=config.route_prefix)
    print(f"audiogen serving on http://{config.http['host']}:{config.http['port']} (docs at /docs); Ctrl-C stops",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
