"""The web consoles over TLS (FARM_CONSOLE_TLS_CERT and FARM_CONSOLE_TLS_KEY): Flower,
`farm ui`, `farm metrics` and a worker's /metrics, each started as a user starts it against the
session's real servers, with a certificate from a throwaway authority (tests/certs.py). Over
https, verified against that authority and with the password, each serves its page; a client
that trusts another authority fails verification; plain http to the port gets no page. A wrong
setting is one CONFIG_INVALID line from every console command, exit code 2."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.certs import Certs, make_certs
from tests.helpers import ExtraWorkers, free_port, http, running_console, running_flower

PASSWORD = "consoles-tls-pw"
AUTH = f"farm:{PASSWORD}"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An authority that signed nothing the consoles serve."""
    return make_certs(tmp_path_factory.mktemp("other-tls")).ca


@pytest.fixture
def tls_env(farm_env: dict[str, str], certs: Certs) -> dict[str, str]:
    return {**farm_env, **certs.env(), "FARM_FLOWER_PASSWORD": PASSWORD}


def assert_https_only(url: str, certs: Certs, other_ca: Path) -> None:
    """``url`` (https) serves its page to a client that trusts ``certs.ca`` and logs in, and
    to no other."""
    assert url.startswith("https://127.0.0.1:")
    assert http(url, AUTH, ca=certs.ca)[0] == 200
    assert http(url, ca=certs.ca)[0] == 401
    with pytest.raises(OSError, match="certificate verify failed"):
        http(url, AUTH, ca=other_ca)
    # plain http: the handshake fails on the server's side, which drops the connection
    with pytest.raises(ConnectionError):
        http("http://" + url.removeprefix("https://"), AUTH)


def test_flower_serves_https_only(tls_env, certs, other_ca, tmp_path) -> None:
    log = tmp_path / "flower.log"
    with running_flower(tls_env, PASSWORD, log, ca=certs.ca) as (base, _):
        assert_https_only(base + "/workers", certs, other_ca)
    assert f"Flower on {base}" in log.read_text()


def test_farm_ui_serves_https_only(tls_env, certs, other_ca, tmp_path) -> None:
    port = free_port()
    base, log = f"https://127.0.0.1:{port}", tmp_path / "ui.log"
    with running_console(["ui", "--port", str(port)], tls_env, log, base + "/", certs.ca):
        assert_https_only(base + "/workers", certs, other_ca)
    assert f"farm ui on {base}" in log.read_text()


def test_farm_metrics_serves_https_only(tls_env, certs, other_ca, tmp_path) -> None:
    port = free_port()
    url, log = f"https://127.0.0.1:{port}/metrics", tmp_path / "metrics.log"
    with running_console(["metrics", "--port", str(port)], tls_env, log, url, certs.ca):
        assert_https_only(url, certs, other_ca)
    assert f"farm metrics on {url}" in log.read_text()


def test_a_worker_serves_https_only_and_says_so_in_its_heartbeat(
    workers, meta, certs, other_ca
) -> None:
    env = {**certs.env(), "FARM_FLOWER_PASSWORD": PASSWORD}
    extra = ExtraWorkers(workers, "cpu", ("consoles-tls",), env=env)
    extra.start()
    try:
        (beat,) = [w for w in meta.workers() if w["name"] == extra.started[0].name]
        assert beat["metrics_scheme"] == "https"
        assert_https_only(f"https://{beat['metrics']}/metrics", certs, other_ca)
        log = extra.started[0].log_path.read_text()
        assert f"metrics on https://{beat['metrics']}/metrics" in log
        assert "Traceback" not in log  # the failed handshakes above cost no traceback
    finally:
        extra.stop_all()


# -- behind a TLS reverse proxy on the same host -------------------------------------------------


