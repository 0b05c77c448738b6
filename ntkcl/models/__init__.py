"""Backbone loading (timm), PEFT building blocks and classifier heads."""
