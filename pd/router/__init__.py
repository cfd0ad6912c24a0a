"""``pd-router``: an OpenAI-compatible front for pd-serve instances (FastDeploy's
Router shape). Instances register (``pd-serve --router HOST:PORT``) and heartbeat;
the router picks one per request with a policy (with ``--splitwise``: a prefill and a
decode instance) and streams its answer back.

    wire.py      what instances and the router say to each other
    registry.py  who is registered, who is up, their load
    policy.py    how an instance is picked (pure, over a snapshot)
    pairing.py   prefill/decode pairs: engine ranks checked, the pairing headers
    forward.py   one request to one instance, its answer relayed unchanged
    app.py       the HTTP routes and the health prober
    main.py      flags (config.py) and start-up
"""
