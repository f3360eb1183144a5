"""TLS contexts for the server and its clients: mutual TLS 1.3 with one cipher suite.

The contract allows exactly TLS 1.3 with TLS_AES_256_GCM_SHA384 and requires client
certificates. Python's ``ssl`` module can pin the protocol version, but not the TLS 1.3
cipher suites (``set_ciphers`` only governs TLS 1.2 and older), so
:func:`_restrict_tls13_suites` calls OpenSSL's ``SSL_CTX_set_ciphersuites`` itself, through
ctypes, on the very ``SSL_CTX`` the ``ssl`` module uses, and checks the result through the
``ssl`` module's own view of the context. Wherever that cannot be done or confirmed, building
a context fails: we never serve with a weaker policy than the one promised.

ALPN likewise: the ``ssl`` module's server callback lets a handshake go on when the client
offers no protocol we speak (or no ALPN at all), so :func:`_refuse_without_h2` installs
callbacks of ours (ctypes again) that end such a handshake with the fatal
``no_application_protocol`` alert (RFC 7301 §3.2).
"""

from __future__ import annotations

import ctypes
import functools
import os
import ssl
import sys
from collections.abc import Callable

from ._errors import TrioWorkerError

__all__ = [
    "ALPN_PROTOCOL",
    "TLS13_SUITE",
    "TLSConfigError",
    "alpn_offset",
    "client_context",
    "server_context",
]

#: The only cipher suite either side offers or accepts.
TLS13_SUITE = "TLS_AES_256_GCM_SHA384"
#: gRPC runs over HTTP/2, which over TLS must be negotiated with ALPN.
ALPN_PROTOCOL = "h2"


class TLSConfigError(TrioWorkerError):
    """TLS cannot be set up as required: a certificate or key file is missing, unreadable,
    malformed or already exists, or this Python/OpenSSL cannot enforce the TLS policy."""


# --- the one place that reaches under the ssl module ------------------------------------


@functools.cache
def _libssl() -> ctypes.CDLL:
    """Open the libssl that the ``_ssl`` extension module is linked against.

    ``dlopen`` of ``_ssl``'s own file returns the already-loaded module, and symbol lookup
    through that handle searches the module's own dependencies (libssl, libcrypto) first,
    so this finds the same library ``ssl`` calls, not merely some libssl on the system. A
    Python with OpenSSL linked statically into the interpreter has no such file; there we
    look in the global namespace. Either way the version must match ``ssl``'s.
    """
    import _ssl

    path = getattr(_ssl, "__file__", None)
    try:
        lib = ctypes.CDLL(path)  # None means the running program's global symbols
        version_num = lib.OpenSSL_version_num
        lib.SSL_CTX_set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.SSL_CTX_set_ciphersuites.restype = ctypes.c_int
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.ERR_clear_error.argtypes = []
        lib.ERR_clear_error.restype = None
    except (OSError, AttributeError) as exc:
        raise TLSConfigError(f"cannot reach OpenSSL's SSL_CTX_set_ciphersuites: {exc}") from exc
    version_num.argtypes = []
    version_num.restype = ctypes.c_ulong
    found = int(version_num())
    if found != ssl.OPENSSL_VERSION_NUMBER:
        raise TLSConfigError(
            f"the OpenSSL found ({found:#x}) is not the one the ssl module uses "
            f"({ssl.OPENSSL_VERSION_NUMBER:#x})"
        )
    return lib


def _ssl_ctx_pointer(ctx: ssl.SSLContext) -> int:
    """Return the ``SSL_CTX *`` inside ``ctx``.

    CPython's ``PySSLContext`` starts with ``PyObject_HEAD`` followed by ``SSL_CTX *ctx``
    (Modules/_ssl.c, unchanged since 3.7); ``object.__basicsize__`` is the size of that
    head in this build (debug and free-threaded builds included).
    """
    if sys.implementation.name != "cpython":
        raise TLSConfigError(
            f"cannot restrict TLS 1.3 cipher suites on {sys.implementation.name}: CPython only"
        )
    if not isinstance(ctx, ssl.SSLContext):
        raise TLSConfigError(f"expected an ssl.SSLContext, got {type(ctx).__name__}")
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not pointer:
        raise TLSConfigError("the ssl.SSLContext has no SSL_CTX")
    return pointer


