"""The EdgeFleet on-device agent. Kept light: importing it never pulls in the compile tool-chain."""

__version__ = "0.1.0"
