"""TLS (docs/tls.md): the gateway serving HTTPS, admin mTLS, certificate rotation on SIGHUP, and
HTTPS to the engines, with a CA made here by ``trustme``.

The end-to-end tests run real ``pdgate`` processes on 127.0.0.1 and talk to them with the official
openai client (its httpx client given the test CA), ``urllib`` and raw ``ssl`` sockets; the
``unit`` ones run pdgate's own HTTP server and client in-process over loopback TLS.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import trustme
from pydantic import ValidationError
from support.fleet import MODEL, engine_flags, get_json, instance_entry, start_gateway, write_config
from support.procs import PdgateProcess, start_sim
from support.waiting import wait_until

from pdgate.common.http_client import UpstreamError, UpstreamPool
from pdgate.common.http_server import HttpRequest, HttpServer, Responder
from pdgate.common.tls import ClientTlsFiles, ServerTls, ServerTlsFiles, TlsError, client_context
from pdgate.gateway.config import GatewayConfig

HOST = "127.0.0.1"
CHAT = [{"role": "user", "content": "Say something about TLS."}]


# ---------------------------------------------------------------------------- certificates
@dataclass
class Pki:
    """Certificates for the tests, written as PEM files under ``root``."""

    root: Path
    server_ca: trustme.CA  # signs the gateway's and the engines' certificates
    client_ca: trustme.CA  # signs client certificates (admin mTLS, the gateway towards an mTLS engine)
    other_ca: trustme.CA  # trusted by nobody who matters: its certificates never verify

    def ca_file(self, ca: trustme.CA, name: str) -> str:
        path = self.root / f"{name}.pem"
        ca.cert_pem.write_to_path(str(path))
        return str(path)

    def leaf(self, ca: trustme.CA, name: str, *identities: str, common_name: str | None = None) -> tuple[str, str]:
        """A certificate for ``identities`` signed by ``ca``: (chain file, key file)."""
        cert = ca.issue_cert(*identities, common_name=common_name or name)
        return self.write_leaf(cert, name)

    def write_leaf(self, cert: trustme.LeafCert, name: str) -> tuple[str, str]:
        chain, key = self.root / f"{name}.crt", self.root / f"{name}.key"
        chain.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(key))
        return str(chain), str(key)

    def client(self, ca: trustme.CA, cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
        """A client context trusting ``ca`` only, presenting ``cert`` when given."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ca.configure_trust(context)
        if cert is not None:
            cert.configure_cert(context)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"), trustme.CA(), trustme.CA(), trustme.CA())


