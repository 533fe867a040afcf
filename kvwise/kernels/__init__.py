"""Leaf kernel packages: pure numerical building blocks that import nothing else from kvwise."""
