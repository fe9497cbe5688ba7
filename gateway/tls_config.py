"""The ``tls`` and ``upstream_tls`` sections of the gateway config: HTTPS served, and HTTPS to engines.

Each file comes from its field or, when the field is unset, from its environment variable, and is
checked when the config loads; messages say where a bad value came from (docs/tls.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pdgate.common.tls import ClientTlsFiles, ServerTlsFiles, TlsError, client_context, server_context


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TlsConfig(_Strict):
    """HTTPS on the gateway's own port (docs/tls.md). A file left unset here is read from its
    environment variable; neither set: plain HTTP. SIGHUP reads the certificate and key files
    again (a rotated certificate serves new connections; files that do not load keep the old one)."""

    cert_file: str | None = Field(
        None,
        description="PEM certificate chain the gateway serves HTTPS with, leaf first "
        "(also PDGATE_TLS_CERT_FILE); unset with key_file: plain HTTP",
    )
    key_file: str | None = Field(
        None, description="cert_file's private key, unencrypted PEM (also PDGATE_TLS_KEY_FILE)"
    )
    client_ca_file: str | None = Field(
        None,
        description="PEM CA bundle client certificates are verified against (also PDGATE_TLS_CLIENT_CA_FILE); "
        "clients are asked for one, /v1 still serves clients without one",
    )
    admin_requires_client_cert: bool = Field(
        False,
        description="/admin answers only connections that presented a client certificate signed by "
        "client_ca_file (401 otherwise); admin.api_key, when set, is required as well",
    )

    def files(self, env: Mapping[str, str] = os.environ) -> ServerTlsFiles | None:
        """The files to serve HTTPS with (fields, else their environment variables), or None for
        plain HTTP; ``ValueError`` when they do not make a whole (a cert without its key, admin
        mTLS without a client CA). Messages name where each value came from."""
        cert = _setting(self.cert_file, "tls.cert_file", env, "PDGATE_TLS_CERT_FILE")
        key = _setting(self.key_file, "tls.key_file", env, "PDGATE_TLS_KEY_FILE")
        client_ca = _setting(self.client_ca_file, "tls.client_ca_file", env, "PDGATE_TLS_CLIENT_CA_FILE")
        if cert is not None and key is None:
            raise ValueError(f"{cert[1]} is set but tls.key_file (or PDGATE_TLS_KEY_FILE) is not: give both")
        if key is not None and cert is None:
            raise ValueError(f"{key[1]} is set but tls.cert_file (or PDGATE_TLS_CERT_FILE) is not: give both")
        if cert is None or key is None:  # neither: plain HTTP
            if client_ca is not None or self.admin_requires_client_cert:
                given = client_ca[1] if client_ca is not None else "tls.admin_requires_client_cert"
                raise ValueError(
                    f"{given}: client certificates need HTTPS: set tls.cert_file and tls.key_file "
                    "(or PDGATE_TLS_CERT_FILE and PDGATE_TLS_KEY_FILE)"
                )
            return None
        if self.admin_requires_client_cert and client_ca is None:
            raise ValueError(
                "tls.admin_requires_client_cert needs tls.client_ca_file (or PDGATE_TLS_CLIENT_CA_FILE) "
                "to verify client certificates against"
            )
        return ServerTlsFiles(cert[0], key[0], client_ca[0] if client_ca else None)

    @model_validator(mode="after")
    def _usable(self) -> TlsConfig:
        """The files exist and load (the certificate matches its key, the CA bundle parses)."""
        files = self.files()
        if files is not None:
            try:
                server_context(files)
            except TlsError as exc:
                raise ValueError(str(exc)) from None
        return self


class UpstreamTlsConfig(_Strict):
    """How the gateway verifies engines served over ``https://`` URLs (health, scrapes and every
    leg); verification is always on and the URL's host name must match the engine's certificate.
    A file left unset here is read from its environment variable."""

    ca_file: str | None = Field(
        None,
        description="PEM CA bundle engine certificates are verified against (also PDGATE_UPSTREAM_CA_FILE); "
        "unset: the system's trust store",
    )
    cert_file: str | None = Field(
        None,
        description="client certificate chain sent to engines that require one (mTLS; also PDGATE_UPSTREAM_CERT_FILE)",
    )
    key_file: str | None = Field(
        None, description="cert_file's private key, unencrypted PEM (also PDGATE_UPSTREAM_KEY_FILE)"
    )

    def files(self, env: Mapping[str, str] = os.environ) -> ClientTlsFiles:
        """The files, from the fields or else their environment variables."""
        return ClientTlsFiles(
            ca_file=self.ca_file or env.get("PDGATE_UPSTREAM_CA_FILE") or None,
            cert_file=self.cert_file or env.get("PDGATE_UPSTREAM_CERT_FILE") or None,
            key_file=self.key_file or env.get("PDGATE_UPSTREAM_KEY_FILE") or None,
        )

    @model_validator(mode="after")
    def _usable(self) -> UpstreamTlsConfig:
        """The files given exist and load; a client certificate comes with its key."""
        files = self.files()
        if files.configured:
            try:
                client_context(files)
            except TlsError as exc:
                raise ValueError(str(exc)) from None
        return self


def _setting(value: str | None, field: str, env: Mapping[str, str], variable: str) -> tuple[str, str] | None:
    """A file setting and where it came from: the config field, else its environment variable, else None."""
    if value:
        return value, field
    from_env = env.get(variable)
    return (from_env, variable) if from_env else None