def through_proxy(url: str, headers: dict[str, str]) -> tuple[int, str]:
    """(status, body) of an empty POST as a proxy hands it on, logged in."""
    request = urllib.request.Request(url, data=b"", method="POST", headers=headers)
    request.add_header("Authorization", "Basic " + base64.b64encode(AUTH.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_farm_ui_behind_a_tls_proxy_knows_its_public_origin(farm_env, tmp_path) -> None:
    """`farm ui` on plain http at 127.0.0.1 behind a proxy that ends TLS (README, "Web
    console"): uvicorn trusts X-Forwarded-Proto from 127.0.0.1 by default, so a button's POST
    from https://farm.example passes the same-origin check without any farm setting."""
    port = free_port()
    base, log = f"http://127.0.0.1:{port}", tmp_path / "ui.log"
    env = {**farm_env, "FARM_FLOWER_PASSWORD": PASSWORD}
    proxied = {"Host": "farm.example", "Origin": "https://farm.example"}
    cancel = f"{base}/jobs/{'0' * 32}/cancel"
    with running_console(["ui", "--port", str(port)], env, log, base + "/"):
        # what the proxy adds: the browser's scheme; the console then sees itself as
        # https://farm.example, and only the (missing) form token is refused
        status, page = through_proxy(cancel, {**proxied, "X-Forwarded-Proto": "https"})
        assert status == 403 and "token is missing" in page, page
        # without it, the console takes itself for http://farm.example: a cross-site POST
        status, page = through_proxy(cancel, proxied)
        assert status == 403 and "did not come from this console" in page, page


# -- wrong settings: one line, before anything listens -----------------------------------------


CASES = {
    # name: (settings from the two pairs, what the line says)
    "cert alone": (
        lambda c, o: {"FARM_CONSOLE_TLS_CERT": str(c.cert)},
        "FARM_CONSOLE_TLS_CERT and FARM_CONSOLE_TLS_KEY go together",
    ),
    "key alone": (
        lambda c, o: {"FARM_CONSOLE_TLS_KEY": str(c.key)},
        "FARM_CONSOLE_TLS_CERT and FARM_CONSOLE_TLS_KEY go together",
    ),
    "missing file": (
        lambda c, o: {**c.env(), "FARM_CONSOLE_TLS_KEY": str(c.key.with_name("nowhere.pem"))},
        "FARM_CONSOLE_TLS_KEY: cannot read ",
    ),
    "unreadable file": (
        lambda c, o: {**c.env(), "FARM_CONSOLE_TLS_CERT": str(c.cert.parent)},
        "FARM_CONSOLE_TLS_CERT: cannot read ",
    ),
    "mismatched pair": (
        lambda c, o: {**c.env(), "FARM_CONSOLE_TLS_KEY": str(o.key)},
        "is not the private key of FARM_CONSOLE_TLS_CERT",
    ),
    "key as cert": (
        lambda c, o: {**c.env(), "FARM_CONSOLE_TLS_CERT": str(c.key)},
        "FARM_CONSOLE_TLS_CERT: ",
    ),
    "cert as key": (
        lambda c, o: {**c.env(), "FARM_CONSOLE_TLS_KEY": str(c.cert)},
        "is not a PEM private key",
    ),
}


# Every command on the three commonest mistakes (the check is one function all three call),
# and `farm ui` on the rest.
COMMON = ("cert alone", "missing file", "mismatched pair")


@pytest.mark.parametrize(
    ("command", "case"),
    [(command, case) for command in ("flower", "ui", "metrics") for case in COMMON]
    + [("ui", case) for case in CASES if case not in COMMON],
)
def test_a_wrong_tls_setting_is_one_line(farm_env, certs, tmp_path, command, case) -> None:
    settings, says = CASES[case]
    other = make_certs(tmp_path / "other")
    env = {**os.environ, **farm_env, "FARM_FLOWER_PASSWORD": PASSWORD, **settings(certs, other)}
    done = subprocess.run(
        [sys.executable, "-m", "farm", command, "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error CONFIG_INVALID: "), lines
    assert says in lines[0], lines
