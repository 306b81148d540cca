"""Tests of tasks.netchecks against real TLS servers and a real DNS server on loopback."""

from __future__ import annotations

import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from dnslib import QTYPE, RCODE, RR
from dnslib.server import DNSLogger, DNSServer

from tasks.netchecks import DnsParams, TlsParams, check_dns, check_tls
from tests.conftest import free_port

NAME = "localhost"
ZONE = """
app.caretaker.test.  60 IN A     10.0.0.5
app.caretaker.test.  60 IN A     10.0.0.6
v6.caretaker.test.   60 IN AAAA  2001:db8::5
www.caretaker.test.  60 IN CNAME app.caretaker.test.
caretaker.test.      60 IN MX    10 mail.caretaker.test.
caretaker.test.      60 IN TXT   "v=spf1 -all"
"""

StartTls = Callable[[trustme.LeafCert], int]


class Handshake(socketserver.BaseRequestHandler):
    """Completes one TLS handshake and hangs up."""

    server: TlsServer

    def handle(self) -> None:
        self.request.settimeout(2)
        try:
            with self.server.context.wrap_socket(self.request, server_side=True):
                pass
        except OSError:
            pass  # a verifying client aborts when it does not trust the certificate


class TlsServer(socketserver.ThreadingTCPServer):
    daemon_threads = True

    def __init__(self, cert: trustme.LeafCert) -> None:
        super().__init__(("127.0.0.1", 0), Handshake)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(self.context)
        self.port = int(self.server_address[1])


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tls") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def start_tls() -> Iterator[StartTls]:
    """Starts a TLS server with a certificate on a loopback port; returns the port."""
    servers: list[TlsServer] = []

    def start(cert: trustme.LeafCert) -> int:
        server = TlsServer(cert)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server.port

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def expiring_in(days: float) -> datetime:
    # Certificates keep whole seconds; so does this, for exact comparisons.
    return datetime.now(UTC).replace(microsecond=0) + timedelta(days=days)


def leaf(ca: trustme.CA, not_after: datetime, name: str = NAME) -> trustme.LeafCert:
    not_before = min(not_after, datetime.now(UTC)) - timedelta(days=30)
    return ca.issue_cert(name, not_before=not_before, not_after=not_after)


def parsed(cert: trustme.LeafCert) -> x509.Certificate:
    return x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes())


def tls(port: int, **params: Any) -> TlsParams:
    return TlsParams.model_validate(
        {"host": "127.0.0.1", "port": port, "server_name": NAME} | params
    )


def test_a_valid_certificate_is_healthy(ca: trustme.CA, ca_file: str, start_tls: StartTls) -> None:
    not_after = expiring_in(365)
    cert = leaf(ca, not_after)
    port = start_tls(cert)

    result = check_tls(tls(port, ca_file=ca_file))

    assert result.status == "healthy"
    assert result.summary == f"127.0.0.1:{port}: certificate expires in 365.0 days"
    assert result.value == pytest.approx(365, abs=0.001)
    assert result.details == {
        "not_after": not_after.isoformat(),
        "days_left": 365.0,
        "subject": parsed(cert).subject.rfc4514_string(),
        "issuer": parsed(cert).issuer.rfc4514_string(),
        "hostname_match": True,
        "error": None,
    }


def test_expiring_within_critical_days_is_critical(
    ca: trustme.CA, ca_file: str, start_tls: StartTls
) -> None:
    port = start_tls(leaf(ca, expiring_in(3)))

    result = check_tls(tls(port, ca_file=ca_file))

    assert result.status == "critical"
    assert result.summary == f"127.0.0.1:{port}: certificate expires in 3.0 days, under 7 days"
    assert result.details["days_left"] == 3.0
    assert result.details["error"] is None


def test_expiring_within_warning_days_is_a_warning(
    ca: trustme.CA, ca_file: str, start_tls: StartTls
) -> None:
    port = start_tls(leaf(ca, expiring_in(15)))

    result = check_tls(tls(port, ca_file=ca_file))

    assert result.status == "warning"
    assert result.summary == f"127.0.0.1:{port}: certificate expires in 15.0 days, under 21 days"
    assert result.value == pytest.approx(15, abs=0.001)


