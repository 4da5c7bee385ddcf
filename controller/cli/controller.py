"""`edgefleet controller serve`: run the controller (gRPC, HTTP, MQTT bridge, rollout engine)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgefleet.controller.cli.base import Context, cli
from edgefleet.controller.cli.output import duration_option
from edgefleet.controller.client import UserError, default_state_dir


# -- controller --------------------------------------------------------------------------------
@cli.group("controller")
def controller_group() -> None:
    """Run the controller."""


def mqtt_serve_options(fn: Any) -> Any:
    """`controller serve` options for the MQTT transport (issue 7)."""
    options = [
        click.option("--mqtt", "mqtt_url", envvar="EDGEFLEET_MQTT_URL", metavar="mqtt[s]://ADMIN:PASSWORD@HOST:PORT",
                     help="Also serve devices over this MQTT broker, logged in as its admin user."),
        click.option("--mqtt-ca", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="CA (PEM) that signed the broker's certificate; also handed to devices."),
        click.option("--mqtt-device-url", default=None, metavar="URL",
                     help="Broker URL given to devices at enrollment (default: --mqtt without the login)."),
        click.option("--mqtt-auth-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
                     help="Where the broker's password_file and acl_file are kept (default: STATE_DIR/mqtt)."),
        click.option("--mqtt-broker-pid", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="The broker's pid_file: it is sent SIGHUP to load new device logins."),
        click.option("--mqtt-client-id", default=None, help="This replica's MQTT client id (stable across restarts)."),
        click.option("--mqtt-client-certs", is_flag=True,
                     help="Devices log in to the broker with their device certificate instead of a password "
                          "(a listener with require_certificate and use_identity_as_username; see deploy/mosquitto)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def mqtt_settings(values: dict[str, Any]) -> dict[str, Any]:
    from edgefleet.common.mqtt import parse_broker_url
    from edgefleet.controller.api.mqtt_bridge import MqttOptions

    url = values.get("mqtt_url")
    for name, value in (("--mqtt", url), ("--mqtt-device-url", values.get("mqtt_device_url"))):
        if value:
            try:
                parse_broker_url(value)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint=name) from None
    if not url:
        return {}
    return {"mqtt_url": url, "mqtt": MqttOptions(
        ca_file=values.get("mqtt_ca"), device_url=values.get("mqtt_device_url"), auth_dir=values.get("mqtt_auth_dir"),
        broker_pid_file=values.get("mqtt_broker_pid"), client_id=values.get("mqtt_client_id"),
        client_certs=bool(values.get("mqtt_client_certs")),
    )}


@controller_group.command("serve")
@click.option("--state-dir", type=click.Path(path_type=Path), help="Where the store, tokens and artifacts live.")
@click.option("--grpc", "grpc_address", default="127.0.0.1:50051", show_default=True, metavar="HOST:PORT")
@click.option("--http", "http_address", default="127.0.0.1:8480", show_default=True, metavar="HOST:PORT|off",
              help="Health and Prometheus /metrics; 'off' disables it.")
@click.option("--heartbeat-interval", default="5s", show_default=True,
              help="How often an otherwise silent agent heartbeats; a stream silent for 3 intervals is ended.")
@click.option("--store", "store_url", envvar="EDGEFLEET_STORE", metavar="postgresql://USER@HOST:PORT/DB",
              help="Shared PostgreSQL store for several replicas (default: SQLite in the state dir).")
@click.option("--device-grpc", "device_grpc_address", default=None, metavar="HOST:PORT",
              help="Mutual-TLS port for agents' sessions and downloads (default: the port after --grpc's).")
@click.option("--tls-san", "tls_sans", default="localhost,127.0.0.1", show_default=True, metavar="NAME,...",
              help="Host names and IPs the controller's TLS certificate is valid for (devices connect to one).")
@click.option("--cert-lifetime", default="90d", show_default=True,
              help="How long a device certificate is valid; agents renew at about 2/3 of it.")
@click.option("--insecure", is_flag=True,
              help="Plaintext gRPC with device secrets instead of TLS and device certificates (development only).")
@click.option("--metrics-per-device", "metrics_per_device", default="500", show_default=True, metavar="N|off|all",
              help="How many devices get per-device series on /metrics (the first N by id); fleet and per-class "
                   "series always cover every device, and edgefleet_metrics_per_device_omitted_devices counts "
                   "the devices left out.")
@click.option("--workers", type=int, default=None, metavar="N",
              help="Worker processes sharing the ports, store and broker (default: the number of cores, "
                   "at most 4); 1 serves everything in this process.")
@mqtt_serve_options  # issue 7
@click.pass_obj
def controller_serve(obj: Context, state_dir: Path | None, grpc_address: str, http_address: str,
                     heartbeat_interval: str, store_url: str | None, device_grpc_address: str | None,
                     tls_sans: str, cert_lifetime: str, insecure: bool, metrics_per_device: str,
                     workers: int | None, **mqtt: Any) -> None:
    """Serve agents (Fleet) and operators (Control) until SIGINT/SIGTERM."""
    from edgefleet.common.shutdown import run_until_stopped
    from edgefleet.controller.server import BindError, ControllerConfig, serve, split_address
    from edgefleet.controller.telemetry.metrics import parse_per_device_cap

    try:
        per_device_cap = parse_per_device_cap(metrics_per_device)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--metrics-per-device") from None

    for name, address in (("--grpc", grpc_address), ("--http", http_address),
                          ("--device-grpc", device_grpc_address or "off")):
        if address != "off":
            try:
                split_address(address)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint=name) from None
    from edgefleet.controller.server import MAX_WORKERS
    from edgefleet.controller.supervisor import default_workers

    if workers is not None and not 1 <= workers <= MAX_WORKERS:
        raise click.BadParameter(f"must be between 1 and {MAX_WORKERS}", param_hint="--workers")
    interval = duration_option(heartbeat_interval, "--heartbeat-interval")
    if insecure and mqtt.get("mqtt_client_certs"):
        raise click.BadParameter("device certificates need TLS; drop --insecure", param_hint="--mqtt-client-certs")
    lifetime = duration_option(cert_lifetime, "--cert-lifetime")
    if lifetime < 3:
        raise click.BadParameter("must be at least 3s", param_hint="--cert-lifetime")
    if interval < 0.05:
        raise click.BadParameter("must be at least 50ms", param_hint="--heartbeat-interval")
    config = ControllerConfig(
        state_dir=state_dir or obj.state_dir or default_state_dir(),
        grpc_address=grpc_address,
        http_address=None if http_address == "off" else http_address,
        heartbeat_interval_s=interval,
        store_url=store_url or None,
        insecure=insecure,
        device_grpc_address=device_grpc_address,
        tls_sans=tuple(n.strip() for n in tls_sans.split(",") if n.strip()),
        cert_lifetime_s=lifetime,
        metrics_per_device=per_device_cap,
        **mqtt_settings(mqtt),  # issue 7
    )
    from edgefleet.controller.api.mqtt_bridge import MqttConfigError  # issue 7
    from edgefleet.controller.store import StoreUnavailable

    try:
        if (workers or default_workers()) == 1:
            run_until_stopped(serve(config))  # not asyncio.run: it would wait on threads still busy at stop
        else:
            import logging

            from edgefleet.controller.supervisor import supervise

            supervise(config, workers or default_workers(), logging.getLevelName(logging.getLogger().level).lower())
    except (BindError, MqttConfigError, StoreUnavailable) as exc:
        raise UserError(str(exc)) from None
