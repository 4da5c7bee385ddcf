"""What lives below the agent on a device: the signed bundle format and the A/B slot installer."""
