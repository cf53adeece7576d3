"""A ``rediss://`` store against a real redis-server with TLS: a refused certificate says why,
``?ca_file=`` trusts a private CA, ``?cert_file=&key_file=`` answers ``tls-auth-clients yes``,
and a file that cannot be read is a configuration error.  Also: a Redis that will not let
busgate name its connections (CLIENT renamed away, an ACL user without it) still serves.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from adapters.storage.errors import StoreUnavailable
from adapters.storage.fanout import Filter
from adapters.storage.jobs import NewJob
from gateway.app import open_store
from gateway.config import ConfigError, load_config, parse_store, render_effective
from tests.gateway.test_startup_errors import refused, run
from tests.support.daemon import write_config
from tests.support.ports import free_port
from tests.support.redis import RedisServer
from tests.support.stores import running_store

ROUTES = [("email", Filter())]


@dataclass(frozen=True)
class Certificates:
    """PEM files of a private CA, a certificate it issued Redis (for 127.0.0.1) and one for
    busgate as a client; ``client_both`` holds the client's certificate and key in one."""

    ca: Path
    server: Path
    server_key: Path
    client: Path
    client_key: Path
    client_both: Path


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("busgate.client.test")
    files = Certificates(*(tmp_path / "pki" / name for name in ("ca.pem", "server.pem",
        "server.key", "client.pem", "client.key", "client-both.pem")))  # fmt: skip
    files.ca.parent.mkdir()
    ca.cert_pem.write_to_path(str(files.ca))
    server.cert_chain_pems[0].write_to_path(str(files.server))
    server.private_key_pem.write_to_path(str(files.server_key))
    client.cert_chain_pems[0].write_to_path(str(files.client))
    client.private_key_pem.write_to_path(str(files.client_key))
    client.private_key_and_cert_chain_pem.write_to_path(str(files.client_both))
    return files


def tls_server(tmp_path: Path, certificates: Certificates, *, auth_clients: bool) -> RedisServer:
    """A redis-server on a plain port (for the test's redis-cli) and a TLS one (``tls_port``)."""
    tls_port = free_port()
    server = RedisServer(
        tmp_path / "redis",
        args=(
            *("--tls-port", str(tls_port)),
            *("--tls-cert-file", str(certificates.server)),
            *("--tls-key-file", str(certificates.server_key)),
            *("--tls-ca-cert-file", str(certificates.ca)),
            *("--tls-auth-clients", "yes" if auth_clients else "no"),
        ),
    )
    server.tls_port = tls_port  # type: ignore[attr-defined]
    return server


