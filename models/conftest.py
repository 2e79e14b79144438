"""pytest set-up for the model families' tests: makes `loader` importable."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
