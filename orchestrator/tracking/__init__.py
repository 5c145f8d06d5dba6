"""MLflow tracking for Regimen.

- ``runs``: driver side, the run lifecycle (open with recipe/params/provenance tags,
  end with a truthful status, summaries, driver events, reading the recipe back).
- ``sink``: worker side (rank 0), ``MetricSink``: async batched metrics that spool to
  disk while MLflow is unreachable, plus ``replay_spool`` for after a crash.
- ``redact``: keeps secrets (keys like ``*password*``, ``hf_token``, URL passwords,
  secret environment values) out of params, tags, artifacts and events.
"""
