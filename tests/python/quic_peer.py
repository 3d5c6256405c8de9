"""An independent QUIC client (aioquic) for attacks on the broker's port that
Grantline's own client would never make. Prints one JSON object.

    quic_peer.py frames HOST PORT CA_PEM HEX...
        one certificate-less connection; each HEX is sent on a stream of its
        own, the reply (or the close) recorded
    quic_peer.py ticket HOST PORT CA_PEM CERT_PEM KEY_PEM TICKET_FILE HEX
        as an enrolled node: sends HEX, keeps the session ticket it is given
    quic_peer.py resume HOST PORT CA_PEM CERT_PEM KEY_PEM TICKET_FILE HEX
        resumes that session and sends HEX at once, before the handshake
        completes: as 0-RTT data if the ticket allows any
"""

import asyncio
import json
import pickle
import sys

from aioquic.asyncio import connect
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated

ALPN = "grantline/1"


def configuration(ca, cert=None, key=None, ticket=None):
    cfg = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name="127.0.0.1")
    cfg.load_verify_locations(cafile=ca)
    if cert:
        cfg.load_cert_chain(cert, key)
    cfg.session_ticket = ticket
    return cfg


async def exchange(client, data, timeout=10):
    """Sends `data` on a new stream; the reply's bytes, or why there are none."""
    try:
        reader, writer = await client.create_stream()
        writer.write(data)
        writer.write_eof()
        return {"reply": (await asyncio.wait_for(reader.read(), timeout)).hex()}
    except Exception as e:  # the broker closed the stream or the connection
        return {"error": type(e).__name__ + ": " + str(e)}


def close_reason(client):
    """The application close the broker sent, if any: (code, reason hex)."""
    quic = client._quic
    for event in list(quic._events):
        if isinstance(event, ConnectionTerminated):
            return {"code": event.error_code, "reason": event.reason_phrase}
    if quic._close_event is not None:
        e = quic._close_event
        return {"code": e.error_code, "reason": e.reason_phrase}
    return None


async def frames(host, port, ca, payloads):
    out = []
    async with connect(host, port, configuration=configuration(ca)) as client:
        for hex_payload in payloads:
            out.append(await exchange(client, bytes.fromhex(hex_payload)))
        await asyncio.sleep(0)
        closed = close_reason(client)
    return {"exchanges": out, "closed": closed}


async def ticket(host, port, ca, cert, key, ticket_file, payload):
    tickets = []
    async with connect(
        host, port, configuration=configuration(ca, cert, key), session_ticket_handler=tickets.append
    ) as client:
        first = await exchange(client, bytes.fromhex(payload))
    if tickets:
        with open(ticket_file, "wb") as f:
            pickle.dump(tickets[-1], f)
    return {**first, "max_early_data_size": tickets[-1].max_early_data_size if tickets else None}


async def resume(host, port, ca, cert, key, ticket_file, payload):
    with open(ticket_file, "rb") as f:
        saved = pickle.load(f)
    async with connect(
        host, port, configuration=configuration(ca, cert, key, saved), wait_connected=False
    ) as client:
        # Sent before the handshake completes: 0-RTT if the ticket allows it.
        second = await exchange(client, bytes.fromhex(payload))
        await asyncio.sleep(0)
        tls = client._quic.tls
        return {
            **second,
            "resumed": tls.session_resumed,
            "early_data_accepted": tls.early_data_accepted,
            "closed": close_reason(client),
        }


def main():
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "frames":
        result = asyncio.run(frames(host, port, sys.argv[4], sys.argv[5:]))
    elif mode == "ticket":
        result = asyncio.run(ticket(host, port, *sys.argv[4:9]))
    elif mode == "resume":
        result = asyncio.run(resume(host, port, *sys.argv[4:9]))
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