@pytest.fixture
def redis_tls(tmp_path: Path, certificates: Certificates) -> Iterator[RedisServer]:
    server = tls_server(tmp_path, certificates, auth_clients=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_mtls(tmp_path: Path, certificates: Certificates) -> Iterator[RedisServer]:
    """Redis's default: ``tls-auth-clients yes``, a client must show a certificate."""
    server = tls_server(tmp_path, certificates, auth_clients=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def rediss(server: RedisServer, options: str = "") -> str:
    return f"rediss://127.0.0.1:{server.tls_port}/0?timeout=1s{options}"  # type: ignore[attr-defined]


async def push_one(url: str, directory: Path) -> None:
    """Open the store as the daemon does and store a job over TLS."""
    async with running_store(await open_store(parse_store(url, str(directory)))) as store:
        (job_id,) = (await store.push("orders", ROUTES, [NewJob(b"over TLS")])).ids
        assert await store.get_job(job_id)


# -- why a TLS connection failed -------------------------------------------------------------


def test_an_untrusted_certificate_says_why_and_names_the_rediss_url(
    tmp_path: Path, redis_tls: RedisServer
) -> None:
    # Before: "redis://127.0.0.1:…: TLS handshake failed: " and nothing after it.
    done = run(tmp_path, rediss(redis_tls))
    refused(
        done,
        f"rediss://127.0.0.1:{redis_tls.tls_port}: TLS handshake failed:",  # type: ignore[attr-defined]
        "certificate verify failed: self-signed certificate in certificate chain",
        "ca_file",
    )


async def test_a_redis_that_wants_a_client_certificate_says_so(
    tmp_path: Path, redis_mtls: RedisServer, certificates: Certificates
) -> None:
    # TLS 1.3: the handshake completes, and Redis's alert arrives at the first read; or,
    # when its reset overtakes our login, the login's send fails first.
    with pytest.raises(StoreUnavailable) as caught:
        await push_one(rediss(redis_mtls, f"&ca_file={certificates.ca}"), tmp_path)
    message = str(caught.value)
    assert "connection lost during login: " in message, message
    assert "tlsv13 alert certificate required" in message or "reset" in message, message
    assert "cert_file" in message, message


# -- the URL's files ---------------------------------------------------------------------------


async def test_a_ca_file_relative_to_the_main_file_is_trusted(
    tmp_path: Path, redis_tls: RedisServer, certificates: Certificates
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "redis-ca.pem").write_bytes(certificates.ca.read_bytes())
    config = load_config(write_config(etc, {}, store=rediss(redis_tls, "&ca_file=redis-ca.pem")))
    assert config.store.ca_file == str(etc / "redis-ca.pem")
    # check-config shows the file the daemon reads.
    assert f"ca_file={etc / 'redis-ca.pem'}" in render_effective(config)
    async with running_store(await open_store(config.store)) as store:
        (job_id,) = (await store.push("orders", ROUTES, [NewJob(b"over TLS")])).ids
        assert await store.get_job(job_id)


@pytest.mark.parametrize("key_apart", [True, False], ids=["key_file", "key_in_cert_file"])
async def test_a_client_certificate_answers_tls_auth_clients(
    tmp_path: Path, redis_mtls: RedisServer, certificates: Certificates, key_apart: bool
) -> None:
    if key_apart:
        files = f"&cert_file={certificates.client}&key_file={certificates.client_key}"
    else:
        files = f"&cert_file={certificates.client_both}"
    await push_one(rediss(redis_mtls, f"&ca_file={certificates.ca}{files}"), tmp_path)


@pytest.mark.parametrize("option", ["ca_file", "cert_file", "key_file"])
def test_a_missing_file_is_a_config_error_naming_file_line_and_key(
    tmp_path: Path, certificates: Certificates, option: str
) -> None:
    files = {"cert_file": str(certificates.client), option: str(tmp_path / "missing.pem")}
    query = "&".join(f"{name}={path}" for name, path in files.items())
    main = write_config(tmp_path / "etc", {}, store=f"rediss://127.0.0.1:6380/0?{query}")
    with pytest.raises(ConfigError) as caught:
        load_config(main)
    error = caught.value
    assert (error.path, error.line, error.key) == (str(main), 1, "store")
    assert f"option {option!r}: [Errno 2] No such file or directory: " in error.message
    assert str(tmp_path / "missing.pem") in error.message


def test_a_file_that_holds_no_certificate_is_named(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ValueError, match=rf"option 'ca_file': .*: '{junk}'$"):
        parse_store(f"rediss://127.0.0.1:6380/0?ca_file={junk}", str(tmp_path))


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("redis://h:6379/0?ca_file=ca.pem", "option 'ca_file': is for TLS (rediss://)"),
        ("rediss://h:6379/0?key_file=k.pem", "option 'key_file': needs cert_file"),
        ("rediss://h:6379/0?ca_fil=ca.pem", "did you mean 'ca_file'?"),
        ("rediss://h:6379/0?ca_file=", "option 'ca_file' needs a file"),
    ],
)
def test_file_options_refused(tmp_path: Path, url: str, words: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_store(url, str(tmp_path))
    assert words in str(caught.value)


# -- CLIENT SETNAME is cosmetic ----------------------------------------------------------------


@pytest.mark.parametrize("refusal", ["renamed", "acl"])
async def test_a_redis_that_refuses_client_setname_still_serves(
    tmp_path: Path, refusal: str, caplog: pytest.LogCaptureFixture
) -> None:
    if refusal == "renamed":
        server = RedisServer(tmp_path / "redis", args=("--rename-command", "CLIENT", ""))
        url = f"redis://127.0.0.1:{server.port}/0"
    else:
        server = RedisServer(tmp_path / "redis")
        url = f"redis://app:s3cret@127.0.0.1:{server.port}/0"
    server.start()
    try:
        if refusal == "acl":
            server.cli("ACL", "SETUSER", "app", "on", ">s3cret", "~*", "&*", "+@all", "-client")
        with caplog.at_level(logging.INFO, logger="busgate.redis"):
            await push_one(url, tmp_path)
    finally:
        server.stop()
    said = [r.getMessage() for r in caplog.records if "CLIENT SETNAME" in r.getMessage()]
    assert len(said) == 1, said  # once, though the pool and the subscription each connect
