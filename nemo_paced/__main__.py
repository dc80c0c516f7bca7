import sys

from nemo_paced.cli import main

sys.exit(main())
