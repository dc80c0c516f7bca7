import os
import sys
from pathlib import Path

# Tests import their helpers (gloo_ranks, ...) as top-level modules from this folder.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
