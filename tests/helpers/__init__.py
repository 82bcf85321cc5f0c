"""Test helpers: plain-Python references, probes that run inside fits, and the server harness."""
