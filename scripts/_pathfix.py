"""Imported first by every script: `scripts/distill.py` is named like the package.

Python puts this folder at the front of the import path, so `import distill` would find the
script instead of the package. Dropping the folder from the path fixes that for all scripts.
"""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
