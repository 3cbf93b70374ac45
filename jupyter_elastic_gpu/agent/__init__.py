"""The GPU-node agent: sessions, one worker process per session, inventory, broker registration.

``server`` accepts connections and manages workers, ``worker`` serves one session's data
plane, ``executor`` runs ops under the allow-list, ``auth`` checks lease tokens and
``inventory`` reports the node's GPUs.
"""
