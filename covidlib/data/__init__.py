"""Data: a dataset folder found and validated (``dataset``), decoded once into a cache (``images``),
split by slice or by group (``splits``), the lung fields (``lungs``), the downloads (``fetch``) and
the dataset tour's figures (``figures``). Nothing here knows about models."""
