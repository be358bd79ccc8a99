"""`python -m mixie.export`: see `__main__`."""
