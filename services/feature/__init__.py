"""feature: point-in-time features, offline datasets, the online store and the etl pipeline."""
