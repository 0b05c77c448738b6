"""Built-in dataset plugins, registered through the same `ntkcl.datasets` entry points as third-party ones."""
