"""TLS certificate and DNS checks; like every check, they report findings and never raise."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

import dns.exception
import dns.rdata
import dns.rdtypes.ANY.CNAME
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.TXT
import dns.resolver
from cryptography import x509
from cryptography.x509.oid import NameOID
from pydantic import Field, IPvAnyAddress

from tasks.checks import CheckResult, Params, Status, run_within, timed, worst

# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
NAME_MISMATCH_CODES = {62, 64}
SECONDS_PER_DAY = 86400

RecordType = Literal["A", "AAAA", "CNAME", "MX", "TXT"]


class TlsParams(Params):
    host: str = Field(min_length=1)
    port: int = Field(default=443, ge=1, le=65535)
    # Sent as SNI and verified against the certificate; the host when not given.
    server_name: str | None = Field(default=None, min_length=1)
    warning_days: float = Field(default=21, ge=0)
    critical_days: float = Field(default=7, ge=0)
    # One deadline for connecting and both handshakes together.
    timeout_s: float = Field(default=5.0, gt=0, le=300)
    # Trusted instead of the system's CAs, for certificates from a private CA.
    ca_file: str | None = None

    @property
    def name(self) -> str:
        return self.server_name or self.host


class _Verdict(NamedTuple):
    """What verifying the chain and name found; hostname_match None when not reached."""

    error: str | None
    untrusted: bool
    hostname_match: bool | None


def check_tls(params: TlsParams) -> CheckResult:
    """Days until a server's certificate expires; critical when expired, untrusted or misnamed."""
    started = time.monotonic()
    target = f"{params.host}:{params.port}"
    try:
        der, verdict = _inspect_within(params)
        cert = x509.load_der_x509_certificate(der)
        hostname_match = verdict.hostname_match
        if hostname_match is None:
            hostname_match = _name_matches(cert, params.name)
    except (OSError, ValueError) as exc:  # TimeoutError and ssl.SSLError are OSErrors
        reason, error = _tls_failure(target, params.timeout_s, exc)
        return timed(started, "critical", reason, _no_certificate(error))

    days_left = (cert.not_valid_after_utc - datetime.now(UTC)).total_seconds() / SECONDS_PER_DAY
    details: dict[str, Any] = {
        "not_after": cert.not_valid_after_utc.isoformat(),
        "days_left": round(days_left, 2),
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "hostname_match": hostname_match,
        "error": verdict.error,
    }

    expiry_status, expiry = _grade_expiry(days_left, params)
    statuses, findings = [expiry_status], [expiry]
    if not hostname_match:
        statuses.append("critical")
        findings.append(f"certificate does not match {params.name}")
    if verdict.untrusted:
        statuses.append("critical")
        findings.append(f"not trusted: {verdict.error}")
    summary = f"{target}: " + "; ".join(findings)
    return timed(started, worst(statuses), summary, details, value=days_left)


def _tls_failure(target: str, timeout_s: float, exc: Exception) -> tuple[str, str]:
    """The summary and error for a server whose certificate could not be read."""
    if isinstance(exc, TimeoutError):
        return f"no TLS handshake with {target} within {timeout_s}s", "timeout"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake with {target} failed: {exc}", str(exc)
    if isinstance(exc, OSError):
        error = exc.strerror or str(exc)
        return f"cannot connect to {target}: {error}", error
    return f"unreadable certificate from {target}: {exc}", str(exc)


def _no_certificate(error: str) -> dict[str, Any]:
    return {
        "not_after": None,
        "days_left": None,
        "subject": None,
        "issuer": None,
        "hostname_match": None,
        "error": error,
    }


def _grade_expiry(days_left: float, params: TlsParams) -> tuple[Status, str]:
    if days_left <= 0:
        return "critical", f"certificate expired {-days_left:.1f} days ago"
    said = f"certificate expires in {days_left:.1f} days"
    if days_left < params.critical_days:
        return "critical", f"{said}, under {params.critical_days:g} days"
    if days_left < params.warning_days:
        return "warning", f"{said}, under {params.warning_days:g} days"
    return "healthy", said


def _inspect_within(params: TlsParams) -> tuple[bytes, _Verdict]:
    """The server's certificate and the verdict on it, within timeout_s; TimeoutError otherwise."""
    # getaddrinfo and a host with several addresses are not bounded by socket timeouts, so the
    # work runs in a thread that is abandoned at the deadline. Socket timeouts are set to what
    # is left of the deadline, so the thread itself ends soon after.
    deadline = time.monotonic() + params.timeout_s
    der = run_within(
        lambda: _handshake(params, _unverified_context(), deadline), params.timeout_s, "check-tls"
    )
    try:
        verdict = run_within(lambda: _verify(params, deadline), _left(deadline), "check-tls")
    except TimeoutError:
        verdict = _Verdict(f"verification did not finish within {params.timeout_s}s", True, None)
    return der, verdict


