"""What every kernelloop service shares: schemas, subjects, settings, broker, telemetry, op catalog."""
