"""deft_server: the gRPC server of deft (installed from the ``server/`` folder under this import name).

``deft serve`` (or ``python -m deft_server``) starts it; :mod:`deft_server.app` is the process,
:mod:`deft_server.service` the ``deft.v1`` servicers, :mod:`deft_server.registry` the persistent
adapter registry, :mod:`deft_server.errors` the one error → status-code mapping, and
:mod:`deft_server.metrics` the Prometheus metrics. Settings: :class:`deft_server.config.ServerSettings`.
"""
