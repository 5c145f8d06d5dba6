"""Each technique's recipe side, one light module each (pydantic only, no torch).

A module holds the technique's config section, its cross-section ``check`` and the
``describe`` that `regimen plan` shows. :mod:`orchestrator.recipe.catalog` lists them;
the training side (:mod:`orchestrator.techniques`) builds the technique from the config.
"""
