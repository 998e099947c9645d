"""``medfedpure serve``: the guarded classifier as an HTTP service (FastAPI + uvicorn).

Import :func:`medfedpure.serve.app.create_app` for the ASGI application and
:class:`medfedpure.serve.config.ServeConfig` for its settings. Needs the ``serve`` extra
(``pip install medfedpure[serve]``); never torch.
"""

from __future__ import annotations
