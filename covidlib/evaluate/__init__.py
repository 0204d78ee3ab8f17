"""Evaluation: point metrics (``metrics``), uncertainty and tests (``stats``), shortcut baselines
(``baselines``), the coarseness sweep (``sweep``), one run's views (``run_views``), and the reader's
tables (``tables``) and sentences (``sentences``)."""
