"""What many concurrent streams cost the server: ``tools/probe_hostile.py``'s stalled Output
streams (a 1-byte window each, stream i from byte i * SPREAD of a chatty job's log), with
more streams per connection than SETTINGS_MAX_CONCURRENT_STREAMS allowed before (32).

    python tools/probe_streams.py ATTACK [--pythonpath DIR] [--label TEXT]

ATTACK: spread-32 (32 streams, 1 MiB apart: probe_hostile's small-window-spread),
spread-1000 (1,000 streams on one connection, 128 KiB apart), windows-5x1000 (five
connections of one client, 1,000 streams each: over the client's 4,096 streams).
Prints one JSON line per attack (probe_hostile.measure's figures, and the streams the
server refused by RST_STREAM, counted in its audit log).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import struct
import sys
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import probe_hostile as ph

SPREAD = 128 * ph.KiB


def stalled(server: ph.Server, conns: int, streams: int, spread: int) -> dict[str, Any]:
    settings = struct.pack(">HL", 0x4, 1)  # SETTINGS_INITIAL_WINDOW_SIZE 1
    opened = ph._connections(server, conns, settings)
    for c, raw in enumerate(opened):
        data = b""
        for i in range(streams):
            stream_id = 1 + 2 * i
            data += ph.header_frames(stream_id, raw.request_block("Output"), end_stream=False)
            offset = (c * streams + i) * spread
            request = ph.pb.OutputRequest(id=ph.CHATTY[0], offset=offset, follow=True)
            data += ph.frame(ph.DATA, ph.END_STREAM, stream_id, ph.grpc_message(request))
        raw.send(data)
    time.sleep(3)
    for raw in opened:
        raw.drain(0.2)
    cut = ph._hold(opened, 12.0)
    refused = server.log.read_text(errors="replace").count("over the client's")
    return {
        "connections": len(opened),
        "streams_each": streams,
        "spread": spread,
        "refused": refused,
        "cut_off": cut,
    }


ATTACKS = {
    "spread-32": lambda s: stalled(s, 1, 32, ph.MiB),
    "spread-1000": lambda s: stalled(s, 1, 1000, SPREAD),
    "windows-5x1000": lambda s: stalled(s, 5, 1000, SPREAD // 4),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("attack", choices=[*ATTACKS, "all"])
    ap.add_argument("--pythonpath", help="run the server from this checkout instead")
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    for name in list(ATTACKS) if args.attack == "all" else [args.attack]:
        with ph.running_server(args.pythonpath) as server, ph.channel(server) as ch:
            job = ph.unary(ch, "Start", ph.pb.StartRequest(command="true"), ph.pb.Job, 30)
            script = "while :; do head -c 1048576 /dev/zero | tr '\\0' x; sleep 0.05; done"
            chatty = ph.unary(
                ch, "Start", ph.pb.StartRequest(command="sh", args=["-c", script]), ph.pb.Job, 30
            )
            ph.CHATTY[0] = chatty.id
            time.sleep(14)  # output on disk for every stream's offset: 128 MiB and more
            figures = ph.measure(server, job.id, ATTACKS[name])
            with contextlib.suppress(grpc.RpcError):
                ph.unary(ch, "Stop", ph.pb.StopRequest(id=chatty.id), ph.pb.Job, 30)
        print(json.dumps({"attack": name, "label": args.label, **figures}), flush=True)


if __name__ == "__main__":
    main()
