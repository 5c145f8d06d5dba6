"""``regimen audit``: what ran, with which recipe, what happened, side by side.

- ``fetch``: connecting to MLflow (bad input as ``UsageError``) and plain run views.
- ``reconcile``: finds RUNNING runs whose driver is gone and ends them KILLED.
- ``lineage``: the tree of a job's segments (rollbacks, resumes) and its events.
- ``report``: the report of one run (recipe, lineage, events, metrics, checkpoints).
- ``compare``: recipe diff and final metrics of several runs.
- ``table``: the runs of an experiment as a table (text, JSON, CSV).
- ``plot``: loss curves with rollbacks, spikes and switches marked (matplotlib, Agg).
- ``cli``: the typer command.
"""
