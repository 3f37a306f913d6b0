"""The ``pgplakar`` command: every store operation without Airflow (disaster recovery must not need a scheduler)."""

from .main import main

__all__ = ["main"]
