"""Put this checkout's src/ first on sys.path, after checking this python has the packages.

DVC tracks src/twophase as a dependency, so the stage must run that very code, also in the
temporary copies that `dvc exp run --temp/--queue` make, where an installed package would point
back at the main workspace.

DVC runs `python` from the PATH: outside the project's environment that python lacks torch and
the rest, and would stop with an import traceback. It is said in one line instead (looked up,
not imported: the lookup costs nothing).
"""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

PACKAGES = ("yaml", "numpy", "pandas", "PIL", "torch", "torchvision")
_missing = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
if _missing:
    print(
        f"twophase: error: {sys.executable} has no {', '.join(_missing)}: run DVC from the "
        f"project's environment (source {ROOT / '.venv' / 'bin' / 'activate'}, after make setup)",
        file=sys.stderr,
    )
    sys.exit(1)
