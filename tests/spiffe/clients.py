"""Independent SPIFFE clients of the agent's SPIFFE socket (RFD 0011), driven by
tests/tests/spiffe.rs: py-spiffe (X509Source, JwtSource, WorkloadApiClient),
spiffe-tls, an Envoy SDS client generated from Envoy's protos (xds-protos)
and PyJWT's PyJWKClient. Each command prints one JSON object on stdout; the
socket comes from SPIFFE_ENDPOINT_SOCKET. None of this is Grantline code.

usage: clients.py x509 OUT_DIR WAIT_ROTATION_S | jwt AUDIENCE | codes
       | mtls-server PORT EXPECTED_ID | mtls-client PORT | sds WAIT_ROTATION_S
       | oidc ISSUER CA_FILE TOKEN AUDIENCE
"""
import json
import os
import ssl
import sys
import threading
import time


def out(**fields):
    print(json.dumps(fields), flush=True)


def socket_path():
    return os.environ["SPIFFE_ENDPOINT_SOCKET"]


def pem(cert):
    from cryptography.hazmat.primitives.serialization import Encoding
    return cert.public_bytes(Encoding.PEM).decode()


def x509(out_dir, wait):
    """X509Source: the SVID, its files, and a rotation pushed by the stream."""
    from spiffe import X509Source
    updated = threading.Event()
    source = X509Source(socket_path=socket_path(), timeout_in_seconds=30)
    first = source.svid
    serials = [first.leaf.serial_number]
    source.subscribe_for_updates(updated.set)
    start = time.monotonic()
    rotated = None
    while time.monotonic() - start < wait:
        if updated.wait(0.2):
            updated.clear()
            serial = source.svid.leaf.serial_number
            if serial != serials[-1]:
                rotated = time.time()
                serials.append(serial)
                break
    bundle = source.get_bundle_for_trust_domain(first.spiffe_id.trust_domain)
    with open(os.path.join(out_dir, "svid.pem"), "w") as f:
        f.write(pem(first.leaf))
    with open(os.path.join(out_dir, "intermediates.pem"), "w") as f:
        f.write("".join(pem(c) for c in first.cert_chain[1:]))
    with open(os.path.join(out_dir, "bundle.pem"), "w") as f:
        f.write("".join(pem(c) for c in bundle.x509_authorities))
    source.close()
    out(spiffe_id=str(first.spiffe_id), serials=[format(s, "x") for s in serials], chain=len(first.cert_chain),
        rotated_at=rotated)


def jwt(audience):
    """JwtSource: a JWT-SVID, checked against the JWT bundle it serves."""
    from spiffe import JwtSource
    from spiffe.svid.jwt_svid import JwtSvid
    source = JwtSource(socket_path=socket_path(), timeout_in_seconds=30)
    svid = source.fetch_svid(audience={audience})
    bundle = source.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    checked = JwtSvid.parse_and_validate(svid.token, bundle, {audience})
    source.close()
    out(spiffe_id=str(checked.spiffe_id), token=svid.token)


def validate(token, audience):
    """The agent's ValidateJWTSVID, through py-spiffe."""
    from spiffe import WorkloadApiClient
    try:
        with WorkloadApiClient(socket_path()) as client:
            svid = client.validate_jwt_svid(token, audience)
            out(valid=True, spiffe_id=str(svid.spiffe_id))
    except Exception as e:  # noqa: BLE001 - the test reads the refusal
        out(valid=False, error=str(e))


def codes():
    """The codes the Workload API standard names: no security header, and a
    caller the policy maps to no SPIFFE ID."""
    import grpc
    from spiffe._proto import workload_pb2, workload_pb2_grpc
    channel = grpc.insecure_channel("unix:" + socket_path().removeprefix("unix:"))
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
    result = {}
    for name, metadata in [("no_header", []), ("with_header", [("workload.spiffe.io", "true")])]:
        try:
            next(iter(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=metadata, timeout=30)))
            result[name] = "OK"
        except grpc.RpcError as e:
            result[name] = e.code().name
            result[name + "_message"] = e.details()
    out(**result)


def mtls_server(port, expected):
    """spiffe-tls: an mTLS server that takes only the SPIFFE ID `expected`."""
    from spiffe import SpiffeId, X509Source
    from spiffetls import ListenOptions, ServerTlsMode, listen
    from spiffetls.tlsconfig.authorize import authorize_id
    source = X509Source(socket_path=socket_path(), timeout_in_seconds=30)
    options = ListenOptions(tls_mode=ServerTlsMode.MTLS, authorize_fn=authorize_id(SpiffeId(expected)))
    server = listen(f"127.0.0.1:{port}", source, options)
    out(listening=True, spiffe_id=str(source.svid.spiffe_id))
    served = []
    for _ in range(2):
        conn, _ = server.accept()
        try:
            conn.do_handshake()
            peer = conn.get_peer_certificate()
            data = conn.recv(64)
            conn.sendall(b"hello " + data)
            served.append("accepted")
        except Exception as e:  # noqa: BLE001 - a refused peer is the point
            served.append(f"refused: {e!r}"[:300])
        finally:
            conn.close()
    source.close()
    out(served=served)