def _tls13_suites(ctx: ssl.SSLContext) -> list[str]:
    return [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"]


def _restrict_tls13_suites(ctx: ssl.SSLContext, suites: str) -> None:
    """Allow only ``suites`` (OpenSSL names, ``:``-separated) in TLS 1.3 handshakes.

    Fails closed: raises :class:`TLSConfigError` unless, afterwards, ``ctx.get_ciphers()``
    (the ``ssl`` module reading the same ``SSL_CTX``) lists exactly these TLS 1.3 suites.
    """
    wanted = suites.split(":")
    if not suites.isascii() or "\0" in suites or not all(wanted):
        raise TLSConfigError(f"invalid TLS 1.3 cipher suite list {suites!r}")
    lib = _libssl()
    pointer = _ssl_ctx_pointer(ctx)
    # Before writing through the pointer, make sure it is this context's SSL_CTX: OpenSSL
    # and the ssl module must agree on its options.
    if int(lib.SSL_CTX_get_options(pointer)) != int(ctx.options):
        raise TLSConfigError("cannot locate the SSL_CTX of this ssl.SSLContext")
    if lib.SSL_CTX_set_ciphersuites(pointer, suites.encode("ascii")) != 1:
        lib.ERR_clear_error()  # or the ssl module reports our failure on its next call
        raise TLSConfigError(f"OpenSSL refused the TLS 1.3 cipher suites {suites!r}")
    got = _tls13_suites(ctx)
    if got != wanted:
        lib.ERR_clear_error()
        raise TLSConfigError(f"TLS 1.3 cipher suites are {got}, not {wanted}: refusing")


#: What an ALPN select callback answers OpenSSL (``ssl/tls1.h``).
_SSL_TLSEXT_ERR_OK = 0
_SSL_TLSEXT_ERR_ALERT_FATAL = 2
#: ``int cb(SSL *ssl, const unsigned char **out, unsigned char *outlen, const unsigned char
#: *in, unsigned int inlen, void *arg)``: the client's protocols arrive in ``in``, each
#: prefixed with its length; the one chosen is pointed at in place.
_AlpnSelect = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_void_p),
    ctypes.POINTER(ctypes.c_ubyte),
    ctypes.c_void_p,
    ctypes.c_uint,
    ctypes.c_void_p,
)


def alpn_offset(offered: bytes, wanted: bytes = ALPN_PROTOCOL.encode("ascii")) -> int | None:
    """Where ``wanted``'s bytes start in a client's ALPN list (length-prefixed names), or
    None when it does not offer it (or the list is malformed)."""
    i = 0
    while i < len(offered):
        end = i + 1 + offered[i]
        if offered[i] == 0 or end > len(offered):
            return None
        if offered[i + 1 : end] == wanted:
            return i + 1
        i = end
    return None


def _select_h2(
    _ssl: int | None,
    out: ctypes._Pointer[ctypes.c_void_p],
    outlen: ctypes._Pointer[ctypes.c_ubyte],
    offered: int | None,
    offered_len: int,
    _arg: int | None,
) -> int:
    try:
        at = alpn_offset(ctypes.string_at(offered, offered_len)) if offered else None
        if at is None:
            return _SSL_TLSEXT_ERR_ALERT_FATAL
        out[0] = offered + at  # type: ignore[operator]  # a pointer into OpenSSL's own copy
        outlen[0] = len(ALPN_PROTOCOL)
        return _SSL_TLSEXT_ERR_OK
    except BaseException:  # nothing may unwind into OpenSSL: refuse instead
        return _SSL_TLSEXT_ERR_ALERT_FATAL


#: The ClientHello extension that carries ALPN (RFC 7301), and what a ClientHello callback
#: answers OpenSSL (``ssl/ssl.h``, ``ssl/tls1.h``).
_TLSEXT_TYPE_ALPN = 16
_SSL_CLIENT_HELLO_SUCCESS = 1
_SSL_CLIENT_HELLO_ERROR = 0
_SSL_AD_NO_APPLICATION_PROTOCOL = 120
#: ``int cb(SSL *s, int *al, void *arg)``, called on each ClientHello before anything else.
_ClientHello = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.c_void_p
)


def _require_alpn(ssl_: int | None, alert: ctypes._Pointer[ctypes.c_int], _arg: int | None) -> int:
    """A ClientHello without the ALPN extension ends the handshake at once (the select
    callback is only called when the client sends one)."""
    try:
        data = ctypes.c_void_p()
        size = ctypes.c_size_t()
        get_ext = _libssl().SSL_client_hello_get0_ext
        if get_ext(ssl_, _TLSEXT_TYPE_ALPN, ctypes.byref(data), ctypes.byref(size)) == 1:
            return _SSL_CLIENT_HELLO_SUCCESS
    except BaseException:  # nothing may unwind into OpenSSL: refuse instead
        pass
    alert[0] = _SSL_AD_NO_APPLICATION_PROTOCOL
    return _SSL_CLIENT_HELLO_ERROR


#: Kept for the life of the process: OpenSSL holds bare pointers to them.
_SELECT_H2 = _AlpnSelect(_select_h2)
_REQUIRE_ALPN = _ClientHello(_require_alpn)


