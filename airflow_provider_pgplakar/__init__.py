"""Airflow provider: PostgreSQL backups into an encrypted, deduplicated snapshot store (Plakar-style)."""

from __future__ import annotations

__version__ = "0.1.0"


def get_provider_info() -> dict:
    """Provider metadata read by Airflow's provider discovery (``apache_airflow_provider`` entry point).

    ``package-name`` must equal the normalized distribution name, or every ``airflow`` command on the host fails.
    """
    return {
        "package-name": "airflow-provider-pgplakar",
        "name": "PgPlakar",
        "description": "Back up PostgreSQL into an encrypted, deduplicated snapshot store and restore from it.",
        "versions": [__version__],
    }
