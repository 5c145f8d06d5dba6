"""Training techniques: one module each, one interface (``base.Technique``), one registry."""
