"""Chains, nodes and the spine: Sparrow's domain, free of HTTP and SQL."""
