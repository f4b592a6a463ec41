"""``msc-ray serve``: the online service on Ray Serve."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import AddressOpt, EndpointOpt, UserError, _absolute, _classifier_entry, _ensure_ray, _one_line_errors, app


@app.command()
@_one_line_errors
def serve(
    classifier: Annotated[
        list[str],
        typer.Option(help="Classifier artifact per stack: STACK=ARTIFACT (repeatable), or ARTIFACT for its own stack."),
    ],
    detector: Annotated[str | None, typer.Option(help="Detector artifact for abnormal-cell boxes.")] = None,
    detect_all_stacks: Annotated[bool, typer.Option(help="Run the detector on multi-stack images too.")] = False,
    host: Annotated[str, typer.Option(help="Address the HTTP proxy listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the page and the API.")] = 8000,
    replicas: Annotated[int, typer.Option(help="Replicas at most; the autoscaler moves between the bounds.")] = 1,
    min_replicas: Annotated[int, typer.Option(help="Replicas at least.")] = 1,
    gpus_per_replica: Annotated[float, typer.Option(help="GPUs per replica (0: CPU).")] = 0.0,
    cpus_per_replica: Annotated[float, typer.Option(help="CPUs per replica.")] = 1.0,
    max_batch_size: Annotated[int, typer.Option(help="Requests batched into one model call at most.")] = 16,
    max_request_mb: Annotated[float, typer.Option(help="Largest request accepted, in MiB.")] = 50.0,
    max_pixels: Annotated[int, typer.Option(help="Largest image accepted, in pixels.")] = 40_000_000,
    detach: Annotated[
        bool, typer.Option(help="On a cluster: deploy, wait until it answers, and return (it keeps serving).")
    ] = False,
    endpoint_url: EndpointOpt = None,
    address: AddressOpt = None,
) -> None:
    """Serve the models online (Ray Serve): a page at / and a JSON API (/predict, /models, /healthz).
    Runs until Ctrl-C (which stops the application), or deploys and returns with --detach."""
    import os
    import signal
    import time

    from .. import serve as serve_mod

    cfg = serve_mod.ServeConfig(
        classifier=tuple(_classifier_entry(c) for c in classifier),
        detector=_absolute(detector) if detector else None,
        detect_all_stacks=detect_all_stacks,
        endpoint_url=endpoint_url,
        host=host,
        port=port,
        min_replicas=min_replicas,
        max_replicas=max(replicas, min_replicas),
        cpus_per_replica=cpus_per_replica,
        gpus_per_replica=gpus_per_replica,
        max_batch_size=max_batch_size,
        max_request_mb=max_request_mb,
        max_pixels=max_pixels,
    )
    serve_mod.check(cfg)
    local = not (address or os.environ.get("RAY_ADDRESS"))
    if detach and local:
        raise UserError("--detach: needs a cluster (--address or RAY_ADDRESS); a local Ray ends with this command")
    if local and not serve_mod.port_free(host, port):
        raise UserError(f"--port {port}: already in use on {host}")

    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)  # a service manager's stop is Ctrl-C
    _ensure_ray(address)
    import ray
    from ray import serve as ray_serve

    try:
        url = serve_mod.start(cfg)
        typer.echo(f"serving {', '.join(cfg.classifier)}" + (f" + {cfg.detector}" if cfg.detector else ""))
        if detach:  # the application outlives this driver on the cluster
            typer.echo(f"page: {url} on the cluster's head   API: {url}predict   (stop: serve shutdown)")
            return
        # Ctrl-C and a service manager's stop, installed again now that Ray and Serve are up: in one CI run
        # (a slow machine) a SIGINT to the serving driver was not acted on within 90 s, no "stopping" written
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGTERM, on_term)
        typer.echo(f"page: {url}   API: {url}predict   (Ctrl-C stops)")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        typer.echo("stopping")
    except RuntimeError as exc:  # the replicas could not start (e.g. weights that do not fit the config)
        raise UserError(f"the service did not start: {serve_mod.root_cause(exc)}") from None
    finally:
        if ray.is_initialized():
            try:
                if local:
                    ray_serve.shutdown()
                elif not detach:
                    ray_serve.delete(serve_mod.APP_NAME)
            finally:
                ray.shutdown()
    typer.echo("stopped")
