"""mixie: a mixture of introvert experts upcycling a frozen, pretrained LLM (JAX/Flax)."""

__version__ = "0.1.0"
