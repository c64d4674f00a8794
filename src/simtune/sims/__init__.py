"""Example simulations used by the demo and the tests."""