# ---------------------------------------------------------------------------- helpers
def request_json(url: str, context: ssl.SSLContext | None = None) -> tuple[int, Any]:
    """GET ``url``: status and JSON body, error statuses included."""
    try:
        with urllib.request.urlopen(url, context=context, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def served_certificate(port: int, context: ssl.SSLContext) -> dict[str, Any]:
    """The certificate a new TLS connection to ``port`` is served (verified by ``context``)."""
    with (
        socket.create_connection((HOST, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        cert = tls.getpeercert()
    assert cert
    return cert


def common_name(cert: dict[str, Any]) -> str:
    return next(value for rdn in cert["subject"] for key, value in rdn if key == "commonName")


def openai_client(url: str, verify: ssl.SSLContext | bool) -> openai.AsyncOpenAI:
    """The official client over HTTPS, verifying the gateway with ``verify``."""
    return openai.AsyncOpenAI(
        base_url=f"{url}/v1",
        api_key="unused",
        max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(verify=verify),
    )


def chain_text(exc: BaseException) -> str:
    """Every message in an exception's cause/context chain."""
    parts, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(f"{type(current).__name__}: {current}")
        current = current.__cause__ or current.__context__
    return " <- ".join(parts)


def no_tracebacks(proc: PdgateProcess) -> None:
    assert "Traceback" not in proc.log, proc.log
    assert " ERROR " not in proc.log and "unhandled error" not in proc.log, proc.log


@pytest.fixture(scope="module")
def engine() -> Iterator[PdgateProcess]:
    """One plain-HTTP colocated sim engine behind the HTTPS gateways."""
    proc = start_sim(*engine_flags("both"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gateway(pki: Pki, engine: PdgateProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PdgateProcess]:
    """An HTTPS gateway whose admin API requires a client certificate signed by the client CA."""
    root = tmp_path_factory.mktemp("gateway")
    cert, key = pki.leaf(pki.server_ca, "gateway", HOST)
    tls = {
        "cert_file": cert,
        "key_file": key,
        "client_ca_file": pki.ca_file(pki.client_ca, "client-ca"),
        "admin_requires_client_cert": True,
    }
    proc = start_gateway(write_config(root / "gateway.yaml", [instance_entry(engine, "both", "sim")], tls=tls))
    yield proc
    proc.stop()


# ---------------------------------------------------------------------------- the gateway over HTTPS
async def test_chat_completion_over_https_with_the_test_ca(pki: Pki, gateway: PdgateProcess) -> None:
    """The gateway says it serves https, and the openai client trusting the test CA gets answers,
    whole and streamed."""
    assert gateway.url.startswith("https://")
    async with openai_client(gateway.url, pki.client(pki.server_ca)) as client:
        reply = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8)
        assert reply.choices[0].message.content
        assert reply.usage is not None and reply.usage.completion_tokens == 8
        stream = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, stream=True)
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        assert text


async def test_a_client_that_does_not_trust_the_ca_is_refused(pki: Pki, gateway: PdgateProcess) -> None:
    """A client trusting only another CA fails certificate verification; plain HTTP to the HTTPS
    port is closed without an HTTP answer; neither leaves a traceback in the gateway's log, and
    the gateway keeps serving."""
    async with openai_client(gateway.url, pki.client(pki.other_ca)) as client:
        with pytest.raises(openai.APIConnectionError) as caught:
            await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
    assert "CERTIFICATE_VERIFY_FAILED" in chain_text(caught.value)

    with socket.create_connection((HOST, gateway.port), timeout=5) as plain:
        plain.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = plain.recv(4096)
    assert not answer.startswith(b"HTTP/")

    assert request_json(f"{gateway.url}/health", pki.client(pki.server_ca)) == (200, {"status": "ok"})
    no_tracebacks(gateway)


def test_admin_requires_a_client_certificate(pki: Pki, gateway: PdgateProcess) -> None:
    """/admin without a client certificate: 401 in OpenAI's error shape; with one the client CA
    signed: 200; /v1 needs none; a certificate from another CA fails the handshake."""
    url = f"{gateway.url}/admin/instances"
    status, body = request_json(url, pki.client(pki.server_ca))
    assert status == 401
    assert body["error"]["code"] == "client_certificate_required"
    assert "client certificate" in body["error"]["message"]

    admin_cert = pki.client_ca.issue_cert("admin@pdgate.test", common_name="operator")
    status, body = request_json(url, pki.client(pki.server_ca, admin_cert))
    assert status == 200
    assert [i["healthy"] for i in body["data"]] == [True]

    status, body = request_json(f"{gateway.url}/v1/models", pki.client(pki.server_ca))
    assert status == 200 and body["data"][0]["id"] == MODEL

    stranger = pki.other_ca.issue_cert("stranger@pdgate.test")
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        request_json(url, pki.client(pki.server_ca, stranger))
    assert request_json(f"{gateway.url}/health", pki.client(pki.server_ca))[0] == 200
    no_tracebacks(gateway)


def test_sighup_rotates_the_certificate(pki: Pki, engine: PdgateProcess, tmp_path: Path) -> None:
    """Cert and key from PDGATE_TLS_CERT_FILE / PDGATE_TLS_KEY_FILE. After new files are written and
    SIGHUP sent, a new connection is served the new certificate while a connection made before
    keeps working; files that do not load are logged and the certificate in force stays."""
    cert, key = pki.leaf(pki.server_ca, "rotating", HOST, common_name="gateway-one")
    env = {"PDGATE_TLS_CERT_FILE": cert, "PDGATE_TLS_KEY_FILE": key}
    proc = start_gateway(write_config(tmp_path / "gateway.yaml", [instance_entry(engine, "both", "sim")]), env=env)
    try:
        trust = pki.client(pki.server_ca)
        assert proc.url.startswith("https://")
        assert common_name(served_certificate(proc.port, trust)) == "gateway-one"
        old = http.client.HTTPSConnection(HOST, proc.port, context=trust, timeout=10)
        old.request("GET", "/health")
        assert old.getresponse().read() == b'{"status": "ok"}'
        old_socket = old.sock

        pki.leaf(pki.server_ca, "rotating", HOST, common_name="gateway-two")  # the same paths, new files
        proc.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: common_name(served_certificate(proc.port, trust)) == "gateway-two",
            message="a new connection to be served the rotated certificate",
        )
        old.request("GET", "/health")
        assert old.getresponse().status == 200
        assert old.sock is old_socket  # the same connection, made with the first certificate
        assert common_name(old.sock.getpeercert()) == "gateway-one"
        old.close()

        Path(key).write_text("not a key\n")
        proc.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "TLS certificate reload failed" in proc.log, message="the failed reload to be logged")
        wait_until(lambda: "config reload failed" in proc.log, message="the config reload to be refused as well")
        assert common_name(served_certificate(proc.port, trust)) == "gateway-two"
        assert proc.proc.poll() is None
        assert "Traceback" not in proc.log
    finally:
        proc.stop()


# ---------------------------------------------------------------------------- the gateway to engines over HTTPS
@pytest.fixture(scope="module")
def tls_engine(pki: Pki) -> Iterator[PdgateProcess]:
    """A sim engine serving HTTPS that requires a client certificate signed by the client CA."""
    cert, key = pki.leaf(pki.server_ca, "engine", HOST)
    client_ca = pki.ca_file(pki.client_ca, "engine-client-ca")
    proc = start_sim(*engine_flags("both"), "--ssl-certfile", cert, "--ssl-keyfile", key, "--ssl-ca-certs", client_ca)
    yield proc
    proc.stop()


def _upstream_gateway(pki: Pki, engine: PdgateProcess, path: Path, ca: trustme.CA) -> PdgateProcess:
    """A plain-HTTP gateway reaching ``engine`` over HTTPS, trusting ``ca``, with a client certificate."""
    cert, key = pki.leaf(pki.client_ca, f"gateway-client-{path.stem}", "gateway@pdgate.test")
    upstream = {"ca_file": pki.ca_file(ca, f"upstream-ca-{path.stem}"), "cert_file": cert, "key_file": key}
    health = {"interval_s": 0.6, "timeout_s": 1.0, "failure_threshold": 1, "cooldown_s": 30}
    return start_gateway(
        write_config(path, [instance_entry(engine, "both", "sim")], upstream_tls=upstream, health=health)
    )


async def test_https_engine_with_the_right_ca_answers(pki: Pki, tls_engine: PdgateProcess, tmp_path: Path) -> None:
    """The engine's https URL, verified against its CA, with the gateway's client certificate
    (the engine requires one): health, load scrapes and the request itself go over TLS."""
    assert tls_engine.url.startswith("https://")
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):  # no client certificate
        request_json(f"{tls_engine.url}/health", pki.client(pki.server_ca))
    proc = _upstream_gateway(pki, tls_engine, tmp_path / "right.yaml", pki.server_ca)
    try:
        wait_until(
            lambda: get_json(f"{proc.url}/admin/instances")["data"][0]["load"]["running"] is not None,
            message="a load scrape over HTTPS",
        )
        async with openai.AsyncOpenAI(base_url=f"{proc.url}/v1", api_key="unused", max_retries=0) as client:
            reply = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6)
        assert reply.usage is not None and reply.usage.completion_tokens == 6
        [instance] = get_json(f"{proc.url}/admin/instances")["data"]
        assert instance["healthy"] and instance["url"].startswith("https://")
        no_tracebacks(proc)
    finally:
        proc.stop()


