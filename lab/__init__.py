"""The lab tests and benchmarks share: real components, namespaces, agents."""
