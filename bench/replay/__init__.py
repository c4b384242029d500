"""Fleet replay: how many GPU-hours each culling strategy gives back, and what it costs the users.

A trace (``trace.py``: a documented, versioned JSON-lines format) describes what N users did over some days:
servers, kernels, cells, GPU processes, browser tabs. ``generate.py`` writes such traces from seeded behaviour
generators. ``world.py`` replays a trace in simulated time under one deployment shape (kernels inside notebook
pods, or kernels as their own pods) and keeps the books: what was allocated, idle, given back, interrupted.
Strategies act on the world: ``ours.py`` drives the real decision code (``reclaimer.core.candidates.join``,
``reclaimer.observe.sampler.Sampler``, ``reclaimer.core.policy.decide`` / ``recheck``) through one thin adapter, and
``cullers.py`` models what people run today (Jupyter Server / Enterprise Gateway culling, Kubeflow's culler,
jupyterhub-idle-culler, a GPU-utilisation culler as gpu-pruner), each from its documented semantics with the
source cited. ``python -m bench.replay`` runs them all and writes ``bench/replay/RESULTS.md`` and ``replay.png``.
"""
