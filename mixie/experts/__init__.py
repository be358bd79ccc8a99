"""`python -m mixie.experts`: see `__main__`."""
