"""MLflow tracking for Regimen.

- ``client``: the one MLflow client helper (a cached client per tracking URI, sqlite
  calls taking turns, MLflow errors as ``TrackingError``, reading artifacts back).
- ``runs``: driver side, the run lifecycle (open with recipe/params/provenance tags,
  end with a truthful status, summaries, driver events, reading the recipe back).
- ``sink``: worker side (rank 0), ``MetricSink``: async batched metrics that spool to
  disk while MLflow is unreachable, plus ``replay_spool`` for after a crash.
- ``system``: worker side (every rank), MLflow's own system-metrics monitor with one node
  id per rank (``system/rank<R>-<node>/...``), stopped and flushed with the job.
- ``segments``: the lineage of a job in MLflow (rollback segment runs, the tags of resumes
  and manual rollbacks, the counters on the root run), used by worker and driver alike.
- ``record``: what only the worker or the driver knows (data input, ds_config, hardware,
  checkpoints, driver heartbeat).
- ``redact``: keeps secrets (keys like ``*password*``, ``hf_token``, URL passwords,
  secret environment values) out of params, tags, artifacts and events.
"""
