"""Measurements of the engine itself: the ``engine`` experiment (:mod:`.experiment`), which
checks ``attnkit.attention`` against the dense reference for every pattern and measures how its
time and memory grow with the allowed pairs.

It lives here, beside the applications, because the engine's own modules
(``functional``, ``patterns``, ``kernels``) are math only: no timing, files or reports.
"""