def test_thresholds_are_parameters(ca: trustme.CA, ca_file: str, start_tls: StartTls) -> None:
    port = start_tls(leaf(ca, expiring_in(15)))

    result = check_tls(tls(port, ca_file=ca_file, warning_days=10, critical_days=2))

    assert result.status == "healthy"


def test_an_expired_certificate_is_critical(
    ca: trustme.CA, ca_file: str, start_tls: StartTls
) -> None:
    port = start_tls(leaf(ca, expiring_in(-2)))

    result = check_tls(tls(port, ca_file=ca_file))

    assert result.status == "critical"
    assert result.summary == (
        f"127.0.0.1:{port}: certificate expired 2.0 days ago; not trusted: certificate has expired"
    )
    assert result.details["days_left"] == -2.0
    assert result.details["hostname_match"] is True


def test_a_certificate_for_another_name_is_critical_with_days_left(
    ca: trustme.CA, ca_file: str, start_tls: StartTls
) -> None:
    port = start_tls(leaf(ca, expiring_in(365), name="other.example"))

    result = check_tls(tls(port, ca_file=ca_file))

    assert result.status == "critical"
    assert result.summary == (
        f"127.0.0.1:{port}: certificate expires in 365.0 days; certificate does not match localhost"
    )
    assert result.details["days_left"] == 365.0
    assert result.details["hostname_match"] is False
    assert result.details["error"] == "Hostname mismatch, certificate is not valid for 'localhost'."


def test_an_untrusted_certificate_is_critical_with_days_left(start_tls: StartTls) -> None:
    port = start_tls(leaf(trustme.CA(), expiring_in(365)))

    result = check_tls(tls(port))

    assert result.status == "critical"
    assert result.summary == (
        f"127.0.0.1:{port}: certificate expires in 365.0 days; "
        "not trusted: unable to get local issuer certificate"
    )
    assert result.details["days_left"] == 365.0
    assert result.details["hostname_match"] is True
    assert result.details["error"] == "unable to get local issuer certificate"


def test_the_name_is_checked_when_the_chain_is_untrusted(start_tls: StartTls) -> None:
    port = start_tls(leaf(trustme.CA(), expiring_in(365), name="other.example"))

    result = check_tls(tls(port))

    assert result.status == "critical"
    assert result.details["hostname_match"] is False
    assert "certificate does not match localhost" in result.summary


def test_a_wildcard_certificate_matches_one_label(start_tls: StartTls) -> None:
    port = start_tls(leaf(trustme.CA(), expiring_in(365), name="*.caretaker.test"))

    matching = check_tls(tls(port, server_name="api.caretaker.test"))
    deeper = check_tls(tls(port, server_name="a.api.caretaker.test"))

    assert matching.details["hostname_match"] is True
    assert deeper.details["hostname_match"] is False


def test_a_missing_ca_file_is_a_verification_error(
    ca: trustme.CA, tmp_path: Path, start_tls: StartTls
) -> None:
    port = start_tls(leaf(ca, expiring_in(365)))

    result = check_tls(tls(port, ca_file=str(tmp_path / "missing.pem")))

    assert result.status == "critical"
    assert result.details["days_left"] == 365.0
    assert result.details["error"] == ("verification failed: [Errno 2] No such file or directory")


def test_a_closed_port_is_critical_at_once() -> None:
    port = free_port()
    started = time.monotonic()

    result = check_tls(tls(port, timeout_s=2))

    assert time.monotonic() - started < 0.5
    assert result.status == "critical"
    assert result.summary == f"cannot connect to 127.0.0.1:{port}: Connection refused"
    assert result.value is None
    assert result.details == {
        "not_after": None,
        "days_left": None,
        "subject": None,
        "issuer": None,
        "hostname_match": None,
        "error": "Connection refused",
    }


