"""Unit tests of the I/O-free core: events, operations, protocol, hub, settings."""
