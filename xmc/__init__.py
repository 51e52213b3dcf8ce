"""The ``xmc`` command: the layer above the model core (:mod:`models`) and the HTTP service
(:mod:`service`). Only this package imports both; ``models`` never imports ``service``."""
