"""TLS contexts of listeners: the files `pgproxy run` loads before it serves."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from pgproxy.config.models import ListenerConfig, TlsConfig
from pgproxy.graph.settings import ListenerSettings, settings_from_config
from pgproxy.graph.types import Listener
from pgproxy.server.listeners import BindError, server_ssl_context


def test_encrypted_key_rejected_without_prompt(tmp_path: Path) -> None:
    issued = trustme.CA().issue_cert("proxy.test")
    cert = tmp_path / "cert.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    key = serialization.load_pem_private_key(issued.private_key_pem.bytes(), None)
    encrypted = tmp_path / "key.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )

    tls = TlsConfig(certificate=str(cert), private_key=str(encrypted))
    config = ListenerConfig(address="127.0.0.1:0", tls=tls)
    listener = Listener(
        "main", "127.0.0.1", 0, settings_from_config(ListenerSettings, config)
    )

    # Without a passphrase callback OpenSSL would prompt on the terminal.
    with pytest.raises(BindError, match="the private key is encrypted"):
        server_ssl_context(listener)
