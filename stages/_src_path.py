"""Put this checkout's src/ first on sys.path.

DVC tracks src/twophase as a dependency, so the stage must run that very code, also in the
temporary copies that `dvc exp run --temp/--queue` make, where an installed package would point
back at the main workspace.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
