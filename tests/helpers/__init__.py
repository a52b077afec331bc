"""Shared test helpers: tiny models (``models``), exact oracles (``oracles``), Lightning modules (``lightning_models``) and the estimator table (``estimators``)."""
