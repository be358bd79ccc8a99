"""Sweep configs: `python -m mixie.sweep --config=configs/sweeps/NAME.py[:variant]` (see mixie.sweep)."""
