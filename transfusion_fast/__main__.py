"""``python -m transfusion_fast train | sample | eval | demo``: the same CLI as ``transfusion-fast``."""
import sys

from .app.cli import main

sys.exit(main())
