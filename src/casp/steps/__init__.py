"""The steps of a compression run, each a function over the model, its adapter and what it needs."""
