"""`python -m bench`: the service against the Node.js original design, on loopback.

See bench/README.md for what it measures and how to read the results.
"""
