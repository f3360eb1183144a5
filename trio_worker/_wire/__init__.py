"""The wire, sans-I/O: HTTP/2 + gRPC framing, HPACK, status; no trio, no sockets."""
