"""Research tools of gemma-edge: the studies behind the shipped recipe, run from a checkout.

Not installed with the package (``pip install`` ships ``gemma_edge`` only); see
research/README.md for what each tool is for and ``python -m research --help``.
"""
