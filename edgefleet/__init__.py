"""The `edgefleet` command, the demo and the real models it runs on."""
