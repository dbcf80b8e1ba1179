"""Re-simulate a committed transformers-cb run with another profile (no engine run):
    python docs/validation/transformers-cb/resimulate.py RUN_DIR PROFILE OUT_DIR
(see simspec.calibrate.validate_cb.resimulate)."""
import sys

from simspec.calibrate.validate_cb import resimulate
from simspec.errors import SimspecError

if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    try:
        resimulate(*sys.argv[1:], force=True)
    except SimspecError as exc:
        sys.exit(f"resimulate: error: {exc}")
