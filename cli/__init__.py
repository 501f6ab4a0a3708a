"""deft_cli: the ``deft`` command line (installed from the ``cli/`` folder under this import name).

The composition layer: it wires the runtime (:mod:`deft_runtime`), the server (:mod:`deft_server`)
and the client (:mod:`deft_client`) into one command. Nothing below imports it: the runtime imports
neither the server nor the client, and the server and client never import this package
(``tests/test_layers_contract.py`` checks it). Server and client commands import their package when
they run, so ``deft inspect`` and ``deft train`` work without the ``server`` extra installed.
"""
