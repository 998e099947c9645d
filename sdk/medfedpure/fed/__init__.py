"""Federated training with Flower 1.42 (Message API): one site = one node, the same app on both runtimes.

- ``phases.py``: the phase registry (classifier → MAE → teacher → student): per phase its model,
  what travels, its local training and evaluation, its artefacts; server and client look it up.
- ``tasks.py``: what a site does per phase, over the unchanged ``medfedpure.train`` loops (no Flower).
- ``client_app.py`` / ``server_app.py``: the ClientApp (train / evaluate / query handlers) and the
  ServerApp (the phases in order, then per-site gate calibration).
- ``config.py``: ``FedConfig``, the run's constants; they reach both apps as ``context.run_config``,
  messages carry only per-round values.
- ``params.py``: what travels (MoE: the global expert only) and what stays (local expert, gate,
  normalisation; kept in ``context.state`` and ``RUN/site_k/*_local.safetensors``).
- ``strategies.py`` / ``validation.py``: FedAvg, FedMedian, FedTrimmedAvg, Krum behind update
  validation (finite, names/shapes, norm bounds; bad updates dropped and logged).
- ``sim.py`` (simulation runtime), ``deploy.py`` (SuperLink + SuperNodes on 127.0.0.1),
  ``procs.py`` (nothing left running), ``compare.py``, ``plots.py``; the command line is
  ``cli/fed.py`` (``medfedpure fed sim | deploy | compare``).
"""
