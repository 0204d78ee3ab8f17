"""Models: the contract every model keeps (``contract``: its parts by accessor, class score,
P(COVID)), the nine architectures (``architectures``), one run's settings (``config``), its folder
(``runs``) and training (``train``). TensorFlow comes through ``covidlib.runtime``."""