async def test_https_engine_with_a_wrong_ca_is_unhealthy(pki: Pki, tls_engine: PdgateProcess, tmp_path: Path) -> None:
    """Trusting another CA, the gateway finds the engine's certificate unverifiable: the instance
    is unhealthy with the reason in its last error, and a request gets a clear 503, never a 500."""
    proc = _upstream_gateway(pki, tls_engine, tmp_path / "wrong.yaml", pki.other_ca)
    try:
        wait_until(
            lambda: "TLS verification" in (get_json(f"{proc.url}/admin/instances")["data"][0]["last_error"] or ""),
            message="the scrape's TLS verification error",
        )
        wait_until(lambda: not get_json(f"{proc.url}/admin/instances")["data"][0]["healthy"])
        async with openai.AsyncOpenAI(base_url=f"{proc.url}/v1", api_key="unused", max_retries=0) as client:
            with pytest.raises(openai.APIStatusError) as caught:
                await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
        assert caught.value.status_code in (502, 503)
        assert caught.value.body and caught.value.body.get("message")  # OpenAI's error shape
        assert "Traceback" not in proc.log
    finally:
        proc.stop()


# ---------------------------------------------------------------------------- in-process: server and pool
async def _echo_peer(request: HttpRequest, responder: Responder) -> None:
    cert = responder.peer_certificate
    responder.send_json(200, {"client": common_name(cert) if cert else None})


