"""KFP adapters over pqflow.core; see the README."""
