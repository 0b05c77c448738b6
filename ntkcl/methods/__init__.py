"""Continual-learning methods; each implements `ntkcl.methods.base.ContinualMethod`."""
