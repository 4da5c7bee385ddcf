"""The EdgeFleet controller: enrollment, presence, the operator API and the stores behind them."""

__version__ = "0.1.0"
