"""Explanations: the map methods (``maps``: one base class, each method overrides one step),
per-layer views (``layers``), the sanity protocol (``sanity``) and the reader's galleries (``gallery``)."""