def _unverified_context() -> ssl.SSLContext:
    # Verification is off so that an expired, untrusted or misnamed certificate can still be
    # read; _verify judges it on a second connection.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _verify(params: TlsParams, deadline: float) -> _Verdict:
    try:
        context = ssl.create_default_context(cafile=params.ca_file)
        _handshake(params, context, deadline)
    except ssl.SSLCertVerificationError as exc:
        # OpenSSL compares the name only after it has built a chain to a trusted CA; any other
        # error means the name was not looked at.
        if exc.verify_code in NAME_MISMATCH_CODES:
            return _Verdict(exc.verify_message, untrusted=False, hostname_match=False)
        return _Verdict(exc.verify_message, untrusted=True, hostname_match=None)
    except OSError as exc:  # also ssl.SSLError and an unreadable ca_file
        return _Verdict(f"verification failed: {exc}", untrusted=True, hostname_match=None)
    return _Verdict(None, untrusted=False, hostname_match=True)


def _handshake(params: TlsParams, context: ssl.SSLContext, deadline: float) -> bytes:
    """Connect and shake hands by the deadline; the server's certificate in DER."""
    address = (params.host, params.port)
    with socket.create_connection(address, timeout=_left(deadline)) as raw:
        # A socket timeout bounds the whole handshake, not each read within it.
        raw.settimeout(_left(deadline))
        with context.wrap_socket(raw, server_hostname=params.name) as tls:
            der = tls.getpeercert(binary_form=True)
    if der is None:
        raise ValueError("the server sent no certificate")
    return der


def _left(deadline: float) -> float:
    left_s = deadline - time.monotonic()
    if left_s <= 0:
        raise TimeoutError("deadline passed")
    return left_s


def _name_matches(cert: x509.Certificate, name: str) -> bool:
    """Whether the certificate is for name, checked as OpenSSL does."""
    try:
        alt_names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        alt_names = x509.SubjectAlternativeName([])
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        patterns = alt_names.get_values_for_type(x509.DNSName)
        if not patterns:  # the common name counts only when there are no DNS names
            common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            patterns = [str(attribute.value) for attribute in common_names]
        return any(_dns_name_matches(pattern, name) for pattern in patterns)
    return address in alt_names.get_values_for_type(x509.IPAddress)


def _dns_name_matches(pattern: str, name: str) -> bool:
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern.startswith("*."):
        first, _, rest = name.partition(".")
        return bool(first) and "." in pattern[2:] and rest == pattern[2:]
    return pattern == name


class DnsParams(Params):
    name: str = Field(min_length=1)
    record_type: RecordType = "A"
    # Every one must be among the answers; addresses and names compare normalised.
    expected: list[str] | None = None
    # The system's resolvers (and port 53) when not given.
    nameserver: IPvAnyAddress | None = None
    nameserver_port: int = Field(default=53, ge=1, le=65535)
    timeout_s: float = Field(default=3.0, gt=0, le=300)


def check_dns(params: DnsParams) -> CheckResult:
    """Resolve a name; critical when it does not resolve or lacks an expected answer."""
    started = time.monotonic()
    query = f"{params.name} {params.record_type}"
    expected = params.expected or []
    try:
        answer = _resolver(params).resolve(
            params.name, params.record_type, lifetime=params.timeout_s
        )
    except dns.exception.DNSException as exc:
        reason = _dns_failure(params, exc)
        details: dict[str, Any] = {
            "answers": [],
            "expected": expected,
            "missing": expected,
            "error": reason,
        }
        return timed(started, "critical", reason, details)

    resolved_ms = (time.monotonic() - started) * 1000
    answers = sorted(_answer_text(rdata) for rdata in answer)
    found = {_normalise(params.record_type, text) for text in answers}
    missing = [text for text in expected if _normalise(params.record_type, text) not in found]
    details = {"answers": answers, "expected": expected, "missing": missing, "error": None}

    listed = ", ".join(answers)
    if missing:
        summary = f"{query} lacks {', '.join(missing)}; answers: {listed}"
        return timed(started, "critical", summary, details, value=resolved_ms)
    summary = f"{query} resolved to {listed} in {resolved_ms:.0f} ms"
    return timed(started, "healthy", summary, details, value=resolved_ms)


def _resolver(params: DnsParams) -> dns.resolver.Resolver:
    if params.nameserver is None:
        return dns.resolver.Resolver()
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [str(params.nameserver)]
    resolver.port = params.nameserver_port
    return resolver


def _dns_failure(params: DnsParams, exc: dns.exception.DNSException) -> str:
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return f"{params.name} does not exist (NXDOMAIN)"
    if isinstance(exc, dns.resolver.NoAnswer):
        return f"{params.name} has no {params.record_type} records"
    if isinstance(exc, dns.exception.Timeout):
        return f"no answer for {params.name} {params.record_type} within {params.timeout_s}s"
    return f"cannot resolve {params.name} {params.record_type}: {exc}"


def _answer_text(rdata: dns.rdata.Rdata) -> str:
    if isinstance(rdata, dns.rdtypes.ANY.TXT.TXT):
        return b"".join(rdata.strings).decode(errors="replace")
    if isinstance(rdata, dns.rdtypes.ANY.MX.MX):
        return f"{rdata.preference} {rdata.exchange.to_text(omit_final_dot=True)}"
    if isinstance(rdata, dns.rdtypes.ANY.CNAME.CNAME):
        return rdata.target.to_text(omit_final_dot=True)
    return rdata.to_text()


def _normalise(record_type: RecordType, text: str) -> str:
    """The form in which an answer and an expected value compare equal."""
    if record_type in ("A", "AAAA"):
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            return text
    if record_type in ("CNAME", "MX"):
        return " ".join(text.lower().rstrip(".").split())
    return text
