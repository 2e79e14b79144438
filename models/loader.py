"""Each model family has its own `export.py`; tests import them under unique names."""
import importlib.util
import os


def load(name: str, path: str):
    """Imports the Python file at `path` as module `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
