"""radchain: mine verified diagnostic reasoning from chest X-ray reports.

The importable code lives in the top-level packages ``schemas``, ``extractors``,
``warehouse``, ``training`` and ``flows``; this package holds what all of them share:
the version and the settings.
"""

__version__ = "0.1.0"
