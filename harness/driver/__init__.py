"""The driver: configuration, scheduling, Ray workers, reports and the command line; the top layer."""
