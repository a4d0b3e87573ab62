"""The package version, recorded in every adapter config sspeft writes (`SpectralConfig.resolved`)."""

__version__ = "0.1.0"
