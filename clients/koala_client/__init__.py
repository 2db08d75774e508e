"""The KOALA client: the `koala` command line (and, with the service, the Python SDK)."""