@pytest.fixture
def mute_port() -> Iterator[int]:
    """A port that accepts TCP connections and never says anything."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield int(listener.getsockname()[1])
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()
    for conn in accepted:
        conn.close()


@pytest.fixture
def full_backlog_port() -> Iterator[int]:
    """A port whose listener never accepts and whose backlog is already full."""
    with socket.socket() as listener, socket.socket() as waiting:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        waiting.connect(listener.getsockname())
        yield int(listener.getsockname()[1])


def test_a_server_that_never_speaks_tls_is_critical_within_the_timeout(mute_port: int) -> None:
    timeout_s = 0.5
    started = time.monotonic()

    result = check_tls(tls(mute_port, timeout_s=timeout_s))

    assert time.monotonic() - started < timeout_s + 1
    assert result.status == "critical"
    assert result.summary == f"no TLS handshake with 127.0.0.1:{mute_port} within 0.5s"
    assert result.details["error"] == "timeout"


def test_a_listener_with_a_full_backlog_is_critical_within_the_timeout(
    full_backlog_port: int,
) -> None:
    timeout_s = 0.5
    started = time.monotonic()

    result = check_tls(tls(full_backlog_port, timeout_s=timeout_s))

    assert time.monotonic() - started < timeout_s + 1
    assert result.status == "critical"
    assert result.summary == f"no TLS handshake with 127.0.0.1:{full_backlog_port} within 0.5s"


@pytest.fixture
def trickle_port() -> Iterator[int]:
    """A port that starts a TLS record and then sends one byte of it every 0.2 s for 4 s."""
    listener = socket.create_server(("127.0.0.1", 0))

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"\x16\x03\x03\x40\x00")  # a handshake record of 16 KiB
            for _ in range(20):
                time.sleep(0.2)
                try:
                    conn.sendall(b"\x00")
                except OSError:
                    return  # the check gave up and closed the connection

    threading.Thread(target=trickle, daemon=True).start()
    with listener:
        yield int(listener.getsockname()[1])


def test_a_trickling_handshake_is_bounded_by_the_timeout(trickle_port: int) -> None:
    # Each byte arrives well within timeout_s; the handshake as a whole never does.
    timeout_s = 1.0
    started = time.monotonic()

    result = check_tls(tls(trickle_port, timeout_s=timeout_s))

    assert time.monotonic() - started < timeout_s + 1
    assert result.status == "critical"
    assert result.summary == f"no TLS handshake with 127.0.0.1:{trickle_port} within 1.0s"


def test_a_plain_text_server_is_a_handshake_failure() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])

    def answer_in_plain_text() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    threading.Thread(target=answer_in_plain_text, daemon=True).start()
    with listener:
        result = check_tls(tls(port, timeout_s=2))

    assert result.status == "critical"
    assert result.summary.startswith(f"TLS handshake with 127.0.0.1:{port} failed: [SSL: ")
    assert result.details["days_left"] is None


def test_server_name_defaults_to_the_host() -> None:
    assert TlsParams(host="example.org").name == "example.org"
    assert TlsParams(host="10.0.0.1", server_name="example.org").name == "example.org"


class ZoneResolver:
    """Answers from a fixed zone: NXDOMAIN for unknown names, CNAMEs followed one step."""

    def __init__(self, zone: str) -> None:
        self.records: list[Any] = RR.fromZone(zone)

    def named(self, name: Any) -> list[Any]:
        return [record for record in self.records if record.rname == name]

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        name, qtype = request.q.qname, request.q.qtype
        if not self.named(name):
            reply.header.rcode = RCODE.NXDOMAIN
        for record in self.named(name):
            if record.rtype == qtype:
                reply.add_answer(record)
            elif record.rtype == QTYPE.CNAME:
                reply.add_answer(record)
                target = self.named(record.rdata.label)
                reply.add_answer(*[found for found in target if found.rtype == qtype])
        return reply


@pytest.fixture(scope="module")
def nameserver() -> Iterator[int]:
    """The UDP port of a DNS server on 127.0.0.1 serving ZONE."""
    server = DNSServer(
        ZoneResolver(ZONE),
        address="127.0.0.1",
        port=0,
        logger=DNSLogger("-request,-reply,-truncated"),
    )
    server.start_thread()
    yield int(server.server.server_address[1])
    server.stop()
    server.server.server_close()


def dns(port: int, name: str, **params: Any) -> DnsParams:
    return DnsParams(name=name, nameserver="127.0.0.1", nameserver_port=port, **params)


def test_a_records_resolve_healthy(nameserver: int) -> None:
    result = check_dns(dns(nameserver, "app.caretaker.test"))

    assert result.status == "healthy"
    assert result.value is not None and 0 < result.value < 1000
    assert result.summary == (
        f"app.caretaker.test A resolved to 10.0.0.5, 10.0.0.6 in {result.value:.0f} ms"
    )
    assert result.details == {
        "answers": ["10.0.0.5", "10.0.0.6"],
        "expected": [],
        "missing": [],
        "error": None,
    }


def test_an_expected_subset_is_healthy(nameserver: int) -> None:
    result = check_dns(dns(nameserver, "app.caretaker.test", expected=["10.0.0.6"]))

    assert result.status == "healthy"
    assert result.details["expected"] == ["10.0.0.6"]
    assert result.details["missing"] == []


def test_a_missing_expected_address_is_critical(nameserver: int) -> None:
    expected = ["10.0.0.5", "10.0.0.7"]

    result = check_dns(dns(nameserver, "app.caretaker.test", expected=expected))

    assert result.status == "critical"
    assert result.summary == "app.caretaker.test A lacks 10.0.0.7; answers: 10.0.0.5, 10.0.0.6"
    assert result.details["answers"] == ["10.0.0.5", "10.0.0.6"]
    assert result.details["missing"] == ["10.0.0.7"]


def test_an_unknown_name_is_critical(nameserver: int) -> None:
    result = check_dns(dns(nameserver, "gone.caretaker.test"))

    assert result.status == "critical"
    assert result.value is None
    assert result.summary == "gone.caretaker.test does not exist (NXDOMAIN)"
    assert result.details == {
        "answers": [],
        "expected": [],
        "missing": [],
        "error": "gone.caretaker.test does not exist (NXDOMAIN)",
    }


def test_a_name_without_records_of_the_type_is_critical(nameserver: int) -> None:
    result = check_dns(dns(nameserver, "app.caretaker.test", record_type="AAAA"))

    assert result.status == "critical"
    assert result.summary == "app.caretaker.test has no AAAA records"


def test_aaaa_expected_addresses_compare_normalised(nameserver: int) -> None:
    expected = ["2001:DB8:0::5"]

    result = check_dns(dns(nameserver, "v6.caretaker.test", record_type="AAAA", expected=expected))

    assert result.status == "healthy"
    assert result.details["answers"] == ["2001:db8::5"]


def test_cname_answers_are_names_without_the_final_dot(nameserver: int) -> None:
    expected = ["APP.caretaker.test."]

    result = check_dns(
        dns(nameserver, "www.caretaker.test", record_type="CNAME", expected=expected)
    )

    assert result.status == "healthy"
    assert result.details["answers"] == ["app.caretaker.test"]


def test_an_a_query_follows_a_cname(nameserver: int) -> None:
    result = check_dns(dns(nameserver, "www.caretaker.test"))

    assert result.status == "healthy"
    assert result.details["answers"] == ["10.0.0.5", "10.0.0.6"]


def test_mx_answers_carry_the_preference(nameserver: int) -> None:
    result = check_dns(
        dns(nameserver, "caretaker.test", record_type="MX", expected=["10 mail.caretaker.test"])
    )

    assert result.status == "healthy"
    assert result.details["answers"] == ["10 mail.caretaker.test"]


def test_txt_answers_are_the_unquoted_text(nameserver: int) -> None:
    result = check_dns(
        dns(nameserver, "caretaker.test", record_type="TXT", expected=["v=spf1 -all"])
    )

    assert result.status == "healthy"
    assert result.details["answers"] == ["v=spf1 -all"]


def test_a_silent_nameserver_is_critical_within_the_timeout() -> None:
    timeout_s = 0.5
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        started = time.monotonic()

        result = check_dns(
            dns(int(silent.getsockname()[1]), "app.caretaker.test", timeout_s=timeout_s)
        )

    assert time.monotonic() - started < timeout_s + 1
    assert result.status == "critical"
    assert result.summary == "no answer for app.caretaker.test A within 0.5s"


def test_the_nameserver_must_be_an_address() -> None:
    with pytest.raises(ValueError, match="nameserver"):
        DnsParams(name="app.caretaker.test", nameserver="ns1.caretaker.test")
