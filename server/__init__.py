"""deft_server: the gRPC server (installed from the ``server/`` folder under this import name).

The server itself arrives with the server issue; this package exists so the import name is
reserved and installable from the first commit.
"""
