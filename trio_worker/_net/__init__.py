"""trio drivers over the sans-I/O wire: the TLS stream, connections, the server transport."""
