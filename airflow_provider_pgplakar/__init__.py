"""Airflow provider: PostgreSQL backups into an encrypted, deduplicated snapshot store (Plakar-style)."""

from __future__ import annotations

from .conn_forms import LEGACY_STORE_CONN_TYPE, STORE_CONN_FIELDS, STORE_CONN_TYPE, STORE_UI_FIELD_BEHAVIOUR

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
        "integrations": [
            {"integration-name": "PgPlakar", "external-doc-url": "https://plakar.io/", "tags": ["software"]}
        ],
        "hooks": [{"integration-name": "PgPlakar", "python-modules": ["airflow_provider_pgplakar.hooks.store"]}],
        "operators": [{"integration-name": "PgPlakar", "python-modules": [
            "airflow_provider_pgplakar.operators.logical", "airflow_provider_pgplakar.operators.physical",
            "airflow_provider_pgplakar.operators.verify", "airflow_provider_pgplakar.operators.maintenance"]}],
        "sensors": [{"integration-name": "PgPlakar", "python-modules": ["airflow_provider_pgplakar.sensors.snapshot"]}],
        "triggers": [{"integration-name": "PgPlakar",
                      "python-modules": ["airflow_provider_pgplakar.triggers.snapshot"]}],
        "connection-types": [
            {
                "connection-type": STORE_CONN_TYPE,
                "hook-class-name": "airflow_provider_pgplakar.hooks.store.PgPlakarStoreHook",
                "hook-name": "PgPlakar snapshot store",
                "conn-fields": STORE_CONN_FIELDS,
                "ui-field-behaviour": STORE_UI_FIELD_BEHAVIOUR,
            },
            {  # the first name of the type: existing connections keep working (new ones: use "pgplakar")
                "connection-type": LEGACY_STORE_CONN_TYPE,
                "hook-class-name": "airflow_provider_pgplakar.hooks.store.PgPlakarLegacyStoreHook",
                "hook-name": "PgPlakar snapshot store (legacy type pgplakar_store)",
                "conn-fields": STORE_CONN_FIELDS,
                "ui-field-behaviour": STORE_UI_FIELD_BEHAVIOUR,
            },
        ],
    }

