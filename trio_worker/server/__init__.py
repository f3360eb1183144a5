"""The server: the gRPC services (Worker, health, reflection), authorization, ``run_server``."""
