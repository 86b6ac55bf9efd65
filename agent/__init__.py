"""The CLADNet agent: one per host, owns the WireGuard device and pushes metrics."""