@pytest.fixture
async def tls_server(pki: Pki) -> Any:
    """An in-process HttpServer over TLS (a client CA: certificates optional), closed at teardown."""
    cert, key = pki.leaf(pki.server_ca, "inproc", HOST, common_name="inproc-one")
    tls = ServerTls(ServerTlsFiles(cert, key, pki.ca_file(pki.client_ca, "inproc-client-ca")))
    server = HttpServer(_echo_peer, max_body_bytes=1 << 20)
    await server.start(HOST, 0, ssl_context=tls.context)
    yield server, tls
    await server.close(grace_s=0)


@pytest.mark.unit
async def test_pool_verifies_https_origins(pki: Pki, tls_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    """UpstreamPool over https: the right CA answers and sees the client certificate; another CA,
    the system's trust store, or a wrong host name are UpstreamErrors that say TLS verification
    failed; the server logs no error for the failed handshakes."""
    server, _ = tls_server
    origin = (HOST, server.port, True)
    client_cert = pki.client_ca.issue_cert("pool@pdgate.test", common_name="pool")
    cert_file, key_file = pki.write_leaf(client_cert, "pool-client")
    ca_file = pki.ca_file(pki.server_ca, "inproc-server-ca")
    caplog.set_level(logging.DEBUG, logger="pdgate")

    async def get(pool: UpstreamPool, host_origin: tuple[str, int, bool] = origin) -> Any:
        try:
            response = await pool.request(host_origin, "GET", "/", b"", headers={}, timeout_s=5)
            body = await response.read()
            response.close()
            return json.loads(body)
        finally:
            await pool.close()

    assert await get(UpstreamPool(ssl_context=client_context(ClientTlsFiles(ca_file)))) == {"client": None}
    with_cert = client_context(ClientTlsFiles(ca_file, cert_file, key_file))
    assert await get(UpstreamPool(ssl_context=with_cert)) == {"client": "pool"}
    wrong = client_context(ClientTlsFiles(pki.ca_file(pki.other_ca, "inproc-other-ca")))
    for pool in (UpstreamPool(ssl_context=wrong), UpstreamPool()):
        with pytest.raises(UpstreamError, match="TLS verification of https://127.0.0.1:.* failed"):
            await get(pool)
    with pytest.raises(UpstreamError, match="TLS verification"):  # the certificate is for 127.0.0.1
        await get(UpstreamPool(ssl_context=with_cert), ("localhost", server.port, True))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.unit
async def test_reload_replaces_the_certificate_in_the_live_context(pki: Pki, tls_server: Any) -> None:
    """ServerTls.reload loads the new files into the context the server listens with; files that
    do not load (or whose key does not match) raise TlsError and leave the old certificate serving."""
    server, tls = tls_server
    trust = pki.client(pki.server_ca)

    async def served() -> str:
        return await asyncio.to_thread(lambda: common_name(served_certificate(server.port, trust)))

    assert await served() == "inproc-one"
    pki.leaf(pki.server_ca, "inproc", HOST, common_name="inproc-two")
    tls.reload()  # synchronous: the very next handshake serves the new files
    assert await served() == "inproc-two"

    _, other_key = pki.leaf(pki.server_ca, "unrelated", HOST)
    shutil.copyfile(other_key, tls.files.key_file)  # a key that does not match the certificate
    with pytest.raises(TlsError, match="KEY_VALUES_MISMATCH|key values mismatch"):
        tls.reload()
    os.remove(tls.files.cert_file)
    with pytest.raises(TlsError, match="does not exist"):
        tls.reload()
    assert await served() == "inproc-two"
    assert tls.reloads == 1


# ---------------------------------------------------------------------------- configuration errors
def _config(**sections: Any) -> dict[str, Any]:
    return {
        "models": [{"name": MODEL}],
        "instances": [{"url": "https://127.0.0.1:1", "model": MODEL, "role": "both"}],
        **sections,
    }


@pytest.mark.unit
def test_tls_config_errors_name_the_setting(pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cert without its key, a missing file, admin mTLS without a client CA, a bad CA bundle:
    each is a validation error that says what is wrong; env variables fill unset fields."""
    cert, key = pki.leaf(pki.server_ca, "config", HOST)
    cases = {
        "tls.cert_file is set but tls.key_file": {"tls": {"cert_file": cert}},
        "certificate file '/nonexistent.crt' does not exist": {
            "tls": {"cert_file": "/nonexistent.crt", "key_file": key}
        },
        "tls.admin_requires_client_cert needs tls.client_ca_file": {
            "tls": {"cert_file": cert, "key_file": key, "admin_requires_client_cert": True}
        },
        "client certificates need HTTPS": {"tls": {"admin_requires_client_cert": True}},
        "is not a PEM CA bundle": {"upstream_tls": {"ca_file": key}},
        "needs both its certificate file and its key file": {"upstream_tls": {"cert_file": cert}},
    }
    for message, sections in cases.items():
        with pytest.raises(ValidationError, match=re.escape(message)):
            GatewayConfig.model_validate(_config(**sections))

    monkeypatch.setenv("PDGATE_TLS_CERT_FILE", cert)
    with pytest.raises(ValidationError, match="PDGATE_TLS_CERT_FILE is set but tls.key_file"):
        GatewayConfig.model_validate(_config())
    monkeypatch.setenv("PDGATE_TLS_KEY_FILE", key)
    files = GatewayConfig.model_validate(_config()).tls.files()
    assert files == ServerTlsFiles(cert, key, None)


def test_serve_with_a_bad_tls_file_exits_with_a_clear_message(pki: Pki, tmp_path: Path) -> None:
    """``pdgate serve`` with a key that is not a key: exit status 2, the message names the
    files, no traceback."""
    cert, _ = pki.leaf(pki.server_ca, "cli", HOST)
    instance = {"url": f"http://{HOST}:1", "model": MODEL}
    config = write_config(tmp_path / "bad.yaml", [instance], tls={"cert_file": cert, "key_file": cert})
    done = subprocess.run(
        [sys.executable, "-m", "pdgate.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "tls:" in done.stderr and "cannot use certificate" in done.stderr
    assert "Traceback" not in done.stderr
