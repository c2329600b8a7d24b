import sys

from cnnscale.cli import main

sys.exit(main())
