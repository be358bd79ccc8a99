"""The expert lifecycle: add documents (new topics and experts), retrain, retire, restore and roll back
the experts of a run, each change one generation of its versioned store (`python -m mixie.experts`)."""
