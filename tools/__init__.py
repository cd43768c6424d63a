"""Tools that test the product from outside it (not installed with gsops)."""
