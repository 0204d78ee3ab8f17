"""Models: the nine architectures (``architectures``), the contract every model keeps
(``contract``: its parts by accessor, class score, P(COVID)), one run's settings (``config``),
its folder (``runs``), TensorFlow set-up (``runtime``) and training (``train``)."""
