"""deft_client: the Python client for a deft server.

The client arrives with the server issue; this package exists so the import name is reserved
and installable from the first commit.
"""
