"""Integrations with other training libraries (each an optional extra): :mod:`promptkd.integrations.trl`."""
