"""`python -m mixie.generate`: see `__main__`."""
