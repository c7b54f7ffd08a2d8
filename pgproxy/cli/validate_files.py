"""`pgproxy validate --check-files`: load the TLS files a config names.

Each listener's certificate and private key are loaded with the code that
`pgproxy run` uses to build the listener's TLS context, and each cluster's
`tls_ca_file` with the code that verifies `https://` endpoints in health
probes and `check-upstreams`. A failure becomes an error diagnostic on the
key that names the file, with the path as resolved against the config's
directory. Diagnostic codes:

    tls-file-missing     the file does not exist
    tls-file-unreadable  permission denied, a directory, or not a regular file
    tls-file-invalid     not PEM, no certificate in it, or an encrypted key
    tls-key-mismatch     the private key does not belong to the certificate
"""

from __future__ import annotations

import os
import ssl
import stat
from collections.abc import Mapping

from pgproxy.config.diagnostics import Diagnostic
from pgproxy.config.sourcemap import format_key_path
from pgproxy.graph.settings import TlsSettings
from pgproxy.graph.types import Cluster, Listener
from pgproxy.health.active import ca_file_ssl_context
from pgproxy.server.listeners import EncryptedKeyError, tls_server_context

MISSING_HINT = (
    'a relative path is resolved against the directory of the config file; "~" '
    "is not expanded"
)


def check_tls_files(
    listeners: Mapping[str, Listener], clusters: Mapping[str, Cluster], source: str
) -> list[Diagnostic]:
    """Load every TLS file of the listeners and clusters; diagnose each failure.

    `source` is the config file that the diagnostics point into. Matches the
    FileCheck signature of pgproxy.graph.build.
    """
    found: list[Diagnostic] = []
    for name, listener in listeners.items():
        tls = listener.settings.tls
        if tls is not None:
            found.extend(_check_listener(source, name, tls))
    for name, cluster in clusters.items():
        ca_file = cluster.settings.tls_ca_file
        if ca_file is not None:
            key = format_key_path(("clusters", name, "tls_ca_file"))
            found.extend(_check_ca_file(source, key, ca_file))
    return found


def _check_listener(source: str, name: str, tls: TlsSettings) -> list[Diagnostic]:
    cert_key = format_key_path(("listeners", name, "tls", "certificate"))
    key_key = format_key_path(("listeners", name, "tls", "private_key"))
    unreadable = [
        *_unreadable(source, cert_key, "certificate", tls.certificate),
        *_unreadable(source, key_key, "private key", tls.private_key),
    ]
    if unreadable:
        return unreadable
    try:
        tls_server_context(tls)
    except EncryptedKeyError:
        message = (
            f'private key file "{tls.private_key}" is encrypted, and pgproxy '
            "cannot take a passphrase"
        )
        hint = "store the key without a passphrase: openssl pkey -in KEY -out NEW"
        return [_error(source, key_key, "tls-file-invalid", message, hint)]
    except ssl.SSLError as exc:
        return [_ssl_failure(source, cert_key, key_key, tls, exc)]
    except OSError as exc:
        # The files passed the checks above, so they changed since, or the
        # read itself failed.
        message = (
            f'cannot load certificate "{tls.certificate}" or private key '
            f'"{tls.private_key}": {exc.strerror or exc}'
        )
        return [_error(source, cert_key, "tls-file-unreadable", message)]
    return []


def _ssl_failure(
    source: str, cert_key: str, key_key: str, tls: TlsSettings, exc: ssl.SSLError
) -> Diagnostic:
    """Diagnose an OpenSSL error of loading a certificate and key that were read."""
    if exc.reason == "KEY_VALUES_MISMATCH":
        message = (
            f'private key file "{tls.private_key}" does not match the certificate '
            f'in "{tls.certificate}"'
        )
        hint = "use the key that the certificate was issued for"
        return _error(source, key_key, "tls-key-mismatch", message, hint)
    # OpenSSL names neither file, so a certificate that loads on its own
    # leaves the key as the file it rejected.
    if _has_certificate(tls.certificate):
        message = f'private key file "{tls.private_key}" is not a PEM private key'
        hint = 'expected a "-----BEGIN PRIVATE KEY-----" block'
        return _error(source, key_key, "tls-file-invalid", message, hint)
    message = f'certificate file "{tls.certificate}" is not a PEM certificate chain'
    hint = 'expected a "-----BEGIN CERTIFICATE-----" block'
    return _error(source, cert_key, "tls-file-invalid", message, hint)


def _has_certificate(path: str) -> bool:
    """Return whether `path` contains at least one PEM certificate that parses."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError):
        return False
    return True


def _check_ca_file(source: str, key: str, path: str) -> list[Diagnostic]:
    unreadable = _unreadable(source, key, "CA", path)
    if unreadable:
        return unreadable
    try:
        ca_file_ssl_context(path)
    except ssl.SSLError:
        message = f'CA file "{path}" is not a PEM file of CA certificates'
        hint = 'expected one or more "-----BEGIN CERTIFICATE-----" blocks'
        return [_error(source, key, "tls-file-invalid", message, hint)]
    except OSError as exc:
        message = f'cannot read CA file "{path}": {exc.strerror or exc}'
        return [_error(source, key, "tls-file-unreadable", message)]
    return []


def _unreadable(source: str, key: str, file_kind: str, path: str) -> list[Diagnostic]:
    """Return a diagnostic when `path` is not a regular file that can be opened.

    A FIFO or device is rejected without being opened, because reading a
    FIFO blocks until another process writes to it.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        message = f'{file_kind} file "{path}" not found'
        return [_error(source, key, "tls-file-missing", message, MISSING_HINT)]
    except OSError as exc:
        message = f'cannot read {file_kind} file "{path}": {exc.strerror or exc}'
        return [_error(source, key, "tls-file-unreadable", message)]
    if stat.S_ISDIR(mode):
        message = f'{file_kind} file "{path}" is a directory, not a file'
        return [_error(source, key, "tls-file-unreadable", message)]
    if not stat.S_ISREG(mode):
        message = f'{file_kind} file "{path}" is not a regular file'
        return [_error(source, key, "tls-file-unreadable", message)]
    try:
        os.close(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)))
    except OSError as exc:
        message = f'cannot read {file_kind} file "{path}": {exc.strerror or exc}'
        return [_error(source, key, "tls-file-unreadable", message)]
    return []


def _error(
    source: str, key: str, code: str, message: str, hint: str | None = None
) -> Diagnostic:
    return Diagnostic(source, 0, 0, key, code, message, hint=hint)
