"""The servers users would otherwise deploy, serving one of our subnets: the load test's peers.

LitServe and Ray Serve each serve one static row of a bundle with their own dynamic batching, the
same materialized module, preprocessing and thread plan as ``slimserve serve --policy static:<id>``
(:mod:`slimserve.server.peers.model`), so a comparison measures the serving stack and nothing else. They
ignore ``X-Latency-Budget-Ms``; the load generator counts a late answer as a miss, as for slimserve.

    slimserve peer litserve --subnet s0 --port 8001                   # max batch 8, no batch wait
    slimserve peer ray --subnet s6 --port 8002 --max-batch 16 --batch-timeout-ms 2

Both are optional extras (``pip install 'slimserve[peers]'``), never needed by ``slimserve serve``.
"""
