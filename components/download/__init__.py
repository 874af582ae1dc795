"""The download step: img2dataset over a checked URL list, its options, stats and URL safety."""
