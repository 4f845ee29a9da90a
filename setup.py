"""Lets Beam's ``--setup_file ./setup.py`` ship this package to Dataflow workers.

The metadata lives in pyproject.toml; Dataflow runs ``python setup.py sdist`` and installs
the result on every worker.
"""

from setuptools import setup

setup()