def _refuse_without_h2(ctx: ssl.SSLContext) -> None:
    """Make the server end, with the fatal ``no_application_protocol`` alert, a handshake
    whose client does not offer ``h2``: one offering other protocols (our select callback,
    where the ``ssl`` module's would go on with none chosen) or no ALPN at all (a
    ClientHello callback)."""
    lib = _libssl()
    try:
        set_select = lib.SSL_CTX_set_alpn_select_cb
        set_hello = lib.SSL_CTX_set_client_hello_cb
        get_ext = lib.SSL_client_hello_get0_ext
    except AttributeError as exc:
        raise TLSConfigError(f"cannot reach OpenSSL's ALPN callbacks: {exc}") from exc
    set_select.argtypes = [ctypes.c_void_p, _AlpnSelect, ctypes.c_void_p]
    set_select.restype = None
    set_hello.argtypes = [ctypes.c_void_p, _ClientHello, ctypes.c_void_p]
    set_hello.restype = None
    get_ext.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint,
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    get_ext.restype = ctypes.c_int
    pointer = _ssl_ctx_pointer(ctx)
    if int(lib.SSL_CTX_get_options(pointer)) != int(ctx.options):
        raise TLSConfigError("cannot locate the SSL_CTX of this ssl.SSLContext")
    set_select(pointer, _SELECT_H2, None)
    set_hello(pointer, _REQUIRE_ALPN, None)


# --- contexts --------------------------------------------------------------------------


#: A file's path: clients pass strings (pathlib would be part of every command's start-up).
StrPath = str | os.PathLike[str]


def _read(path: StrPath, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TLSConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def _check_certs(path: StrPath, what: str) -> None:
    """Name the file at fault, which OpenSSL's errors do not."""
    from cryptography import x509  # only once OpenSSL has refused: clients start faster

    try:
        x509.load_pem_x509_certificates(_read(path, what))
    except ValueError as exc:
        raise TLSConfigError(f"{what} {path} holds no valid PEM certificate") from exc


def _check_key(path: StrPath) -> None:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        serialization.load_pem_private_key(_read(path, "private key"), password=None)
    except TypeError as exc:  # encrypted
        raise TLSConfigError(
            f"private key {path} is encrypted; trio-worker needs an unencrypted key"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TLSConfigError(f"private key {path} holds no valid PEM private key") from exc


def _no_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise TLSConfigError("the private key is encrypted; trio-worker needs an unencrypted key")


def _diagnose(ca: StrPath, cert: StrPath, key: StrPath) -> None:
    """Raise the TLSConfigError naming the file at fault, if one of them is."""
    _check_certs(ca, "CA certificate")
    _check_certs(cert, "certificate")
    _check_key(key)


def _context(purpose: int, *, ca: StrPath, cert: StrPath, key: StrPath) -> ssl.SSLContext:
    # OpenSSL loads the files first; only when it refuses one are they parsed again with
    # cryptography to say which file is wrong and why (its import costs 30-40 ms, which
    # every client command would otherwise pay).
    if not ssl.HAS_TLSv1_3:
        raise TLSConfigError(f"this OpenSSL ({ssl.OPENSSL_VERSION}) has no TLS 1.3")
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.verify_mode = ssl.CERT_REQUIRED
    # RFC 5280 checks OpenSSL skips by default (key identifiers, CA constraints).
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, OSError) as exc:
        _diagnose(ca, cert, key)
        raise TLSConfigError(f"cannot load CA certificate {ca}: {exc}") from exc
    password: Callable[[], str] = _no_password
    try:
        ctx.load_cert_chain(str(cert), str(key), password=password)
    except (ssl.SSLError, OSError) as exc:
        _diagnose(ca, cert, key)
        raise TLSConfigError(f"cannot use certificate {cert} with key {key}: {exc}") from exc
    ctx.set_alpn_protocols([ALPN_PROTOCOL])
    _restrict_tls13_suites(ctx, TLS13_SUITE)
    return ctx


def server_context(
    *, ca: StrPath, cert: StrPath, key: StrPath, crl: StrPath | None = None
) -> ssl.SSLContext:
    """Server side: TLS 1.3 with TLS_AES_256_GCM_SHA384 only, client certificate required
    and verified against ``ca`` (and not revoked by the PEM CRL ``crl``), ALPN ``h2``."""
    ctx = _context(ssl.PROTOCOL_TLS_SERVER, ca=ca, cert=cert, key=key)
    if crl is not None:
        try:
            ctx.load_verify_locations(cafile=str(crl))
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(f"cannot load CRL {crl}: {exc}") from exc
        # The client's certificate must not be on its CA's CRL (which must be present).
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    # No session tickets: a resumed session would skip verifying the client certificate
    # (which may have expired since), and every connection is long-lived anyway.
    ctx.num_tickets = 0
    _refuse_without_h2(ctx)
    return ctx


def client_context(*, ca: StrPath, cert: StrPath, key: StrPath) -> ssl.SSLContext:
    """Client side: TLS 1.3 with TLS_AES_256_GCM_SHA384 only, server certificate and host
    name verified against ``ca``, our certificate presented, ALPN ``h2``."""
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, ca=ca, cert=cert, key=key)
    ctx.check_hostname = True
    return ctx