def mtls_client(port):
    from spiffe import X509Source
    from spiffetls import dial
    source = X509Source(socket_path=socket_path(), timeout_in_seconds=30)
    try:
        conn = dial(f"127.0.0.1:{port}", source)
        conn.sendall(b"from " + str(source.svid.spiffe_id).encode())
        reply = conn.recv(200).decode()
        conn.close()
        out(ok=True, reply=reply, spiffe_id=str(source.svid.spiffe_id))
    except Exception as e:  # noqa: BLE001
        out(ok=False, error=f"{e!r} <- {e.__cause__!r}"[:600], spiffe_id=str(source.svid.spiffe_id))
    source.close()


def sds(wait):
    """Envoy SDS over the same socket: StreamSecrets sees the rotation."""
    import grpc
    from envoy.service.discovery.v3 import discovery_pb2
    from envoy.service.secret.v3 import sds_pb2_grpc
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
    channel = grpc.insecure_channel("unix:" + socket_path().removeprefix("unix:"))
    stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
    type_url = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    names = ["default", "ROOTCA"]
    requests = [discovery_pb2.DiscoveryRequest(resource_names=names, type_url=type_url)]
    acks = threading.Condition()

    def gen():
        # The first request, then an ACK for every response (as Envoy does).
        sent = 0
        while True:
            with acks:
                while sent >= len(requests):
                    acks.wait()
                req = requests[sent]
            sent += 1
            yield req

    versions, seen = [], {}
    start = time.monotonic()
    stream = stub.StreamSecrets(gen(), timeout=wait + 30)
    for resp in stream:
        kinds = {}
        for any_ in resp.resources:
            s = secret_pb2.Secret()
            any_.Unpack(s)
            kinds[s.name] = s.WhichOneof("type")
            if s.name == "default":
                seen["chain_has_key"] = b"PRIVATE KEY" in s.tls_certificate.private_key.inline_bytes
                seen["chain_pems"] = s.tls_certificate.certificate_chain.inline_bytes.count(b"BEGIN CERTIFICATE")
            if s.name == "ROOTCA":
                seen["bundle_pems"] = s.validation_context.trusted_ca.inline_bytes.count(b"BEGIN CERTIFICATE")
        versions.append(resp.version_info)
        seen["kinds"] = kinds
        with acks:
            requests.append(discovery_pb2.DiscoveryRequest(
                resource_names=names, type_url=type_url, version_info=resp.version_info,
                response_nonce=resp.nonce))
            acks.notify()
        if len(versions) == 2 or time.monotonic() - start > wait:
            break
    fetched = stub.FetchSecrets(discovery_pb2.DiscoveryRequest(resource_names=["ROOTCA"], type_url=type_url))
    out(versions=versions, fetched=len(fetched.resources), **seen)


def oidc(issuer, ca_file, token, audience):
    """PyJWT's PyJWKClient, through the broker's OIDC discovery document:
    the token verifies; another audience, an expired token and one signed
    by another key (same kid) do not."""
    import jwt
    import urllib.request
    from cryptography.hazmat.primitives.asymmetric import ec
    ctx = ssl.create_default_context(cafile=ca_file)
    with urllib.request.urlopen(issuer + "/.well-known/openid-configuration", context=ctx) as r:
        doc = json.load(r)
    client = jwt.PyJWKClient(doc["jwks_uri"], ssl_context=ctx)
    key = client.get_signing_key_from_jwt(token)
    result = {"issuer": doc["issuer"], "algs": doc["id_token_signing_alg_values_supported"]}

    def check(name, tok, aud):
        try:
            claims = jwt.decode(tok, key.key, algorithms=["ES256"], audience=aud, issuer=doc["issuer"])
            result[name] = "valid:" + claims["sub"]
        except jwt.PyJWTError as e:
            result[name] = type(e).__name__

    check("token", token, audience)
    check("other_audience", token, "https://other.example")
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    with open(os.environ["JWT_KEY_FILE"], "rb") as f:
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
        real = load_pem_private_key(f.read(), None)
    expired = dict(claims, exp=int(time.time()) - 60, iat=int(time.time()) - 120)
    check("expired", jwt.encode(expired, real, algorithm="ES256", headers={"kid": header["kid"]}), audience)
    other = ec.generate_private_key(ec.SECP256R1())
    check("other_key", jwt.encode(claims, other, algorithm="ES256", headers={"kid": header["kid"]}), audience)
    result["forged"] = jwt.encode(claims, other, algorithm="ES256", headers={"kid": header["kid"]})
    out(**result)


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "x509":
        x509(args[0], float(args[1]))
    elif cmd == "jwt":
        jwt(args[0])
    elif cmd == "validate":
        validate(args[0], args[1])
    elif cmd == "codes":
        codes()
    elif cmd == "mtls-server":
        mtls_server(int(args[0]), args[1])
    elif cmd == "mtls-client":
        mtls_client(int(args[0]))
    elif cmd == "sds":
        sds(float(args[0]))
    elif cmd == "oidc":
        oidc(*args)
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    # No default socket timeout: pyOpenSSL takes a socket with one for a
    # non-blocking socket (WantReadError).
    main()
