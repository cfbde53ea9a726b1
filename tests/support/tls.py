"""An https endpoint in front of a plain-http S3 server, for tests of Pail over TLS.

``certificates(directory)`` makes a private certificate authority and a server
certificate it signed for 127.0.0.1 and localhost (what an on-premises store with its
own CA looks like to a client: trusted only with ``--ca-bundle``). ``TlsFront`` accepts
TLS connections on a free port of 127.0.0.1 and relays their bytes, decrypted, to the
server: it does not parse HTTP, so signatures over the Host header (the front's) hold.
"""

from __future__ import annotations

import datetime
import ipaddress
import select
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .listening import accepted

# A relay that hears nothing from either side for this long ends the connection: bounded.
_IDLE_LIMIT = 60.0


@dataclass(frozen=True)
class Certificates:
    ca: Path  # the authority's certificate: what a client is told to trust
    server_cert: Path
    server_key: Path


def certificates(directory: Path) -> Certificates:
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Pail test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    found = Certificates(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    found.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    found.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    found.server_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return found


class TlsFront:
    """``with TlsFront(upstream, certs) as front: front.endpoint`` is https://127.0.0.1:PORT."""

    def __init__(self, upstream_endpoint: str, certs: Certificates) -> None:
        upstream = urlsplit(upstream_endpoint)
        self._upstream = (upstream.hostname or "127.0.0.1", upstream.port or 80)
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(certs.server_cert, certs.server_key)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"https://127.0.0.1:{self.port}"
        self.handshakes = 0  # TLS connections that completed their handshake
        self._stop = threading.Event()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._accept, name="tls-front-accept", daemon=True)]

    def __enter__(self) -> TlsFront:
        self._threads[0].start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        with self._lock:
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for thread in list(self._threads):
            thread.join(5)
        self._listener.close()

    def _accept(self) -> None:
        for conn in accepted(self._listener, self._stop):
            thread = threading.Thread(target=self._relay, args=(conn,), name="tls-front-relay", daemon=True)
            with self._lock:
                self._threads.append(thread)
            thread.start()

    def _relay(self, raw: socket.socket) -> None:
        tls = upstream = None
        try:
            raw.settimeout(_IDLE_LIMIT)
            tls = self._context.wrap_socket(raw, server_side=True)  # the handshake, bounded by the timeout
            self.handshakes += 1
            upstream = socket.create_connection(self._upstream, timeout=_IDLE_LIMIT)
            with self._lock:
                self._open |= {tls, upstream}
            peer = {tls: upstream, upstream: tls}
            while not self._stop.is_set():
                # Bytes OpenSSL has decrypted already do not make the socket readable.
                ready = [tls] if tls.pending() else select.select([tls, upstream], [], [], _IDLE_LIMIT)[0]
                if not ready:
                    return
                for sock in ready:
                    data = sock.recv(256 * 1024)
                    if not data:
                        return
                    peer[sock].sendall(data)
        except (OSError, ssl.SSLError):
            return  # the client went away, or refused our certificate: its side reports it
        finally:
            for sock in (tls or raw, upstream):  # wrapping took raw's descriptor over
                if sock is not None:
                    with self._lock:
                        self._open.discard(sock)
                    sock.close()
