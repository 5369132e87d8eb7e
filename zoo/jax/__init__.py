"""Plain-JAX reference models: pure ``init``/``apply`` functions over a params dict."""
